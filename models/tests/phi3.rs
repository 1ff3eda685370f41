//! Phi-3 against transformers 5.23 `Phi3ForCausalLM` (fp32, eager attention, tiny random configs): logits and
//! gradients with a right-padded batch, with GQA and a sliding window shorter than the sequence, and without
//! GQA; the published Phi-3-mini-4k config.json; unsupported RoPE variants rejected; shape-only parameter
//! count and key set of Phi-3-mini-4k against transformers on the meta device.
mod common;
mod llm_support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use m3d_models::llm::{AttentionImpl, LlmConfig};
use m3d_models::phi3::Phi3Config;
use m3d_models::ModelError;

use llm_support::{check_parity_both_kernels, check_shape_only_count, load};

fn parity_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    llm_support::parity_dir(&DIR, "phi3-parity", &["phi3", "phi3_mha"])
}

fn parity(case: &str) {
    check_parity_both_kernels(parity_dir(), case);
}

#[test]
fn phi3_gqa_sliding_window_matches_transformers() {
    let cfg = LlmConfig::from_file(&parity_dir().join("phi3/config.json")).unwrap();
    assert!(matches!(&cfg, LlmConfig::Phi3(c) if c.sliding_window == Some(4)));
    parity("phi3");
}

#[test]
fn phi3_mha_matches_transformers() {
    parity("phi3_mha");
}

/// The fused `gate_up_proj` order matters: swapping the gate and up halves is caught.
#[test]
fn phi3_parity_detects_swapped_gate_up_halves() {
    let dir = parity_dir().join("phi3");
    let (vs, model) = load(&dir, AttentionImpl::Eager);
    let io = common::read(&dir.join("io.safetensors"));
    let mut w = vs.variables()["model.layers.1.mlp.gate_up_proj.weight"].shallow_clone();
    let halves = w.chunk(2, 0);
    let swapped = tch::Tensor::cat(&[&halves[1], &halves[0]], 0);
    tch::no_grad(|| w.copy_(&swapped));
    let ids = common::get(&io, "input_ids");
    let mask = common::get(&io, "attention_mask");
    let logits = model.forward(ids, Some(mask), None, false).unwrap();
    let d = common::max_abs_diff(&logits, common::get(&io, "logits"));
    assert!(d > 1e-2, "swapped gate/up went unnoticed (diff {d:e})");
}

#[test]
fn phi3_config_published_and_rejected_forms() {
    let published: LlmConfig = serde_json::from_str(
        r#"{"_name_or_path": "Phi-3-mini-4k-instruct", "architectures": ["Phi3ForCausalLM"],
            "attention_dropout": 0.0, "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config"},
            "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu",
            "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
            "max_position_embeddings": 4096, "model_type": "phi3", "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 32, "original_max_position_embeddings": 4096,
            "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": null,
            "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16", "transformers_version": "4.40.2", "use_cache": true,
            "attention_bias": false, "vocab_size": 32064}"#,
    )
    .unwrap();
    published.validate().unwrap();
    let LlmConfig::Phi3(p) = &published else {
        panic!("not phi3")
    };
    assert_eq!(
        Phi3Config {
            num_key_value_heads: None,
            ..p.clone()
        },
        Phi3Config::phi3_mini_4k()
    );
    assert_eq!(published.hidden_size(), 3072);
    assert_eq!(published.eos_token_ids(), vec![32000]);

    for (rope, needle) in [
        (
            r#""rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}"#,
            "longrope",
        ),
        (r#""rope_scaling": {"type": "su"}"#, "su"),
        (
            r#""rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}"#,
            "linear",
        ),
        (
            r#""rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}"#,
            "partial_rotary_factor",
        ),
    ] {
        let cfg: LlmConfig =
            serde_json::from_str(&format!(r#"{{"model_type": "phi3", {rope}}}"#)).unwrap();
        match cfg.validate() {
            Err(ModelError::Config(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("{rope}: expected a config error, got {other:?}"),
        }
    }
}

#[test]
fn phi3_shape_only_parameter_count_matches_transformers() {
    let counts = llm_support::published_param_counts("phi3-counts");
    let n = check_shape_only_count(
        &counts,
        "phi3_mini_4k",
        &LlmConfig::Phi3(Phi3Config::phi3_mini_4k()),
    );
    assert_eq!(n, 3_821_079_552);
}
