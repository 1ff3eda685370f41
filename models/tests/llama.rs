//! Llama against transformers 5.23 `LlamaForCausalLM` (fp32, eager attention, tiny random configs): logits and
//! gradients with a right-padded batch, with and without GQA, with linear / llama3 / dynamic RoPE scaling, with
//! tied embeddings; config.json in the transformers 4 and 5 forms; shape-only parameter counts and key sets of
//! the published Llama-2-7B / Llama-3-8B configs against transformers on the meta device.
mod common;
mod llm_support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use m3d_models::llama::LlamaConfig;
use m3d_models::llm::{AttentionImpl, CausalLm, LlmConfig, RopeScaling};
use m3d_models::ModelError;
use m3d_models::VarBuilder;
use tch::nn::VarStore;
use tch::{Device, Kind};

use llm_support::{check_parity, check_shape_only_count, load, run_oracle_into};

fn parity_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        run_oracle_into(
            "llama-parity",
            "llm_parity.py",
            &[
                "llama_mha",
                "llama_gqa",
                "llama_linear",
                "llama_llama3",
                "llama_dynamic",
                "llama_tied",
            ],
        )
    })
}

fn parity(case: &str) {
    let dir = parity_dir().join(case);
    for imp in [AttentionImpl::Eager, AttentionImpl::Sdpa] {
        let (d_logits, d_grad) = check_parity(&dir, imp);
        println!(
            "{case} {imp:?}: logits max abs diff {d_logits:.2e}, grads max rel diff {d_grad:.2e}"
        );
    }
}

#[test]
fn llama_mha_with_biases_and_head_dim_matches_transformers() {
    parity("llama_mha");
}

#[test]
fn llama_gqa_matches_transformers() {
    parity("llama_gqa");
}

#[test]
fn llama_linear_rope_matches_transformers() {
    parity("llama_linear");
}

#[test]
fn llama_llama3_rope_legacy_config_matches_transformers() {
    let cfg = LlmConfig::from_file(&parity_dir().join("llama_llama3/config.json")).unwrap();
    let LlmConfig::Llama(c) = &cfg else {
        panic!("not a llama config")
    };
    assert!(
        c.rope_parameters.is_none() && c.rope_scaling.is_some(),
        "legacy form expected"
    );
    let rope = c.rope().unwrap();
    assert_eq!(rope.theta, 10_000.0);
    assert!(matches!(
        rope.scaling,
        RopeScaling::Llama3 { factor, original_max_position_embeddings: 32, .. } if factor == 8.0
    ));
    parity("llama_llama3");
}

#[test]
fn llama_dynamic_rope_matches_transformers() {
    parity("llama_dynamic");
}

#[test]
fn llama_tied_embeddings_match_transformers() {
    let (vs, model) = load(&parity_dir().join("llama_tied"), AttentionImpl::Sdpa);
    assert!(!vs.variables().contains_key("lm_head.weight"));
    assert!(matches!(&model, CausalLm::Llama(m) if m.lm_head.is_none()));
    parity("llama_tied");
}

/// The parity check can fail: a transposed square weight moves the logits far beyond the tolerance.
#[test]
fn llama_parity_detects_a_transposed_weight() {
    let dir = parity_dir().join("llama_gqa");
    let (vs, model) = load(&dir, AttentionImpl::Eager);
    let io = common::read(&dir.join("io.safetensors"));
    let ids = common::get(&io, "input_ids");
    let mask = common::get(&io, "attention_mask");
    let mut w = vs.variables()["model.layers.0.self_attn.o_proj.weight"].shallow_clone();
    tch::no_grad(|| w.copy_(&w.transpose(0, 1).contiguous()));
    let logits = model.forward(ids, Some(mask), None, false).unwrap();
    let d = common::max_abs_diff(&logits, common::get(&io, "logits"));
    assert!(d > 1e-2, "transposed o_proj went unnoticed (diff {d:e})");
}

#[test]
fn llama_config_forms_and_errors() {
    // transformers 5 writes `rope_parameters`; 4.x wrote `rope_scaling` with `type` and a top-level theta.
    let new: LlmConfig = serde_json::from_str(
        r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}}"#,
    )
    .unwrap();
    let old: LlmConfig = serde_json::from_str(
        r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "rope_theta": 500000,
            "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": [128001, 128009]}"#,
    )
    .unwrap();
    let (LlmConfig::Llama(new), LlmConfig::Llama(old_c)) = (&new, &old) else {
        panic!("not llama")
    };
    assert_eq!(new.rope().unwrap(), old_c.rope().unwrap());
    assert_eq!(
        new.rope().unwrap().scaling,
        RopeScaling::Linear { factor: 2.0 }
    );
    assert_eq!(old.eos_token_ids(), vec![128_001, 128_009]);

    let bad: LlmConfig = serde_json::from_str(
        r#"{"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
    )
    .unwrap();
    assert!(matches!(bad.validate(), Err(ModelError::Config(m)) if m.contains("yarn")));
    let bad_heads = LlmConfig::Llama(LlamaConfig {
        num_key_value_heads: Some(3),
        ..LlamaConfig::debug()
    });
    assert!(matches!(bad_heads.validate(), Err(ModelError::Config(_))));

    // The published Llama-2-7b-chat-hf config.json reads back to the preset.
    let published: LlmConfig = serde_json::from_str(
        r#"{"_name_or_path": "meta-llama/Llama-2-7b-chat-hf", "architectures": ["LlamaForCausalLM"],
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
            "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
            "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
            "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null,
            "rope_theta": 10000.0, "tie_word_embeddings": false, "torch_dtype": "float16",
            "transformers_version": "4.32.0.dev0", "use_cache": true, "vocab_size": 32000}"#,
    )
    .unwrap();
    let LlmConfig::Llama(p) = &published else {
        panic!("not llama")
    };
    assert_eq!(
        LlamaConfig {
            num_key_value_heads: None,
            ..p.clone()
        },
        LlamaConfig::llama2_7b()
    );
    assert_eq!(published.hidden_size(), 4096);
    let mut resized = published.clone();
    resized.set_vocab_size(32004);
    assert_eq!(resized.vocab_size(), 32004);
}

/// Shape-only construction of the published configs: same parameter count, names and shapes as
/// transformers builds on the meta device, with nothing allocated.
#[test]
fn llama_shape_only_parameter_counts_match_transformers() {
    let dir = run_oracle_into("llama-counts", "llm_param_count.py", &[]);
    let counts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("counts.json")).unwrap()).unwrap();
    let n2 = check_shape_only_count(
        &counts,
        "llama2_7b",
        &LlmConfig::Llama(LlamaConfig::llama2_7b()),
    );
    let n3 = check_shape_only_count(
        &counts,
        "llama3_8b",
        &LlmConfig::Llama(LlamaConfig::llama3_8b()),
    );
    assert_eq!((n2, n3), (6_738_415_616, 8_030_261_248));
}

/// bf16 runs end to end (RMSNorm and softmax upcast internally) and stays close to f32.
#[test]
fn llama_runs_in_bf16() {
    let dir = parity_dir().join("llama_gqa");
    let (vs, model) = load(&dir, AttentionImpl::Eager);
    let io = common::read(&dir.join("io.safetensors"));
    let ids = common::get(&io, "input_ids");
    let mask = common::get(&io, "attention_mask");
    let f32_logits = model.forward(ids, Some(mask), None, false).unwrap();
    for imp in [AttentionImpl::Eager, AttentionImpl::Sdpa] {
        let mut cfg = model.config().clone();
        cfg.set_attn_implementation(imp);
        let mut vs2 = VarStore::new(Device::Cpu);
        let m2 = CausalLm::new(&VarBuilder::new(&vs2), &cfg).unwrap();
        vs2.copy(&vs).unwrap();
        vs2.bfloat16();
        let logits = m2.forward(ids, Some(mask), None, false).unwrap();
        assert_eq!(logits.kind(), Kind::BFloat16);
        let d = common::max_abs_diff(&logits, &f32_logits);
        let scale = f32_logits.abs().max().double_value(&[]);
        println!("bf16 {imp:?}: max abs diff to f32 {d:.3} (logit scale {scale:.2})");
        assert!(d < 0.1 * scale, "bf16 logits too far from f32: {d}");
        assert!(!bool::try_from(logits.isnan().any()).unwrap());
    }
}

/// LaMed's LoRA lands on every Linear of the decoder (7 per layer) and not on `lm_head`; fresh adapters
/// (B = 0) leave the logits unchanged.
#[test]
fn llama_lora_targets_every_decoder_linear() {
    let dir = parity_dir().join("llama_gqa");
    let cfg = LlmConfig::from_file(&dir.join("config.json")).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let vb = VarBuilder::new(&vs).with_lora(Some(m3d_models::lora::LoraConfig::m3d_lamed()));
    let model = CausalLm::new(&vb, &cfg).unwrap();
    let opts = m3d_models::weights::LoadOptions::default().allow_missing("lora_");
    m3d_models::weights::load_file_into(&vs, &dir.join("weights.safetensors"), &opts).unwrap();
    let mut adapted: Vec<String> = vs
        .variables()
        .into_keys()
        .filter(|k| k.contains(".lora_A."))
        .collect();
    adapted.sort();
    assert_eq!(adapted.len(), 7 * 2, "{adapted:?}");
    assert!(adapted.iter().all(|k| k.starts_with("model.layers.")));
    let io = common::read(&dir.join("io.safetensors"));
    let ids = common::get(&io, "input_ids");
    let mask = common::get(&io, "attention_mask");
    let logits = model.forward(ids, Some(mask), None, false).unwrap();
    common::assert_close(
        "logits with fresh LoRA",
        &logits,
        common::get(&io, "logits"),
        1e-4,
    );
}
