//! A LaMed recipe initialised from the published layouts it meets on a real cluster, as the trainer builds it
//! (`TrainModel::build`): a base LLM folder saved by transformers (`model.llm`: config.json, sharded
//! safetensors with their index, the family's real tokenizer.json and tokenizer_config.json), BAAI/SegVol's
//! `pytorch_model.bin` key layout, and the vision encoder of an M3D-CLIP run. For Llama-2, Llama-3 and
//! Phi-3-mini:
//! - every LLM parameter loads strictly, `embed_tokens` and `lm_head` cut to the tokenizer's entries (Phi-3's
//!   checkpoint has 32064 rows for 32011 tokens) and grown by four rows equal to the mean of the kept ones;
//! - SegVol loads strictly into `model.seg_module.` (its text encoder left out by `exclude`), the CLIP
//!   vision encoder strictly into `model.vision_tower.vision_tower.`;
//! - pad is the reference's (Llama-2 `<unk>`, Phi-3 its own `<|endoftext|>`, Llama-3 pad = eos =
//!   `<|end_of_text|>`), and the prompt starts with one BOS.
//!
//! The oracle (tests/oracle/published_layouts.py) writes the folders with transformers' `save_pretrained`;
//! the tokenizer files come from scripts/tokenizers.sh (`M3D_TOKENIZERS`).

use std::collections::HashMap;
use std::path::Path;

use m3d_models::tokenizer::Tokenizer;
use m3d_models::weights::{read_tensors, save_safetensors};
use m3d_recipes::Recipe;
use m3d_worker::job::{Net, TrainModel};
use tch::{Device, Kind, Tensor};

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn recipe(yaml: &str, dir: &Path) -> Recipe {
    let p = dir.join("recipe.yaml");
    std::fs::write(&p, yaml).unwrap();
    Recipe::load(&p, &[]).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn lamed_initialises_from_the_published_llm_segvol_and_clip_layouts() {
    assert!(
        std::env::var("M3D_TOKENIZERS").is_ok(),
        "M3D_TOKENIZERS is not set: `source scripts/tokenizers.sh` (scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    m3d_testkit::run_python(
        &m3d_testkit::package_dir().join("../tests/oracle/published_layouts.py"),
        &[root.to_str().unwrap()],
    );
    // An M3D-CLIP run's weights: the tiny CLIP's vision encoder has the tiny LaMed's vision tower shape.
    let clip_recipe = recipe(
        &format!(
            "model:\n  kind: clip\n  preset: tiny\n  tokenizer: {}\ndata:\n  tasks:\n    - task: cap\n      shards: [unused]\n  max_text_len: 32\ntrain:\n  precision: f32\n",
            root.join("llama2/tokenizer.json").display()
        ),
        root,
    );
    let clip_tok = Tokenizer::from_file(&root.join("llama2/tokenizer.json")).unwrap();
    let clip = TrainModel::build(&clip_recipe, clip_tok, Device::Cpu).unwrap();
    let clip_file = root.join("clip.safetensors");
    save_safetensors(&clip_file, &clip.state_dict()).unwrap();
    let clip_weights: HashMap<String, Tensor> = clip.state_dict().into_iter().collect();
    let segvol: HashMap<String, Tensor> = read_tensors(&root.join("SegVol/pytorch_model.bin"))
        .unwrap()
        .into_iter()
        .collect();

    for (family, base, rows_in_checkpoint, pad) in [
        ("llama2", 32_000i64, 32_000i64, "<unk>"),
        ("llama3", 128_256, 128_256, "<|end_of_text|>"),
        ("phi3", 32_011, 32_064, "<|endoftext|>"),
    ] {
        let folder = root.join(family);
        let r = recipe(
            &format!(
                "model:
  kind: lamed
  preset: tiny
  llm: {llm}
  segmentation: true
  init_from:
    - path: {clip}
      select_prefix: vision_encoder.
      add_prefix: model.vision_tower.vision_tower.
    - path: {segvol}
      exclude: [model.text_encoder.]
      select_prefix: model.
      add_prefix: model.seg_module.
  lora: {{r: 4, alpha: 8, dropout: 0.0}}
  trainable: [model.mm_projector., model.seg_projector., model.seg_module.]
data:
  tasks:
    - task: seg
      shards: [unused]
  max_text_len: 64
train:
  precision: f32
",
                llm = folder.display(),
                clip = clip_file.display(),
                segvol = root.join("SegVol/pytorch_model.bin").display(),
            ),
            root,
        );
        let tokenizer = Tokenizer::from_file(&folder).unwrap();
        assert_eq!(tokenizer.vocab_size(true) as i64, base, "{family}");
        let model = TrainModel::build(&r, tokenizer, Device::Cpu)
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        let ours: HashMap<String, Tensor> = model.state_dict().into_iter().collect();
        let hf: HashMap<String, Tensor> = read_tensors(&folder).unwrap().into_iter().collect();
        // Every LLM tensor of the folder is in the model, equal (the token matrices in their first rows).
        for (k, t) in &hf {
            let mine = &ours[k];
            if k == "model.embed_tokens.weight" || k == "lm_head.weight" {
                assert_eq!(t.size()[0], rows_in_checkpoint, "{family} {k}");
                assert_eq!(mine.size()[0], base + 4, "{family} {k}: tokenizer + 4 rows");
                let kept = t.narrow(0, 0, base);
                assert_eq!(
                    max_diff(&mine.narrow(0, 0, base), &kept),
                    0.0,
                    "{family} {k}"
                );
                let mean = kept.mean_dim(0, true, Kind::Float);
                for row in 0..4 {
                    let d = max_diff(&mine.narrow(0, base + row, 1), &mean);
                    assert!(
                        d < 1e-6,
                        "{family} {k}: added row {row} differs from the mean by {d}"
                    );
                }
            } else {
                assert_eq!(max_diff(mine, t), 0.0, "{family} {k}");
            }
        }
        for (k, t) in &segvol {
            if let Some(rest) = k.strip_prefix("model.") {
                if rest.starts_with("text_encoder.") {
                    continue;
                }
                let mine = &ours[&format!("model.seg_module.{rest}")];
                assert_eq!(max_diff(mine, t), 0.0, "{family} SegVol {k}");
            }
        }
        for (k, t) in &clip_weights {
            if let Some(rest) = k.strip_prefix("vision_encoder.") {
                let mine = &ours[&format!("model.vision_tower.vision_tower.{rest}")];
                assert_eq!(max_diff(mine, t), 0.0, "{family} vision {k}");
            }
        }
        let tok = &model.tokenizer;
        assert_eq!(tok.pad_token().map(|(t, _)| t), Some(pad), "{family}: pad");
        let Net::Lamed(lamed) = &model.net else {
            panic!("{family}: not LaMed");
        };
        assert_eq!(lamed.config().tokens.seg, base + 3, "{family}: [SEG]");
        let bos = m3d_models::lamed::prompt_bos(tok, base).unwrap();
        assert_eq!(
            tok.id_to_token(bos).as_deref(),
            Some(if family == "llama3" {
                "<|begin_of_text|>"
            } else {
                "<s>"
            })
        );
    }
}

/// A SegVol file with a key the module does not have fails the strict load, naming the key.
#[test]
fn a_component_load_is_strict_within_its_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let words: Vec<String> = (0..50).map(|i| format!("w{i}")).collect();
    let json = m3d_worker::vocab::word_level_tokenizer(
        words.iter().map(String::as_str),
        m3d_worker::vocab::VocabStyle::Llama,
    );
    std::fs::write(
        root.join("tokenizer.json"),
        serde_json::to_vec(&json).unwrap(),
    )
    .unwrap();
    let base = recipe(
        &format!(
            "model:\n  kind: lamed\n  preset: tiny\n  tokenizer: {}\n  segmentation: true\ndata:\n  tasks:\n    - task: seg\n      shards: [unused]\n  max_text_len: 64\ntrain:\n  precision: f32\n",
            root.join("tokenizer.json").display()
        ),
        root,
    );
    let tok = Tokenizer::from_file(&root.join("tokenizer.json")).unwrap();
    let model = TrainModel::build(&base, tok.clone(), Device::Cpu).unwrap();
    let mut seg: Vec<(String, Tensor)> = model
        .state_dict()
        .into_iter()
        .filter_map(|(k, t)| {
            k.strip_prefix("model.seg_module.")
                .map(|r| (format!("model.{r}"), t))
        })
        .collect();
    let full = root.join("segvol-full.safetensors");
    save_safetensors(&full, &seg).unwrap();
    seg.push((
        "model.mask_decoder.extra.weight".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    let extra = root.join("segvol-extra.safetensors");
    save_safetensors(&extra, &seg).unwrap();
    let with = |file: &Path| {
        let mut r = base.clone();
        r.model.init_from = vec![m3d_recipes::InitFrom {
            path: file.display().to_string(),
            select_prefix: Some("model.".into()),
            add_prefix: Some("model.seg_module.".into()),
            exclude: vec![],
            strict: true,
        }];
        r
    };
    TrainModel::build(&with(&full), tok.clone(), Device::Cpu)
        .expect("the module's own keys load strictly");
    let err = TrainModel::build(&with(&extra), tok, Device::Cpu)
        .err()
        .expect("an unknown key fails");
    assert!(
        err.to_string().contains("mask_decoder.extra.weight"),
        "{err}"
    );
}
