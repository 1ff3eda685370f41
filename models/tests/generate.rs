//! Cached decoding and greedy generation against transformers 5.23 (tiny random Llama and Phi-3, fp32, eager):
//! `greedy_generate` gives the tokens `generate(do_sample=False, num_beams=1)` gives, from ids and from input
//! embeddings, with and without an eos stop; prefill + one-token steps with a KV cache reproduce the logits of
//! one full forward, also for a left-padded batch (positions from the attention mask) and across Phi-3's
//! sliding window.
mod common;
mod llm_support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use m3d_models::generate::{filtered_probs, generate, GenerateOptions, Sampling};
use m3d_models::llm::{greedy_generate, AttentionImpl, CausalLm, GenerateInput, KvCache};
use m3d_models::ModelError;
use tch::{Kind, Tensor};

use llm_support::{load, run_oracle_into};

fn oracle() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| run_oracle_into("llm-generate", "llm_generate.py", &["llama", "phi3"]))
}

fn tokens(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.view([-1])).unwrap()
}

fn check_generation(family: &str) {
    let dir = oracle().join(family);
    let io = common::read(&dir.join("io.safetensors"));
    let prompt = common::get(&io, "prompt_ids");
    let expected = tokens(common::get(&io, "greedy"));
    let expected_eos = tokens(common::get(&io, "greedy_eos"));
    let expected_embeds = tokens(common::get(&io, "greedy_embeds"));
    let eos = *expected_eos.last().unwrap();
    for imp in [AttentionImpl::Eager, AttentionImpl::Sdpa] {
        let (_vs, model) = load(&dir, imp);
        let ids =
            greedy_generate(&model, GenerateInput::Ids(prompt.shallow_clone()), 12, &[]).unwrap();
        assert_eq!(ids, expected, "{family} {imp:?}: greedy from ids");
        let with_eos = greedy_generate(
            &model,
            GenerateInput::Ids(prompt.shallow_clone()),
            12,
            &[eos],
        )
        .unwrap();
        assert_eq!(
            with_eos, expected_eos,
            "{family} {imp:?}: greedy stopping at eos {eos}"
        );
        let embeds = common::get(&io, "prompt_embeds").shallow_clone();
        let from_embeds = greedy_generate(&model, GenerateInput::Embeds(embeds), 12, &[]).unwrap();
        assert_eq!(
            from_embeds, expected_embeds,
            "{family} {imp:?}: greedy from embeddings"
        );
    }
    println!("{family}: greedy {expected:?}, from embeddings {expected_embeds:?}, eos stop {expected_eos:?}");
}

/// max |a - b| over real (unpadded) positions. Padded query rows see no key at all, so HF spreads them
/// uniformly over whatever keys exist, which differs between a full forward and a cached prefill.
fn real_diff(a: &Tensor, b: &Tensor, mask: Option<&Tensor>) -> f64 {
    let d = (a - b).abs();
    let d = match mask {
        Some(m) => d * m.unsqueeze(-1).to_kind(Kind::Float),
        None => d,
    };
    d.max().double_value(&[])
}

/// Prefill 5 tokens, then one token per step with the growing mask; every step's logits must equal the
/// oracle's full forward (batch 2, row 1 left-padded) at real positions. Returns the max abs diff seen.
fn cached_vs_full(model: &CausalLm, ids: &Tensor, mask: Option<&Tensor>, full: &Tensor) -> f64 {
    let t = ids.size()[1];
    let cols = |start: i64, len: i64| mask.map(|m| m.narrow(1, start, len));
    let mut cache = KvCache::new(model.config().num_hidden_layers() as usize);
    let prefill = 5;
    let step_mask = |end: i64| mask.map(|m| m.narrow(1, 0, end));
    let logits = model
        .forward(
            &ids.narrow(1, 0, prefill),
            step_mask(prefill).as_ref(),
            Some(&mut cache),
            false,
        )
        .unwrap();
    assert_eq!(cache.seq_len(), prefill);
    let mut worst = real_diff(
        &logits,
        &full.narrow(1, 0, prefill),
        cols(0, prefill).as_ref(),
    );
    for i in prefill..t {
        let logits = model
            .forward(
                &ids.narrow(1, i, 1),
                step_mask(i + 1).as_ref(),
                Some(&mut cache),
                false,
            )
            .unwrap();
        worst = worst.max(real_diff(
            &logits,
            &full.narrow(1, i, 1),
            cols(i, 1).as_ref(),
        ));
    }
    assert_eq!(cache.seq_len(), t);
    worst
}

fn check_cached_decoding(family: &str) {
    let dir = oracle().join(family);
    let io = common::read(&dir.join("io.safetensors"));
    let ids = common::get(&io, "batch_ids");
    let mask = common::get(&io, "batch_mask");
    let full = common::get(&io, "batch_logits");
    for imp in [AttentionImpl::Eager, AttentionImpl::Sdpa] {
        let (_vs, model) = load(&dir, imp);
        let ours_full = model.forward(ids, Some(mask), None, false).unwrap();
        let d_full = common::max_abs_diff(&ours_full, full);
        let d_all_cached = tch::no_grad(|| {
            let mut cache = KvCache::new(model.config().num_hidden_layers() as usize);
            let prefill = model
                .forward(ids, Some(mask), Some(&mut cache), false)
                .unwrap();
            common::max_abs_diff(&prefill, full)
        });
        assert!(
            d_all_cached <= 1e-4,
            "prefill of everything into an empty cache"
        );
        let d_cached = tch::no_grad(|| cached_vs_full(&model, ids, Some(mask), full));
        // Row 0 has no padding: without any mask the cached path must give the same logits.
        let d_nomask = tch::no_grad(|| {
            cached_vs_full(&model, &ids.narrow(0, 0, 1), None, &full.narrow(0, 0, 1))
        });
        println!(
            "{family} {imp:?}: full forward {d_full:.2e}, cached (left-padded batch) {d_cached:.2e}, \
             cached (no mask) {d_nomask:.2e}"
        );
        for (what, d) in [
            ("full", d_full),
            ("cached", d_cached),
            ("cached, no mask", d_nomask),
        ] {
            assert!(d <= 1e-4, "{family} {imp:?} {what}: max abs diff {d:e}");
        }
    }
}

#[test]
fn llama_greedy_generate_matches_transformers() {
    check_generation("llama");
}

#[test]
fn phi3_greedy_generate_matches_transformers() {
    check_generation("phi3");
}

#[test]
fn llama_cached_decoding_matches_full_forward() {
    check_cached_decoding("llama");
}

#[test]
fn phi3_cached_decoding_matches_full_forward() {
    check_cached_decoding("phi3");
}

#[test]
fn greedy_generate_checks_its_input() {
    let (_vs, model) = load(&oracle().join("llama"), AttentionImpl::Sdpa);
    let batch2 = Tensor::ones([2, 3], (Kind::Int64, tch::Device::Cpu));
    let err = greedy_generate(&model, GenerateInput::Ids(batch2), 4, &[]).unwrap_err();
    assert!(matches!(err, ModelError::Input(_)), "{err}");
    let wrong_width = Tensor::zeros([1, 3, 7], (Kind::Float, tch::Device::Cpu));
    let err = greedy_generate(&model, GenerateInput::Embeds(wrong_width), 4, &[]).unwrap_err();
    assert!(matches!(err, ModelError::Shape { .. }), "{err}");
    let mut cache = KvCache::new(2);
    let ids = Tensor::ones([1, 3], (Kind::Int64, tch::Device::Cpu));
    let bad_mask = Tensor::ones([1, 2], (Kind::Int64, tch::Device::Cpu));
    let err = model
        .forward(&ids, Some(&bad_mask), Some(&mut cache), false)
        .unwrap_err();
    assert!(matches!(err, ModelError::Input(_)), "{err}");
    assert!(greedy_generate(&model, GenerateInput::Ids(ids), 0, &[])
        .unwrap()
        .is_empty());
}

/// A left-padded batch of two prompts decodes as transformers' `generate` decodes it, each row stopping at the
/// eos on its own (row 0 early, then fed pad while row 1 goes on).
fn check_batch_generation(family: &str) {
    let dir = oracle().join(family);
    let io = common::read(&dir.join("io.safetensors"));
    let ids = common::get(&io, "gen_batch_ids");
    let mask = common::get(&io, "gen_batch_mask");
    let eos = tokens(common::get(&io, "gen_batch_eos"))[0];
    let hf = common::get(&io, "gen_batch");
    let expected: Vec<Vec<i64>> = (0..2)
        .map(|r| {
            let row = tokens(&hf.get(r));
            match row.iter().position(|&t| t == eos) {
                Some(end) => row[..=end].to_vec(),
                None => row,
            }
        })
        .collect();
    assert!(
        expected[0].len() < 12,
        "{family}: row 0 should stop early: {expected:?}"
    );
    for imp in [AttentionImpl::Eager, AttentionImpl::Sdpa] {
        let (_vs, model) = load(&dir, imp);
        let embeds = model.embed_tokens(ids).unwrap();
        let mut opts = GenerateOptions::greedy(12, &[eos]);
        opts.pad_id = 0;
        let got = generate(&model, &embeds, Some(mask), &opts).unwrap();
        assert_eq!(got, expected, "{family} {imp:?}: left-padded batch");
        // Each row alone (no padding) gives its batch row.
        for (r, want) in expected.iter().enumerate() {
            let real = mask.get(r as i64).sum(Kind::Int64).int64_value(&[]);
            let alone = ids.narrow(0, r as i64, 1).narrow(1, 7 - real, real);
            let got = greedy_generate(&model, GenerateInput::Ids(alone), 12, &[eos]).unwrap();
            assert_eq!(&got, want, "{family} {imp:?}: row {r} alone");
        }
    }
}

#[test]
fn llama_left_padded_batch_generates_as_transformers() {
    check_batch_generation("llama");
}

#[test]
fn phi3_left_padded_batch_generates_as_transformers() {
    check_batch_generation("phi3");
}

/// Sampling: reproducible for a seed and varied across seeds; with top-k 1, or a top-p below the best token's
/// probability, or a temperature near 0, it is greedy decoding.
#[test]
fn sampling_is_seeded_and_reduces_to_greedy_at_its_limits() {
    let dir = oracle().join("llama");
    let io = common::read(&dir.join("io.safetensors"));
    let prompt = common::get(&io, "prompt_ids");
    let greedy = tokens(common::get(&io, "greedy"));
    let (_vs, model) = load(&dir, AttentionImpl::Sdpa);
    let embeds = model.embed_tokens(prompt).unwrap();
    let with = |s: Sampling| {
        let opts = GenerateOptions {
            sampling: Some(s),
            ..GenerateOptions::greedy(12, &[])
        };
        generate(&model, &embeds, None, &opts).unwrap().remove(0)
    };
    let free = |seed| Sampling {
        temperature: 1.5,
        top_k: 0,
        top_p: 1.0,
        seed,
    };
    assert_eq!(with(free(7)), with(free(7)));
    let draws: std::collections::HashSet<Vec<i64>> = (0..6).map(|s| with(free(s))).collect();
    assert!(draws.len() > 1, "six seeds gave one continuation");
    assert_eq!(
        with(Sampling {
            top_k: 1,
            ..free(3)
        }),
        greedy
    );
    assert_eq!(
        with(Sampling {
            top_p: 1e-9,
            ..free(3)
        }),
        greedy
    );
    assert_eq!(
        with(Sampling {
            temperature: 1e-4,
            ..free(3)
        }),
        greedy
    );
    let bad = GenerateOptions {
        sampling: Some(Sampling {
            top_p: 0.0,
            ..free(1)
        }),
        ..GenerateOptions::greedy(4, &[])
    };
    assert!(matches!(
        generate(&model, &embeds, None, &bad),
        Err(ModelError::Input(_))
    ));
}

/// The top-k and top-p filters keep exactly the tokens HF's `TopKLogitsWarper` and `TopPLogitsWarper` keep,
/// written out here on a small distribution: probabilities 0.5, 0.25, 0.15, 0.1 (ascending cumulative 0.1,
/// 0.25, 0.5, 1.0).
#[test]
fn top_k_and_top_p_keep_what_transformers_keeps() {
    let probs = [0.1f64, 0.5, 0.15, 0.25];
    let logits = Tensor::from_slice(&probs.map(f64::ln))
        .to_kind(Kind::Float)
        .view([1, 4]);
    let kept = |s: Sampling| -> Vec<bool> {
        let p = filtered_probs(&logits, &s);
        Vec::<f32>::try_from(p.view([-1]))
            .unwrap()
            .iter()
            .map(|&v| v > 0.0)
            .collect()
    };
    let base = Sampling {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };
    assert_eq!(kept(base), [true; 4]);
    assert_eq!(
        kept(Sampling { top_k: 2, ..base }),
        [false, true, false, true]
    );
    // 1 - 0.8 = 0.2: the 0.1 token (cumulative 0.1 <= 0.2) goes, the 0.15 one (0.25) stays.
    assert_eq!(
        kept(Sampling { top_p: 0.8, ..base }),
        [false, true, true, true]
    );
    // 1 - 0.6 = 0.4: cumulative 0.1 and 0.25 go; 0.5 stays.
    assert_eq!(
        kept(Sampling { top_p: 0.6, ..base }),
        [false, true, false, true]
    );
    assert_eq!(
        kept(Sampling { top_p: 0.1, ..base }),
        [false, true, false, false]
    );
    // Renormalised over what is kept.
    let p =
        Vec::<f32>::try_from(filtered_probs(&logits, &Sampling { top_k: 2, ..base }).view([-1]))
            .unwrap();
    assert!(
        (p[1] - 2.0 / 3.0).abs() < 1e-6 && (p[3] - 1.0 / 3.0).abs() < 1e-6,
        "{p:?}"
    );
}
