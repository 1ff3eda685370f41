//! Activation checkpointing against the plain block on CPU: the same values and the same gradients (inputs and
//! parameters), dropout replayed, parameters reached through a checkpoint whose inputs need no gradient, hooks
//! firing from the recomputation, and errors of the recomputation reaching the caller of backward.
// `checkpoint` is unsafe only because a GPU runs the block on a device thread; these blocks capture tensors used
// by nothing else while their backward passes run, on the CPU.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use m3d_grad_hooks::{checkpoint, GradReadyHooks};
use tch::{Device, Kind, Tensor};

fn leaf(shape: &[i64], seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, (Kind::Float, Device::Cpu)).set_requires_grad(true)
}

/// Two layers with dropout between them, and a second output (a residual) the loss also uses.
fn block(ws: &[Tensor; 3], x: &Tensor) -> Vec<Tensor> {
    let h = x.matmul(&ws[0]).gelu("none").dropout(0.3, true);
    let y = h.matmul(&ws[1]) + &ws[2];
    vec![&y + x, y.tanh()]
}

fn loss(outs: &[Tensor]) -> Tensor {
    (outs[0].square().sum(Kind::Float) + outs[1].sum(Kind::Float)) * 0.5
}

fn params() -> [Tensor; 3] {
    [leaf(&[16, 32], 1), leaf(&[32, 16], 2), leaf(&[16], 3)]
}

fn grads(ws: &[Tensor; 3]) -> Vec<Tensor> {
    ws.iter().map(|w| w.grad().copy()).collect()
}

fn zero(ws: &[Tensor; 3]) {
    for w in ws {
        let mut g = w.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn checkpointed(ws: &[Tensor; 3], x: &Tensor) -> Vec<Tensor> {
    let inner: [Tensor; 3] = [
        ws[0].shallow_clone(),
        ws[1].shallow_clone(),
        ws[2].shallow_clone(),
    ];
    unsafe { checkpoint(&[x], move |ins| Ok(block(&inner, &ins[0]))) }.expect("checkpoint")
}

#[test]
fn gradients_equal_the_plain_blocks_with_dropout_replayed() {
    let ws = params();
    let x0 = leaf(&[4, 16], 4);

    // Plain: the dropout mask is whatever the generator gives after seed 7.
    let x = x0.detach().copy().set_requires_grad(true);
    tch::manual_seed(7);
    let plain_out = block(&ws, &x);
    let after_plain = Tensor::rand([1], (Kind::Float, Device::Cpu));
    loss(&plain_out).backward();
    let (plain_grads, plain_x) = (grads(&ws), x.grad().copy());
    zero(&ws);

    // Checkpointed: the same draws in the forward pass, replayed when the backward pass recomputes.
    let x = x0.detach().copy().set_requires_grad(true);
    tch::manual_seed(7);
    let outs = checkpointed(&ws, &x);
    assert!(outs.iter().all(Tensor::requires_grad));
    let after_ckpt = Tensor::rand([1], (Kind::Float, Device::Cpu));
    assert_eq!(
        after_plain.double_value(&[0]),
        after_ckpt.double_value(&[0]),
        "the forward pass draws what the plain block draws"
    );
    for (a, b) in outs.iter().zip(&plain_out) {
        assert_eq!(max_diff(a, b), 0.0, "forward values are the block's");
    }
    let before_backward = Tensor::rand([1], (Kind::Float, Device::Cpu));
    tch::manual_seed(99);
    loss(&outs).backward();
    let next = Tensor::rand([1], (Kind::Float, Device::Cpu));
    tch::manual_seed(99);
    let expected_next = Tensor::rand([1], (Kind::Float, Device::Cpu));
    assert_eq!(
        next.double_value(&[0]),
        expected_next.double_value(&[0]),
        "the recomputation leaves the generator where the backward pass found it"
    );
    let _ = before_backward;
    // Same kernels on the same values in the same order: equal to rounding of the accumulation only.
    for (g, p) in grads(&ws).iter().zip(&plain_grads) {
        let d = max_diff(g, p);
        assert!(d <= 1e-6 * p.abs().max().double_value(&[]).max(1.0), "{d}");
    }
    assert!(max_diff(&x.grad(), &plain_x) <= 1e-6);
}

#[test]
fn parameters_get_gradients_when_no_input_needs_one() {
    let ws = params();
    let x = leaf(&[4, 16], 4).detach();
    tch::manual_seed(7);
    loss(&block(&ws, &x)).backward();
    let plain = grads(&ws);
    zero(&ws);
    tch::manual_seed(7);
    let outs = checkpointed(&ws, &x);
    assert!(
        outs[0].requires_grad(),
        "tracked although x needs no gradient"
    );
    loss(&outs).backward();
    for (g, p) in grads(&ws).iter().zip(&plain) {
        assert!(max_diff(g, p) <= 1e-6);
    }
}

#[test]
fn without_grad_mode_it_is_the_block() {
    let ws = params();
    let x = leaf(&[4, 16], 4);
    let outs = tch::no_grad(|| {
        tch::manual_seed(7);
        checkpointed(&ws, &x)
    });
    assert!(!outs[0].requires_grad());
    tch::manual_seed(7);
    let plain = tch::no_grad(|| block(&ws, &x));
    assert_eq!(max_diff(&outs[0], &plain[0]), 0.0);
}

#[test]
fn hooks_fire_during_the_recomputation_and_the_graph_is_opaque() -> anyhow::Result<()> {
    let ws = params();
    let hooks = GradReadyHooks::install(&ws)?;
    let x = leaf(&[4, 16], 4);
    let l = loss(&checkpointed(&ws, &x));
    assert_eq!(
        hooks.unreached_by(&l)?,
        Vec::<usize>::new(),
        "a checkpoint hides its parameters: every one counts as reached"
    );
    let rx = hooks.arm();
    l.backward();
    let fired: Vec<usize> = rx.try_iter().collect();
    let got = hooks.disarm();
    assert_eq!(fired.len(), 3, "{fired:?}");
    assert_eq!(got.repeated, None);
    Ok(())
}

#[test]
fn a_failing_recomputation_fails_the_backward_pass() {
    let w = leaf(&[8, 8], 1);
    let calls = Arc::new(AtomicUsize::new(0));
    let (inner, c) = (w.shallow_clone(), calls.clone());
    let x = leaf(&[2, 8], 2);
    let outs = unsafe {
        checkpoint(&[&x], move |ins| {
            if c.fetch_add(1, Ordering::SeqCst) > 0 {
                return Err("layer 3 cannot run again".into());
            }
            Ok(vec![ins[0].matmul(&inner)])
        })
    }
    .expect("forward");
    let err = outs[0]
        .sum(Kind::Float)
        .f_backward()
        .expect_err("the recomputation failed");
    assert!(
        err.to_string().contains("layer 3 cannot run again"),
        "{err}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // A panic in the block is an error too, not an abort.
    let outs = unsafe {
        checkpoint(&[&x], |ins| {
            if ins[0].requires_grad() {
                panic!("boom");
            }
            Ok(vec![ins[0].sin()])
        })
    }
    .expect("forward");
    let err = outs[0].sum(Kind::Float).f_backward().expect_err("panicked");
    assert!(err.to_string().contains("panicked"), "{err}");
}

#[test]
fn an_output_that_is_its_input_is_copied_not_aliased() {
    let x = leaf(&[3], 1);
    let outs = unsafe {
        checkpoint(&[&x], |ins| {
            Ok(vec![ins[0].shallow_clone(), ins[0].view([3, 1])])
        })
    }
    .expect("forward");
    (outs[0].sum(Kind::Float) * 2.0 + outs[1].sum(Kind::Float)).backward();
    assert_eq!(
        Vec::<f32>::try_from(&x.grad()).unwrap(),
        vec![3.0, 3.0, 3.0]
    );
}
