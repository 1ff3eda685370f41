//! M3D-CLIP against a Python re-creation of the reference `CLIP.py` (tests/oracle/clip_oracle.py): features,
//! logits, loss and gradients for one process, rank 1 of 3 (global and local loss) and the exp() scale;
//! the ViT alone out of a CLIP checkpoint.
mod common;

use std::cell::RefCell;
use std::collections::HashMap;

use m3d_models::clip::{load_options, Gather, LogitScale, M3dClip, M3dClipConfig, SingleProcess};
use m3d_models::vit3d::{monai_load_options, ViT3d};
use m3d_models::weights::{load_file_into, KeyMap, LoadOptions};
use m3d_models::{ModelError, VarBuilder};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use common::{assert_close, assert_rel_close, get, max_abs_diff, read, run_oracle};

/// Rank `rank` of `world`: the other ranks' features are fixed tensors (what this rank's autograd sees of a
/// real all-gather). Serves the image features on the first call and the text features on the second.
struct FakeGather {
    rank: i64,
    world: i64,
    others: RefCell<Vec<Tensor>>,
}

impl Gather for FakeGather {
    fn all_gather(&self, t: &Tensor) -> Tensor {
        let other = self.others.borrow_mut().remove(0);
        let b = t.size()[0];
        let before = other.narrow(0, 0, self.rank * b);
        let after = other.narrow(0, self.rank * b, (self.world - 1 - self.rank) * b);
        Tensor::cat(&[before, t.shallow_clone(), after], 0)
    }
    fn rank(&self) -> i64 {
        self.rank
    }
    fn world_size(&self) -> i64 {
        self.world
    }
}

fn config(dir: &std::path::Path) -> M3dClipConfig {
    m3d_models::error::read_json(&dir.join("config.json")).unwrap()
}

/// Gradients of case `case`: every parameter the oracle has a gradient for matches (1e-4 relative); the
/// others (BERT's unused pooler) have none here either.
fn assert_case_grads(vs: &VarStore, io: &HashMap<String, Tensor>, case: &str) -> f64 {
    let mut worst: f64 = 0.0;
    let mut n = 0;
    for (name, var) in vs.variables() {
        let g = var.grad();
        match io.get(&format!("{case}.grad.{name}")) {
            Some(o) => {
                assert!(g.defined(), "{case}: no gradient for `{name}`");
                if name.ends_with("attention.self.key.bias") {
                    // Softmax ignores key biases: the true gradient is 0, both sides hold rounding noise.
                    assert_close(&format!("{case}: grad {name}"), &g, o, 1e-6);
                    continue;
                }
                assert_rel_close(&format!("{case}: grad {name}"), &g, o, 1e-4);
                let scale = o.abs().max().double_value(&[]).max(1e-12);
                worst = worst.max(max_abs_diff(&g, o) / scale);
                n += 1;
            }
            None => assert!(
                !g.defined() || g.abs().max().double_value(&[]) == 0.0,
                "{case}: `{name}` has a gradient the reference does not"
            ),
        }
    }
    assert!(n > 0);
    worst
}

#[test]
fn clip_matches_reference_features_logits_loss_and_grads() {
    let dir = run_oracle("clip_oracle.py", &[]);
    let io = read(&dir.path().join("io.safetensors"));
    let (images, ids, mask) = (
        get(&io, "images"),
        get(&io, "input_ids"),
        get(&io, "attention_mask"),
    );
    for case in ["single", "global", "local", "exp"] {
        let mut cfg = config(dir.path());
        cfg.local_loss = case == "local";
        cfg.logit_scale = if case == "exp" {
            LogitScale::Exp
        } else {
            LogitScale::Raw
        };
        let vs = VarStore::new(Device::Cpu);
        let clip = M3dClip::new(&VarBuilder::new(&vs), &cfg).unwrap();
        load_file_into(
            &vs,
            &dir.path().join("weights.safetensors"),
            &load_options(),
        )
        .unwrap();
        let fake;
        let gather: &dyn Gather = if case == "global" || case == "local" {
            fake = FakeGather {
                rank: 1,
                world: 3,
                others: RefCell::new(vec![
                    get(&io, "other.image").shallow_clone(),
                    get(&io, "other.text").shallow_clone(),
                ]),
            };
            &fake
        } else {
            &SingleProcess
        };
        let out = clip.forward_t(images, ids, mask, gather, false).unwrap();
        let mut worst: f64 = 0.0;
        for (name, t) in [
            ("image_features", &out.image_features),
            ("text_features", &out.text_features),
            ("logits_per_image", &out.logits_per_image),
            ("logits_per_text", &out.logits_per_text),
            ("logits", &out.logits),
            ("loss", &out.loss.reshape([1])),
        ] {
            let o = get(&io, &format!("{case}.{name}"));
            assert_close(&format!("{case}: {name}"), t, o, 1e-4);
            worst = worst.max(max_abs_diff(t, o));
        }
        // encode_image/encode_text keep every token; token 0 is the feature.
        let all = clip.encode_image(images, false);
        assert_eq!(all.size()[1], cfg.vision.num_tokens());
        assert_close(
            "encode_image[:, 0]",
            &all.select(1, 0),
            &out.image_features,
            1e-6,
        );
        out.loss.backward();
        let g = assert_case_grads(&vs, &io, case);
        println!(
            "{case}: loss {:.6}, max output diff {worst:e}, max grad rel diff {g:e}",
            out.loss.double_value(&[])
        );
    }
}

#[test]
fn vit_loads_from_a_clip_checkpoint() {
    let dir = run_oracle("clip_oracle.py", &[]);
    let io = read(&dir.path().join("io.safetensors"));
    let cfg = config(dir.path());
    let images = get(&io, "images");

    // The full CLIP, for the reference output.
    let vs = VarStore::new(Device::Cpu);
    let clip = M3dClip::new(&VarBuilder::new(&vs), &cfg).unwrap();
    let weights = dir.path().join("weights.safetensors");
    load_file_into(&vs, &weights, &load_options()).unwrap();
    let (want, _) = clip.vision_encoder.forward_t(images, false);

    // pretrained_ViT.bin extraction: select the `vision_encoder.` keys of the CLIP checkpoint.
    let vs = VarStore::new(Device::Cpu);
    let vit = ViT3d::new(&VarBuilder::new(&vs), &cfg.vision).unwrap();
    let opts = monai_load_options().with_key_map(KeyMap::select_prefix("vision_encoder."));
    let report = load_file_into(&vs, &weights, &opts).unwrap();
    assert!(report.is_clean());
    let (got, _) = vit.forward_t(images, false);
    assert_close("ViT from CLIP checkpoint", &got, &want, 0.0);

    // ...and the extracted file M3D ships, a bare torch.save state dict.
    let vs = VarStore::new(Device::Cpu);
    let vit = ViT3d::new(&VarBuilder::new(&vs), &cfg.vision).unwrap();
    load_file_into(&vs, &dir.path().join("vision.bin"), &monai_load_options()).unwrap();
    let (got, _) = vit.forward_t(images, false);
    assert_close("ViT from vision.bin", &got, &want, 0.0);

    // The CLIP checkpoint into the whole model loads strictly only with the MONAI/HF allowances.
    let vs = VarStore::new(Device::Cpu);
    M3dClip::new(&VarBuilder::new(&vs), &cfg).unwrap();
    let err = load_file_into(&vs, &weights, &LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("norm_cross_attn"), "{err}");
}

#[test]
fn clip_presets_and_errors() {
    let cfg = M3dClipConfig::m3d();
    assert_eq!(cfg.logit_scale, LogitScale::Raw);
    let vs = VarStore::new(Device::Cpu);
    let clip = M3dClip::new(&VarBuilder::shape_only(&vs), &cfg).unwrap();
    let vars = vs.variables();
    let n: i64 = vars
        .values()
        .map(|t| t.size().iter().product::<i64>())
        .sum();
    // ViT 87,389,184 + BERT-base with pooler 109,482,240 + 2 x Linear(768, 768) + logit_scale.
    assert_eq!(n, 87_389_184 + 109_482_240 + 2 * (768 * 768 + 768) + 1);
    assert_eq!(vars["logit_scale"].size(), Vec::<i64>::new());
    assert!(vars.contains_key("language_encoder.pooler.dense.weight"));
    assert!(vars.contains_key("vision_encoder.blocks.11.mlp.linear2.bias"));
    drop(clip);

    let vs = VarStore::new(Device::Cpu);
    let clip = M3dClip::new(&VarBuilder::new(&vs), &M3dClipConfig::debug()).unwrap();
    let init = clip.logit_scale.double_value(&[]);
    assert!((init - (1.0f64 / 0.07).ln()).abs() < 1e-6);
    assert!((clip.scale().double_value(&[]) - init).abs() < 1e-12);
    let images = Tensor::randn([2, 1, 8, 16, 16], (Kind::Float, Device::Cpu));
    let ids = Tensor::from_slice(&[1i64, 5, 6, 1, 7, 0]).reshape([3, 2]);
    let mask = ids.ones_like();
    let err = clip
        .forward_t(&images, &ids, &mask, &SingleProcess, false)
        .unwrap_err();
    assert!(matches!(err, ModelError::Input(_)), "{err}");
    let bad_images = Tensor::randn([2, 1, 8, 16, 8], (Kind::Float, Device::Cpu));
    let ids = ids.narrow(0, 0, 2);
    let mask = mask.narrow(0, 0, 2);
    assert!(clip
        .forward_t(&bad_images, &ids, &mask, &SingleProcess, false)
        .is_err());
    let out = clip
        .forward_t(&images, &ids, &mask, &SingleProcess, true)
        .unwrap();
    assert_eq!(out.logits.size(), [2, 2]);
    assert_eq!(Vec::<i64>::try_from(&out.labels).unwrap(), [0, 1]);

    let mut bad = M3dClipConfig::debug();
    bad.text.hidden_size = 48;
    bad.text.num_attention_heads = 4;
    assert!(matches!(
        M3dClip::new(&VarBuilder::new(&VarStore::new(Device::Cpu)), &bad),
        Err(ModelError::Config(_))
    ));
}

#[test]
fn clip_config_from_the_reference_config_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    // The shape of the released M3D-CLIP config.json (M3DCLIPConfig.save_pretrained).
    let json = r#"{
      "architectures": ["M3DCLIP"], "dropout_rate": 0, "gather_loss": true, "hidden_size": 768,
      "img_size": [32, 256, 256], "in_channels": 1, "language_model_name_or_path": "./bert_base_uncased/",
      "local_loss": false, "max_text_len": 128, "mlp_dim": 3072, "model_type": "m3d_clip", "num_heads": 12,
      "num_layers": 12, "patch_size": [4, 16, 16], "pos_embed": "perceptron", "spatial_dims": 3,
      "torch_dtype": "float32", "transformers_version": "4.40.0", "vocab_size": 30522
    }"#;
    std::fs::write(&path, json).unwrap();
    let text = m3d_models::bert::BertConfig::bert_base_uncased();
    let cfg = M3dClipConfig::from_reference_config(&path, text.clone()).unwrap();
    let want = M3dClipConfig::m3d();
    assert_eq!(
        serde_json::to_value(&cfg.vision).unwrap(),
        serde_json::to_value(&want.vision).unwrap()
    );
    assert_eq!(cfg.logit_scale, LogitScale::Raw);
    assert!(!cfg.local_loss);

    std::fs::write(&path, json.replace("perceptron", "conv")).unwrap();
    let err = M3dClipConfig::from_reference_config(&path, text).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
}
