//! Llama against transformers 5.23 `LlamaForCausalLM` (fp32, eager attention, tiny random configs): logits and
//! gradients with a right-padded batch, with and without GQA, with linear / llama3 / dynamic RoPE scaling, with
//! tied embeddings; config.json in the transformers 4 and 5 forms; shape-only parameter counts and key sets of
//! the published Llama-2-7B / Llama-3-8B configs against transformers on the meta device.
mod common;
mod llm_support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use m3d_models::llama::LlamaConfig;
use m3d_models::llm::{
    greedy_generate, AttentionImpl, CausalLm, GenerateInput, LlmConfig, RopeParameters, RopeScaling,
};
use m3d_models::ModelError;
use m3d_models::VarBuilder;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use llm_support::{check_parity_both_kernels, check_shape_only_count, load};

fn parity_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let cases = [
        "llama_mha",
        "llama_gqa",
        "llama_linear",
        "llama_llama3",
        "llama_dynamic",
        "llama_tied",
    ];
    llm_support::parity_dir(&DIR, "llama-parity", &cases)
}

fn parity(case: &str) {
    check_parity_both_kernels(parity_dir(), case);
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
    assert!(model.lm_head.is_none());
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
    let counts = llm_support::published_param_counts("llama-counts");
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

/// What a caller can get wrong is a typed error, not a libtorch panic: an empty sequence (before, a panic
/// in the dynamic RoPE), ids outside the vocabulary; and f32 prompt embeddings run in a bf16 model (before,
/// a dtype-mismatch panic in the first projection), giving the tokens the bf16 ids give.
#[test]
fn llama_rejects_bad_inputs_and_casts_prompt_embeddings() {
    tch::manual_seed(0);
    let cfg = LlmConfig::Llama(LlamaConfig {
        rope_scaling: Some(RopeParameters::dynamic(2.0)),
        ..LlamaConfig::debug()
    });
    let mut vs = VarStore::new(Device::Cpu);
    let model = CausalLm::new(&VarBuilder::new(&vs), &cfg).unwrap();
    let ids = |v: &[i64]| Tensor::from_slice(v).view([1, -1]);
    let empty = Tensor::zeros([1, 0], (Kind::Int64, Device::Cpu));
    let err = model.forward(&empty, None, None, false).unwrap_err();
    assert!(matches!(err, ModelError::Input(_)), "{err}");
    let empty_embeds = Tensor::zeros([1, 0, 64], (Kind::Float, Device::Cpu));
    let err = model
        .forward_embeds(&empty_embeds, None, None, false)
        .unwrap_err();
    assert!(matches!(err, ModelError::Shape { .. }), "{err}");
    for bad in [[1, 128], [1, -1]] {
        let err = model.forward(&ids(&bad), None, None, false).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
    }

    // A refused cached step (another batch size) leaves the cache usable (before, the first layer's
    // entries were dropped on the way to the error).
    let mut cache = model.new_cache();
    let _ = model
        .forward(&ids(&[1, 5, 7]), None, Some(&mut cache), false)
        .unwrap();
    let batch2 = Tensor::from_slice(&[3i64, 4]).view([2, 1]);
    let err = model
        .forward(&batch2, None, Some(&mut cache), false)
        .unwrap_err();
    assert!(matches!(err, ModelError::Input(_)), "{err}");
    assert_eq!(cache.seq_len(), 3);
    let _ = model
        .forward(&ids(&[9]), None, Some(&mut cache), false)
        .unwrap();
    assert_eq!(cache.seq_len(), 4);

    vs.bfloat16();
    let prompt = ids(&[1, 5, 7]);
    let from_ids =
        greedy_generate(&model, GenerateInput::Ids(prompt.shallow_clone()), 4, &[]).unwrap();
    let embeds = model.embed_tokens(&prompt).unwrap().to_kind(Kind::Float);
    let from_f32 = greedy_generate(&model, GenerateInput::Embeds(embeds), 4, &[]).unwrap();
    assert_eq!(from_f32, from_ids);
}
