//! AdamW, gradient clipping and the cosine schedule against torch and transformers
//! (tests/oracle/optim_oracle.py): f32 parameters and bf16 parameters with f32 master weights, two
//! parameter groups, 6 steps with clipping and the scheduled learning rate.

use std::collections::HashMap;

use m3d_worker::grad::clip_grad_norm;
use m3d_worker::optim::{AdamW, AdamWConfig};
use m3d_worker::schedule::{warmup_steps, LrSchedule, Shape};
use tch::{Kind, Tensor};

fn run_oracle() -> (tempfile::TempDir, HashMap<String, Tensor>) {
    let dir = tempfile::tempdir().unwrap();
    let script = m3d_testkit::package_dir().join("tests/oracle/optim_oracle.py");
    m3d_testkit::run_python(&script, &[dir.path().to_str().unwrap()]);
    let io = m3d_models::weights::read_tensors(&dir.path().join("io.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    (dir, io)
}

fn get<'a>(io: &'a HashMap<String, Tensor>, k: &str) -> &'a Tensor {
    io.get(k).unwrap_or_else(|| panic!("oracle has no `{k}`"))
}

/// max |a - b| / max |b| (relative to the tensor's scale).
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let a = a.detach().to_kind(Kind::Double);
    let b = b.detach().to_kind(Kind::Double);
    let d = (&a - &b).abs().max().double_value(&[]);
    d / b.abs().max().double_value(&[]).max(1e-30)
}

const DECAY: [&str; 2] = ["w", "emb"];
const NO_DECAY: [&str; 2] = ["b", "ln.weight"];

/// Runs the oracle's 6 steps in `case` ("f32" or "bf16"); returns the largest relative difference seen.
fn run_case(io: &HashMap<String, Tensor>, case: &str) -> f64 {
    let kind = if case == "f32" {
        Kind::Float
    } else {
        Kind::BFloat16
    };
    let make = |names: &[&str]| -> Vec<(String, Tensor)> {
        names
            .iter()
            .map(|n| {
                let t = get(io, &format!("{case}.init.{n}"))
                    .to_kind(kind)
                    .copy()
                    .set_requires_grad(true);
                (n.to_string(), t)
            })
            .collect()
    };
    let (decay, no_decay) = (make(&DECAY), make(&NO_DECAY));
    let params: Vec<(String, Tensor)> = decay
        .iter()
        .chain(&no_decay)
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    let mut opt = AdamW::new(AdamWConfig {
        betas: (0.9, 0.95),
        eps: 1e-8,
    });
    opt.add_group("decay", 0.1, decay).unwrap();
    opt.add_group("no_decay", 0.0, no_decay).unwrap();
    let sched = LrSchedule::new(Shape::Cosine, 1e-2, 6, 0.2);
    let oracle_lr = get(io, &format!("{case}.lr"));
    let oracle_norm = get(io, &format!("{case}.norm"));
    let mut worst = 0f64;
    for t in 0..6u64 {
        opt.zero_grad();
        // d/dp sum(p ⊙ g) = g exactly, in the parameters' kind.
        let loss = params
            .iter()
            .map(|(n, p)| (p * get(io, &format!("{case}.grad.{t}.{n}"))).sum(Kind::Float))
            .reduce(|a, b| a + b)
            .unwrap();
        loss.backward();
        let grads = opt.grads();
        assert_eq!(grads.len(), 4);
        let g: Vec<Tensor> = grads.iter().map(|(_, g)| g.shallow_clone()).collect();
        let norm = clip_grad_norm(&g, 1.0).unwrap();
        let want = oracle_norm.double_value(&[t as i64]);
        assert!(
            (norm - want).abs() <= 1e-6 * want,
            "{case} step {t}: norm {norm} vs torch {want}"
        );
        for (n, g) in &grads {
            let d = rel_diff(g, get(io, &format!("{case}.clipped.{t}.{n}")));
            assert!(
                d <= 1e-6,
                "{case} step {t}: clipped grad {n} differs by {d:e}"
            );
            worst = worst.max(d);
        }
        let lr = sched.lr(t);
        assert_eq!(
            lr,
            oracle_lr.double_value(&[t as i64]),
            "{case} lr of step {t}"
        );
        opt.step(lr).unwrap();
    }
    let state: HashMap<String, Tensor> = opt.state_dict().into_iter().collect();
    for (n, p) in &params {
        assert_eq!(p.kind(), kind, "{n} keeps its kind");
        let d = rel_diff(p, get(io, &format!("{case}.final.{n}")));
        // bf16 parameters are their rounded masters, which agree with torch's bit for bit (checked below):
        // so must the parameters.
        let tol = if case == "f32" { 1e-6 } else { 0.0 };
        assert!(d <= tol, "{case}: final {n} differs by {d:e}");
        let moved = rel_diff(p, get(io, &format!("{case}.init.{n}")));
        assert!(
            moved > 1e-3,
            "{case}: {n} barely moved ({moved:e}): the comparison would be vacuous"
        );
        worst = worst.max(if case == "f32" { d } else { 0.0 });
        for field in ["exp_avg", "exp_avg_sq"] {
            let d = rel_diff(
                &state[&format!("{n}.{field}")],
                get(io, &format!("{case}.{field}.{n}")),
            );
            assert!(d <= 1e-6, "{case}: {field} of {n} differs by {d:e}");
            worst = worst.max(d);
        }
        assert_eq!(state[&format!("{n}.step")].int64_value(&[]), 6);
        if case == "bf16" {
            let master = &state[&format!("{n}.master")];
            let d = rel_diff(master, get(io, &format!("bf16.master.{n}")));
            assert!(d <= 1e-6, "bf16: master {n} differs by {d:e}");
            worst = worst.max(d);
            // The parameter is its master rounded to bf16.
            assert_eq!(
                rel_diff(p, &master.to_kind(Kind::BFloat16)),
                0.0,
                "bf16 parameter {n} is not its rounded master"
            );
        }
    }
    worst
}

#[test]
fn adamw_clip_and_schedule_match_torch() {
    let (_dir, io) = run_oracle();

    // Schedule: warmup steps as the Trainer computes them, and every lr of LambdaLR.
    for i in 0.. {
        let Some(total) = io.get(&format!("sched.{i}.total")) else {
            assert!(i >= 8, "only {i} schedule cases");
            break;
        };
        let total = total.int64_value(&[]) as u64;
        let ratio = get(&io, &format!("sched.{i}.ratio")).double_value(&[]);
        let warmup = get(&io, &format!("sched.{i}.warmup")).int64_value(&[]) as u64;
        assert_eq!(
            warmup_steps(total, ratio),
            warmup,
            "total {total}, ratio {ratio}"
        );
        let s = LrSchedule::new(Shape::Cosine, 3e-4, total, ratio);
        let lrs = get(&io, &format!("sched.{i}.lrs"));
        for step in 0..total + 3 {
            let want = lrs.double_value(&[step as i64]);
            let got = s.lr(step);
            assert!(
                (got - want).abs() <= 1e-15 * want.abs().max(1e-30),
                "total {total} ratio {ratio} step {step}: {got} vs transformers {want}"
            );
        }
    }

    let f32_worst = run_case(&io, "f32");
    let bf16_worst = run_case(&io, "bf16");
    eprintln!("AdamW vs torch: max relative diff f32 {f32_worst:e}, bf16 masters {bf16_worst:e}");
}
