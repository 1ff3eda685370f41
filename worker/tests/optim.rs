//! AdamW beyond the torch oracle: state save/load resumes bit for bit; state errors name the key; bf16
//! gradients accumulate in f32; parameter groups follow the no-decay patterns.

use m3d_worker::optim::{AdamW, AdamWConfig, OptimError};
use tch::{Device, Kind, Tensor};

/// Fixed values (no global RNG: tests run in parallel threads and share libtorch's generator).
fn params(kind: Kind) -> Vec<(String, Tensor)> {
    ["a.weight", "a.bias", "norm.weight"]
        .iter()
        .zip([vec![3i64, 4], vec![4], vec![4]])
        .enumerate()
        .map(|(j, (n, s))| {
            let len: i64 = s.iter().product();
            let v: Vec<f32> = (0..len)
                .map(|i| ((i * 7 + j as i64 * 3) as f32 * 0.37).sin())
                .collect();
            let t = Tensor::from_slice(&v).reshape(s.as_slice()).to_kind(kind);
            (n.to_string(), t.set_requires_grad(true))
        })
        .collect()
}

fn share(ps: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    ps.iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect()
}

fn no_decay() -> Vec<String> {
    vec!["bias".into(), r"(?:^|\.)norm(?:$|\.)".into()]
}

fn step(opt: &mut AdamW, ps: &[(String, Tensor)], t: i64) {
    opt.zero_grad();
    let loss = ps
        .iter()
        .map(|(_, p)| (p * p * (t as f64 + 1.0)).sum(Kind::Float) + p.sin().sum(Kind::Float))
        .reduce(|a, b| a + b)
        .unwrap();
    loss.backward();
    opt.step(1e-2).unwrap();
}

fn snapshot(ps: &[(String, Tensor)]) -> Vec<Tensor> {
    ps.iter().map(|(_, p)| p.detach().copy()).collect()
}

#[test]
fn groups_follow_the_no_decay_patterns() {
    let opt = AdamW::with_no_decay(
        AdamWConfig::default(),
        0.1,
        &no_decay(),
        params(Kind::Float),
    )
    .unwrap();
    assert_eq!(opt.groups()[0].weight_decay, 0.1);
    assert_eq!(opt.group_params(0), vec!["a.weight"]);
    assert_eq!(opt.group_params(1), vec!["a.bias", "norm.weight"]);
    let bad = AdamW::with_no_decay(
        AdamWConfig::default(),
        0.1,
        &["(".into()],
        params(Kind::Float),
    );
    assert!(matches!(bad, Err(OptimError::Pattern { .. })));
    let mut opt = AdamW::new(AdamWConfig::default());
    let ps = params(Kind::Float);
    let mut dup = share(&ps[..1]);
    dup.extend(share(&ps[..1]));
    assert!(
        matches!(opt.add_group("g", 0.0, dup), Err(OptimError::Duplicate(n)) if n == "a.weight")
    );
}

#[test]
fn state_dict_resumes_exactly() {
    for kind in [Kind::Float, Kind::BFloat16] {
        // 6 steps straight.
        let ps = params(kind);
        let mut opt =
            AdamW::with_no_decay(AdamWConfig::default(), 0.1, &no_decay(), share(&ps)).unwrap();
        for t in 0..6 {
            step(&mut opt, &ps, t);
        }
        let straight = snapshot(&ps);

        // 3 steps, state saved, a new optimizer on fresh parameters restored from it, 3 more steps.
        let ps1 = params(kind);
        let mut opt1 =
            AdamW::with_no_decay(AdamWConfig::default(), 0.1, &no_decay(), share(&ps1)).unwrap();
        for t in 0..3 {
            step(&mut opt1, &ps1, t);
        }
        let state = opt1.state_dict();
        let saved_params = snapshot(&ps1);
        let ps2 = params(kind);
        tch::no_grad(|| {
            for ((_, p), s) in ps2.iter().zip(&saved_params) {
                p.shallow_clone().copy_(s);
            }
        });
        let mut opt2 =
            AdamW::with_no_decay(AdamWConfig::default(), 0.1, &no_decay(), share(&ps2)).unwrap();
        opt2.load_state_dict(&state).unwrap();
        for t in 3..6 {
            step(&mut opt2, &ps2, t);
        }
        for (a, b) in snapshot(&ps2).iter().zip(&straight) {
            assert!(a.equal(b), "{kind:?}: resumed run differs");
        }
        let keys: Vec<&str> = state.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.contains(&"a.weight.exp_avg_sq"));
        assert_eq!(keys.contains(&"a.weight.master"), kind == Kind::BFloat16);

        // Errors name the key.
        let mut bad = state
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect::<Vec<_>>();
        bad.push((
            "nope.exp_avg".into(),
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        ));
        assert!(
            matches!(opt2.load_state_dict(&bad), Err(OptimError::UnknownKey(k)) if k == "nope.exp_avg")
        );
        let mut bad: Vec<_> = state
            .iter()
            .filter(|(k, _)| k != "a.bias.exp_avg")
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        assert!(
            matches!(opt2.load_state_dict(&bad), Err(OptimError::MissingKey(k)) if k == "a.bias.exp_avg")
        );
        bad.push((
            "a.bias.exp_avg".into(),
            Tensor::zeros([5], (Kind::Float, Device::Cpu)),
        ));
        assert!(
            matches!(opt2.load_state_dict(&bad), Err(OptimError::Shape { key, .. }) if key == "a.bias.exp_avg")
        );
    }
}

#[test]
fn bf16_gradients_accumulate_in_f32() {
    let ps = params(Kind::BFloat16);
    let mut opt = AdamW::new(AdamWConfig::default());
    opt.add_group(
        "all",
        0.0,
        ps.iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect(),
    )
    .unwrap();
    // 1 + 2^-9 is not a bf16 number: four micro-batches of that gradient add up to 4 + 2^-7 in f32, but
    // bf16 accumulation would round each partial sum.
    let g = 1.0 + 2f64.powi(-9);
    opt.zero_grad();
    for _ in 0..4 {
        let (_, p) = &ps[1];
        (p.to_kind(Kind::Float) * g).sum(Kind::Float).backward();
        opt.accumulate_grads();
    }
    let grads = opt.grads();
    assert_eq!(grads.len(), 1, "only the parameter with a gradient");
    let (name, acc) = &grads[0];
    assert_eq!(name, "a.bias");
    assert_eq!(acc.kind(), Kind::Float);
    // Each bf16 gradient is 1 + 2^-9 rounded to bf16 (1.0, 8 mantissa bits) or exact if representable.
    let one = Tensor::from(g as f32)
        .to_kind(Kind::BFloat16)
        .to_kind(Kind::Float)
        .double_value(&[]);
    let want = 4.0 * one;
    assert!(
        (acc.double_value(&[0]) - want).abs() < 1e-7,
        "{} vs {want}",
        acc.double_value(&[0])
    );
    opt.step(1e-3).unwrap();
    opt.zero_grad();
    assert!(opt
        .grads()
        .iter()
        .all(|(_, g)| g.abs().max().double_value(&[]) == 0.0));
}

#[test]
fn built_from_a_recipe() {
    let path = m3d_testkit::workspace_root().join("recipes/clip-tiny.yaml");
    let recipe = m3d_recipes::Recipe::load(&path, &["train.betas=[0.8, 0.9]".into()]).unwrap();
    let opt = AdamW::from_recipe(&recipe.train, params(Kind::Float)).unwrap();
    assert_eq!(opt.groups()[0].weight_decay, 0.1);
    assert_eq!(opt.group_params(1), vec!["a.bias", "norm.weight"]);
    // warmup_ratio 0.05 of 60 steps = 3 warmup steps, then the peak lr 5e-4.
    let s = m3d_worker::schedule::LrSchedule::from_recipe(&recipe.train, 60);
    assert_eq!(s.warmup, 3);
    assert_eq!(s.lr(3), 5e-4);
}
