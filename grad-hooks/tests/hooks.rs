//! The hooks against libtorch's own autograd on CPU: when they fire, in which order, what the gradient is then.

use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use m3d_grad_hooks::{GradReadyHooks, HookError};
use tch::{Device, Kind, Tensor};

fn leaf(shape: &[i64], seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, (Kind::Float, Device::Cpu)).set_requires_grad(true)
}

/// A three-layer chain: w0 is used first in the forward pass, so its gradient is final last.
fn chain(ws: &[Tensor], x: &Tensor) -> Tensor {
    ws.iter()
        .fold(x.shallow_clone(), |h, w| h.matmul(w).tanh())
        .sum(Kind::Float)
}

#[test]
fn armed_hooks_fire_once_per_parameter_in_backward_order() -> anyhow::Result<()> {
    let ws: Vec<Tensor> = (0..3).map(|i| leaf(&[8, 8], i)).collect();
    let unused = leaf(&[4], 9);
    let mut all: Vec<Tensor> = ws.iter().map(Tensor::shallow_clone).collect();
    all.push(unused.shallow_clone());
    let hooks = GradReadyHooks::install(&all)?;
    let x = leaf(&[2, 8], 5).detach();

    // Disarmed: nothing is sent and nothing is recorded.
    chain(&ws, &x).backward();
    let rx = hooks.arm();
    chain(&ws, &x).backward();
    let got: Vec<usize> = rx.try_iter().collect();
    assert_eq!(got, vec![2, 1, 0], "last layer's gradient is final first");
    assert_eq!(
        hooks.not_fired(),
        vec![3],
        "the unused parameter never fired"
    );
    let fired = hooks.disarm();
    assert_eq!(fired.order, vec![2, 1, 0]);
    assert_eq!(fired.repeated, None);
    assert!(matches!(
        rx.recv_timeout(Duration::from_millis(10)),
        Err(RecvTimeoutError::Disconnected)
    ));

    // A second backward in the same armed period is reported, not sent again.
    let rx = hooks.arm();
    chain(&ws, &x).backward();
    chain(&ws, &x).backward();
    assert_eq!(rx.try_iter().count(), 3);
    assert_eq!(hooks.disarm().repeated, Some(2));
    Ok(())
}

#[test]
fn the_gradient_is_final_when_the_hook_fires() -> anyhow::Result<()> {
    // Read each gradient on another thread as soon as its index arrives, while the backward pass goes on, and
    // compare with the gradients after it: a hook that fired early (before the accumulation) reads zeros or a
    // partial sum. w1 is used twice, so its accumulation sums two contributions.
    let ws: Vec<Tensor> = (0..6).map(|i| leaf(&[256, 256], 10 + i)).collect();
    let hooks = GradReadyHooks::install(&ws)?;
    let x = leaf(&[64, 256], 3).detach();
    let loss = {
        let h = x.matmul(&ws[0]).tanh();
        let h = h.matmul(&ws[1]).tanh().matmul(&ws[1]).tanh();
        ws[2..]
            .iter()
            .fold(h, |h, w| h.matmul(w).tanh())
            .sum(Kind::Float)
    };
    let params: Vec<Tensor> = ws.iter().map(Tensor::shallow_clone).collect();
    let rx = hooks.arm();
    let seen = std::thread::scope(|s| {
        let reader = s.spawn(move || {
            rx.into_iter()
                .map(|i| (i, params[i].grad().copy()))
                .collect::<Vec<_>>()
        });
        loss.backward();
        hooks.disarm();
        reader.join()
    })
    .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    assert_eq!(seen.len(), ws.len());
    for (i, g) in seen {
        let diff = (&g - ws[i].grad()).abs().max().double_value(&[]);
        assert_eq!(diff, 0.0, "w{i}'s gradient changed after its hook fired");
    }
    Ok(())
}

#[test]
fn only_parameters_can_be_hooked() {
    let x = leaf(&[3], 1);
    let y = &x * 2.0;
    let frozen = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    let err = GradReadyHooks::install(&[x.shallow_clone(), y]).unwrap_err();
    assert!(
        matches!(&err, HookError::Install { index: 1, detail } if detail.contains("not a leaf")),
        "{err}"
    );
    let err = GradReadyHooks::install(&[frozen]).unwrap_err();
    assert!(
        err.to_string().contains("does not require a gradient"),
        "{err}"
    );
}

#[test]
fn dropped_hooks_are_removed() -> anyhow::Result<()> {
    let w = leaf(&[4, 4], 2);
    let first = GradReadyHooks::install(&[w.shallow_clone()])?;
    let rx = first.arm();
    drop(first);
    // The old context is freed; a hook left behind would call into it here.
    (&w * 3.0).sum(Kind::Float).backward();
    assert!(rx.try_recv().is_err());
    let second = GradReadyHooks::install(&[w.shallow_clone()])?;
    let rx = second.arm();
    (&w * 3.0).sum(Kind::Float).backward();
    assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![0]);
    Ok(())
}

#[test]
fn unreached_parameters_are_found_before_the_backward_pass() -> anyhow::Result<()> {
    let ws: Vec<Tensor> = (0..4).map(|i| leaf(&[4, 4], 20 + i)).collect();
    let hooks = GradReadyHooks::install(&ws)?;
    let x = leaf(&[2, 4], 1).detach();
    // w2 is used only under no_grad, w3 not at all; w1 twice, once through a view.
    let h = x.matmul(&ws[0]).matmul(&ws[1].tr().tr()).matmul(&ws[1]);
    let side = tch::no_grad(|| x.matmul(&ws[2]));
    let loss = (h + side).sum(Kind::Float);
    assert_eq!(hooks.unreached_by(&loss)?, vec![2, 3]);
    // A loss that is one of the parameters reaches that one only; a constant reaches none.
    assert_eq!(hooks.unreached_by(&ws[3])?, vec![0, 1, 2]);
    let constant = Tensor::ones([1], (Kind::Float, Device::Cpu));
    assert_eq!(hooks.unreached_by(&constant)?, vec![0, 1, 2, 3]);
    Ok(())
}
