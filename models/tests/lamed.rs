//! M3D-LaMed against a composition of transformers' LlamaForCausalLM, MONAI's ViT, a torch projector and the
//! torch SegVol oracle with the same weights: the reference data pipeline's ids and labels, the added-token
//! rows, logits, LM loss, segmentation prompts / logits / losses, gradients of the total loss, greedy
//! generation with an image; and parameter counts of the published configurations without allocating.
mod common;

use std::collections::HashMap;
use std::sync::Mutex;

use m3d_models::lamed::{
    build_example, causal_lm_loss, collate, extend_llm_checkpoint, extend_token_rows, Lamed,
    LamedBatch, LamedConfig, LamedExample, LamedTokens, SelectFeature, IGNORE_INDEX,
};
use m3d_models::llm::LlmConfig;
use m3d_models::precision::Precision;
use m3d_models::projector::ProjectorType;
use m3d_models::weights::{load_file_into, read_tensors, LoadOptions};
use m3d_models::{ModelError, VarBuilder};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// The tests of this file run one at a time, so the RSS measurement sees only its own allocations.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// max |a - b| over the positions where `mask` (B, T) is 1, for (B, T, X) tensors.
fn masked_max_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let m = mask.to_kind(Kind::Double).unsqueeze(-1);
    ((a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs() * m)
        .max()
        .double_value(&[])
}

fn vec_i64(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.flatten(0, -1).to_kind(Kind::Int64)).unwrap()
}

#[derive(serde::Deserialize)]
struct OracleExample {
    question_ids: Vec<i64>,
    full_ids: Vec<i64>,
    input_ids: Vec<i64>,
    attention_mask: Vec<i64>,
    labels: Vec<i64>,
}

#[test]
fn lamed_matches_transformers() {
    let _guard = serial();
    let dir = common::run_oracle("lamed_oracle.py", &[]);
    let dir = dir.path();
    let cfg = LamedConfig::debug();
    assert_eq!(cfg.tokens, LamedTokens::after(128));

    // The reference data pipeline: truncation, padding, EOS, label masking.
    let examples: Vec<OracleExample> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("examples.json")).unwrap()).unwrap();
    let built: Vec<LamedExample> = examples
        .iter()
        .map(|e| build_example(&e.question_ids, &e.full_ids, 20, 0, 2).unwrap())
        .collect();
    for (ours, theirs) in built.iter().zip(&examples) {
        assert_eq!(ours.input_ids, theirs.input_ids);
        assert_eq!(ours.attention_mask, theirs.attention_mask);
        assert_eq!(ours.labels, theirs.labels);
    }
    let (input_ids, attention_mask, labels) = collate(&built, Device::Cpu).unwrap();
    let io = common::read(&dir.join("io.safetensors"));
    assert!(input_ids.equal(common::get(&io, "input_ids")));
    assert!(labels.equal(common::get(&io, "labels")));

    // Going from the base LLM to LaMed: 4 rows at the mean of the old ones, in both matrices.
    let base = read_tensors(&dir.join("base.safetensors")).unwrap();
    let extended: HashMap<String, Tensor> = extend_llm_checkpoint(base, 128)
        .unwrap()
        .into_iter()
        .collect();
    let weights: HashMap<String, Tensor> = read_tensors(&dir.join("weights.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    for k in ["model.embed_tokens.weight", "lm_head.weight"] {
        assert_eq!(extended[k].size(), [132, 64]);
        common::assert_close(k, &extended[k], &weights[k], 1e-6);
    }

    let vs = VarStore::new(Device::Cpu);
    let model = Lamed::new(&VarBuilder::new(&vs), &cfg).unwrap();
    load_file_into(
        &vs,
        &dir.join("weights.safetensors"),
        &LoadOptions::default(),
    )
    .unwrap();

    let batch = LamedBatch {
        images: common::get(&io, "images").shallow_clone(),
        input_ids,
        attention_mask: Some(attention_mask.shallow_clone()),
        labels: Some(labels),
        segs: Some(common::get(&io, "segs").shallow_clone()),
    };
    let out = model.forward_t(&batch, false).unwrap();
    // Padding positions are not compared: HF numbers them by index, generate-style code by real tokens;
    // no loss or prediction reads them.
    let d_logits = masked_max_diff(&out.logits, common::get(&io, "logits"), &attention_mask);
    let d_hidden = masked_max_diff(&out.hidden, common::get(&io, "hidden"), &attention_mask);
    assert!(d_logits < 1e-4, "logits differ by {d_logits:e}");
    assert!(d_hidden < 1e-4, "hidden states differ by {d_hidden:e}");

    let seg = out.seg.as_ref().expect("segmentation branch");
    assert_eq!(seg.sample_ids, vec_i64(common::get(&io, "seg_ids")));
    common::assert_close(
        "seg prompts",
        &seg.prompts,
        common::get(&io, "prompts"),
        1e-4,
    );
    // The third sample has a mask but no [SEG]: its prompt is zero.
    assert_eq!(seg.prompts.get(2).abs().max().double_value(&[]), 0.0);
    common::assert_close(
        "seg logits",
        &seg.logits,
        common::get(&io, "seg_logits"),
        1e-4,
    );
    let lm_loss = out.lm_loss.as_ref().unwrap();
    common::assert_rel_close("lm loss", lm_loss, common::get(&io, "lm_loss"), 1e-5);
    common::assert_rel_close("dice", &seg.dice, common::get(&io, "dice"), 1e-5);
    common::assert_rel_close("bce", &seg.bce, common::get(&io, "bce"), 1e-5);
    let loss = out.loss.as_ref().unwrap();
    common::assert_rel_close("total loss", loss, common::get(&io, "loss"), 1e-5);

    loss.backward();
    let worst = common::assert_grads_same_support(&vs, &io, 1e-4, 100);

    let prompt = common::get(&io, "gen_prompt");
    let images = common::get(&io, "images").narrow(0, 0, 1);
    let generated = model.generate(prompt, Some(&images), 8, &[2]).unwrap();
    assert_eq!(generated, vec_i64(common::get(&io, "gen_output")));
    // Batched with a shorter prompt (two question tokens fewer) about another image: each row as alone.
    let t = prompt.size()[1];
    let shorter = prompt.narrow(1, 0, t - 2);
    let two = common::get(&io, "images").narrow(0, 0, 2);
    let alone = model
        .generate(&shorter, Some(&two.narrow(0, 1, 1)), 8, &[2])
        .unwrap();
    let opts = m3d_models::generate::GenerateOptions::greedy(8, &[2]);
    let batch = model
        .generate_batch(&[prompt.shallow_clone(), shorter], Some(&two), &opts)
        .unwrap();
    assert_eq!(batch, vec![generated.clone(), alone]);

    // The reference's generate(seg_enable=True): same tokens, and the mask from the averaged hidden states
    // that preceded each [SEG]. 1e-5: float32 SegVol logits of order 1, where the reference decodes with a
    // KV cache and we re-run the finished sequence (the same sums in another order).
    tch::no_grad(|| {
        let head = common::get(&io, "seg_gen_lm_head");
        let mut vars = vs.variables();
        vars.get_mut("lm_head.weight").unwrap().copy_(head);
    });
    let (said, mask) = model.generate_with_seg(prompt, &images, 10, &[2]).unwrap();
    assert_eq!(said, vec_i64(common::get(&io, "seg_gen_output")));
    let mask = mask.expect("the answer has [SEG]");
    let d_mask = common::max_abs_diff(&mask, common::get(&io, "seg_gen_logits"));
    assert!(
        d_mask < 1e-5,
        "seg mask differs from the reference's by {d_mask:e}"
    );

    println!(
        "lamed: max |logits - oracle| = {d_logits:e}, |hidden| = {d_hidden:e}, \
         |lm loss| = {:e}, worst grad rel diff = {worst:e}, generated {generated:?}",
        common::max_abs_diff(lm_loss, common::get(&io, "lm_loss"))
    );
}

#[test]
fn parameter_counts_of_published_configs_without_allocating() {
    let _guard = serial();
    let dir = common::run_oracle("lamed_oracle.py", &["count"]);
    let counts: HashMap<String, HashMap<String, i64>> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("counts.json")).unwrap())
            .unwrap();
    let presets = [
        ("llama2_7b", LamedConfig::llama2_7b()),
        ("llama3_8b", LamedConfig::llama3_8b()),
        ("phi3_mini", LamedConfig::phi3_mini()),
    ];
    for (name, cfg) in presets {
        let before = common::rss_kb() << 10;
        let vs = VarStore::new(Device::Cpu);
        let model = Lamed::new(&VarBuilder::shape_only(&vs), &cfg).unwrap();
        let vars = vs.variables();
        let state: i64 = vars.values().map(|t| t.numel() as i64).sum();
        // The one persistent buffer: SegVol's (3, 384) random Fourier matrix.
        let buffers: i64 = vars
            .iter()
            .filter(|(k, _)| k.ends_with("positional_encoding_gaussian_matrix"))
            .map(|(_, t)| t.numel() as i64)
            .sum();
        let grown = (common::rss_kb() << 10) - before;
        let want = &counts[name];
        println!(
            "{name}: {state} values in the state dict ({} parameters), {} keys, RSS +{} MiB",
            state - buffers,
            vars.len(),
            grown >> 20
        );
        assert_eq!(state, want["state"], "{name}: state-dict size");
        assert_eq!(state - buffers, want["params"], "{name}: parameters");
        assert_eq!(vars.len() as i64, want["keys"], "{name}: keys");
        assert!(
            grown < 256 << 20,
            "{name}: building shape-only grew RSS by {} MiB",
            grown >> 20
        );
        drop(model);
    }
}

#[test]
fn presets_and_reference_config_json() {
    let _guard = serial();
    let l2 = LamedConfig::llama2_7b();
    assert_eq!(l2.llm.vocab_size(), 32004);
    assert_eq!(l2.tokens.seg, 32003);
    assert_eq!(l2.tokens.im_patch, 32000);
    assert_eq!(l2.num_image_tokens(), 256);
    assert_eq!(LamedConfig::llama3_8b().llm.vocab_size(), 128_260);
    assert_eq!(LamedConfig::phi3_mini().llm.vocab_size(), 32015);
    assert_eq!(LamedConfig::phi3_mini().llm.hidden_size(), 3072);

    // A released-style config.json: HF Llama fields plus LaMed's flat fields.
    let json = serde_json::json!({
        "model_type": "lamed_llama", "vocab_size": 32004, "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2,
        "image_channel": 1, "image_size": [32, 256, 256], "patch_size": [4, 16, 16],
        "vision_tower": "vit3d", "vision_select_layer": -1, "vision_select_feature": "patch",
        "mm_projector_type": "spp", "proj_layer_type": "mlp", "proj_layer_num": 2,
        "proj_pooling_type": "spatial", "proj_pooling_size": 2, "mm_hidden_size": 768,
        "segmentation_module": "segvol", "seg_token_id": 32003
    });
    let parsed = LamedConfig::from_hf_json(&json).unwrap();
    assert!(matches!(parsed.llm, LlmConfig::Llama(_)));
    assert_eq!(parsed.tokens, l2.tokens);
    assert_eq!(parsed.projector, l2.projector);
    assert!(parsed.seg.is_some());
    assert_eq!(parsed.num_image_tokens(), 256);
    let mut no_seg = json.clone();
    no_seg["segmentation_module"] = serde_json::Value::Null;
    no_seg["model_type"] = "lamed_mistral".into();
    assert!(matches!(
        LamedConfig::from_hf_json(&no_seg),
        Err(ModelError::Config(_))
    ));
}

#[test]
fn released_config_json_round_trips() {
    let _guard = serial();
    // The published shapes: the flat fields alone describe the model, as the reference reads them.
    for cfg in [LamedConfig::llama2_7b(), LamedConfig::phi3_mini()] {
        let json = cfg.to_hf_json().unwrap();
        let arch = json["architectures"][0].as_str().unwrap();
        assert!(
            arch == "LamedLlamaForCausalLM" || arch == "LamedPhi3ForCausalLM",
            "{arch}"
        );
        assert_eq!(json["seg_token_id"], cfg.tokens.seg);
        assert_eq!(json["mm_projector_type"], "spp");
        assert!(json.get("m3d_vision").is_none() && json.get("m3d_seg").is_none());
        let back = LamedConfig::from_config_json(&json).unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&cfg).unwrap()
        );
    }
    // A small model keeps the shapes the reference hard-codes under m3d_* keys, and round-trips too.
    let mut tiny = LamedConfig::tiny(100, true);
    let json = tiny.to_hf_json().unwrap();
    assert!(json.get("m3d_vision").is_some() && json.get("m3d_seg").is_some());
    let back = LamedConfig::from_config_json(&json).unwrap();
    assert_eq!(
        serde_json::to_value(&back).unwrap(),
        serde_json::to_value(&tiny).unwrap()
    );
    // Box tokens that do not sit just before [SEG] cannot be written in the released layout.
    tiny.tokens.bx_start += 1;
    assert!(tiny.to_hf_json().is_err());
}

#[test]
fn labels_when_pad_is_eos() {
    let _guard = serial();
    // Llama-3 style (pad = eos = 9): pads are ignored, yet the EOS after the answer is scored.
    let q = [1, 7, 7, 5];
    let full = [1, 7, 7, 5, 6, 9, 3];
    let e = build_example(&q, &full, 10, 9, 9).unwrap();
    assert_eq!(e.input_ids, vec![1, 7, 7, 5, 6, 9, 3, 9, 9, 9]);
    assert_eq!(e.attention_mask, vec![1, 1, 1, 1, 1, 1, 1, 0, 0, 0]);
    let i = IGNORE_INDEX;
    // (the answer's own 9 is masked too: the reference masks every id equal to pad before restoring EOS)
    assert_eq!(e.labels, vec![i, i, i, i, 6, i, 3, 9, i, i]);
    // Llama-2 style (pad 0 != eos 2).
    let e = build_example(&q, &full, 8, 0, 2).unwrap();
    assert_eq!(e.input_ids, vec![1, 7, 7, 5, 6, 9, 3, 2]);
    assert_eq!(e.labels, vec![i, i, i, i, 6, 9, 3, 2]);
    assert!(collate(
        &[e.clone(), build_example(&q, &full, 9, 0, 2).unwrap()],
        Device::Cpu
    )
    .is_err());
}

#[test]
fn token_rows_loss_and_input_checks() {
    let _guard = serial();
    let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 100.0, 100.0]).view([3, 2]);
    let grown = extend_token_rows(&w, 2, 2).unwrap();
    assert_eq!(
        Vec::<f32>::try_from(grown.flatten(0, -1)).unwrap(),
        vec![1.0, 2.0, 3.0, 4.0, 2.0, 3.0, 2.0, 3.0]
    );
    assert!(extend_token_rows(&w, 4, 1).is_err());

    // Shifted CE with ignore: only the second prediction (label 1 at t = 2) is scored.
    let logits = Tensor::from_slice(&[0.0f32, 0.0, 2.0, 0.0, 0.0, 0.0]).view([1, 3, 2]);
    let labels = Tensor::from_slice(&[IGNORE_INDEX, IGNORE_INDEX, 1]).view([1, 3]);
    let l = causal_lm_loss(&logits, &labels).unwrap().double_value(&[]);
    assert!((l - (2.0f64.exp() + 1.0).ln() + 0.0).abs() < 1e-6, "{l}");

    let cfg = LamedConfig::debug();
    let vs = VarStore::new(Device::Cpu);
    let model = Lamed::new(&VarBuilder::new(&vs), &cfg).unwrap();
    let images = Tensor::zeros([1, 1, 8, 32, 32], (Kind::Float, Device::Cpu));
    let ok = Tensor::from_slice(&[1i64, 128, 128, 128, 128, 5]).view([1, 6]);
    assert_eq!(
        model
            .input_embeds(&ok, Some(&images), false)
            .unwrap()
            .size(),
        [1, 6, 64]
    );
    let wrong = Tensor::from_slice(&[1i64, 128, 5, 128, 128, 5]).view([1, 6]);
    assert!(matches!(
        model.input_embeds(&wrong, Some(&images), false),
        Err(ModelError::Input(_))
    ));
    let short = Tensor::from_slice(&[1i64, 128, 128]).view([1, 3]);
    assert!(model.input_embeds(&short, Some(&images), false).is_err());
}

#[test]
fn generation_with_seg_returns_a_mask() {
    let _guard = serial();
    let cfg = LamedConfig::debug();
    let vs = VarStore::new(Device::Cpu);
    let model = Lamed::new(&VarBuilder::new(&vs), &cfg).unwrap();
    let images = Tensor::randn([1, 1, 8, 32, 32], (Kind::Float, Device::Cpu));
    let prompt = Tensor::from_slice(&[1i64, 128, 128, 128, 128, 5, 6]).view([1, 7]);
    // A random model does not say [SEG]: no mask.
    let (ids, mask) = model.generate_with_seg(&prompt, &images, 3, &[]).unwrap();
    if !ids.iter().skip(1).any(|&t| t == cfg.tokens.seg) {
        assert!(mask.is_none());
    }
    // A model that always says [SEG]: blocks that add nothing to the residual stream, equal embeddings (so
    // the final state is all ones after the norm) and an LM head that only scores [SEG].
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                let _ = t.zero_();
            } else if name == "model.embed_tokens.weight" {
                let _ = t.fill_(0.5);
            } else if name == "lm_head.weight" {
                let _ = t.zero_();
                let _ = t.get(cfg.tokens.seg).fill_(1.0);
            }
        }
    });
    let (ids, mask) = model.generate_with_seg(&prompt, &images, 3, &[]).unwrap();
    assert_eq!(ids, vec![cfg.tokens.seg; 3]);
    let mask = mask.expect("a mask for an answer with [SEG]");
    assert_eq!(mask.size(), [1, 1, 8, 32, 32]);
    assert!(bool::try_from(mask.isfinite().all()).unwrap());
}

#[test]
fn trains_in_bf16() {
    let _guard = serial();
    let cfg = LamedConfig::debug();
    let mut vs = VarStore::new(Device::Cpu);
    let model = Lamed::new(&VarBuilder::new(&vs), &cfg).unwrap();
    Precision::Bf16.apply(&mut vs).unwrap();
    let q = [1i64, 128, 128, 128, 128, 9, 10];
    let full = [1i64, 128, 128, 128, 128, 9, 10, 11, 131, 12];
    let examples = vec![build_example(&q, &full, 12, 0, 2).unwrap(); 2];
    let (input_ids, attention_mask, labels) = collate(&examples, Device::Cpu).unwrap();
    let batch = LamedBatch {
        images: Tensor::randn([2, 1, 8, 32, 32], (Kind::Float, Device::Cpu)),
        input_ids,
        attention_mask: Some(attention_mask),
        labels: Some(labels),
        segs: Some(Tensor::rand([2, 1, 8, 32, 32], (Kind::Float, Device::Cpu)).gt(0.5)),
    };
    let out = model.forward_t(&batch, true).unwrap();
    assert_eq!(out.logits.kind(), Kind::BFloat16);
    let loss = out.loss.unwrap();
    assert_eq!(loss.kind(), Kind::Float);
    assert!(loss.double_value(&[]).is_finite());
    assert_eq!(out.seg.unwrap().sample_ids, vec![0, 1]);
    loss.backward();
    let g = vs.variables()["model.seg_projector.0.weight"].grad();
    assert!(g.defined() && g.abs().max().double_value(&[]) > 0.0);
}

/// `cls_patch` with a projector that keeps every token hands the LLM the CLS token too, so the prompt
/// reserves one more `<im_patch>` (before, the splice grew the sequence by one and the attention mask and
/// labels no longer lined up with it); `spp` cannot pool a CLS token and is refused. Hidden states that do
/// not match their ids are an error for the `[SEG]` prompts, not a libtorch panic.
#[test]
fn cls_patch_image_tokens_and_seg_prompt_checks() {
    let _guard = serial();
    let mut cfg = LamedConfig::debug();
    cfg.vision_select_feature = SelectFeature::ClsPatch;
    assert!(matches!(cfg.validate(), Err(ModelError::Config(m)) if m.contains("spp")));
    cfg.projector.mm_projector_type = ProjectorType::Linear;
    cfg.validate().unwrap();
    let n = cfg.num_image_tokens();
    assert_eq!(n, cfg.vision.num_patches() + 1);
    let vs = VarStore::new(Device::Cpu);
    let model = Lamed::new(&VarBuilder::new(&vs), &cfg).unwrap();
    let mut ids = vec![1i64];
    ids.extend(std::iter::repeat_n(cfg.tokens.im_patch, n as usize));
    ids.extend([5, 6]);
    let t = ids.len() as i64;
    let ids = Tensor::from_slice(&ids).view([1, t]);
    let images = Tensor::zeros([1, 1, 8, 32, 32], (Kind::Float, Device::Cpu));
    let embeds = model.input_embeds(&ids, Some(&images), false).unwrap();
    assert_eq!(embeds.size(), [1, t, 64]);

    let seg = model.seg.as_ref().unwrap();
    let short = Tensor::zeros([1, t - 1, 64], (Kind::Float, Device::Cpu));
    assert!(matches!(
        model.seg_prompts(seg, &short, &ids, false),
        Err(ModelError::Shape { .. })
    ));
}
