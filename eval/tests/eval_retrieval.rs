//! `m3d eval retrieval` on a chosen device: on the CPU the result is the one the evaluation always computed
//! (every pair's features from `M3dClip::forward_t`, cosine similarities, R@1/5/10), whatever the batch size.
//! A saved tiny M3D-CLIP and a caption shard dataset are written here directly.

use std::path::Path;

use m3d_eval::{clip_retrieval, clip_retrieval_on, retrieval_scores, EvalError};
use m3d_models::bert::BertConfig;
use m3d_models::clip::{M3dClip, M3dClipConfig, SingleProcess};
use m3d_models::tokenizer::{Padding, Tokenizer};
use m3d_models::{weights, VarBuilder};
use m3d_shards::encode::encode_image;
use m3d_shards::manifest::{sample_shard_key, volume_shard_key};
use m3d_shards::{
    ImageDtype, Manifest, SampleRecord, ShardEntry, Store, Task, VolumeRecord, WriteOptions,
};
use m3d_worker::vocab::{word_level_tokenizer, write_tokenizer, VocabStyle};
use tch::nn::VarStore;
use tch::{Device, Tensor};

const PAIRS: usize = 7;
const WORDS: [&str; 6] = ["liver", "spleen", "kidney", "lesion", "small", "large"];

fn report(i: usize) -> String {
    format!(
        "a {} {} near the {}",
        WORDS[4 + i % 2],
        WORDS[3],
        WORDS[i % 3]
    )
}

fn cfg(vocab: i64) -> M3dClipConfig {
    M3dClipConfig {
        text: BertConfig {
            vocab_size: vocab,
            ..BertConfig::debug()
        },
        ..M3dClipConfig::debug()
    }
}

/// A caption dataset of `PAIRS` volumes (split `test`) in the shape of the debug ViT.
fn write_shards(dir: &Path, shape: [u32; 4]) -> String {
    let url = dir.to_str().unwrap().to_string();
    let store = Store::open(&url).unwrap();
    let opts = WriteOptions {
        rows_per_row_group: 2,
        ..Default::default()
    };
    let n: usize = shape.iter().map(|&x| x as usize).product();
    let vols: Vec<VolumeRecord> = (0..PAIRS)
        .map(|v| {
            let image: Vec<f32> = (0..n)
                .map(|i| ((i * 11 + v * 37) % 29) as f32 / 28.0)
                .collect();
            let bytes = encode_image(&image, ImageDtype::F32);
            VolumeRecord {
                volume_id: format!("cap/{v}"),
                dataset: "cap".into(),
                source: format!("synthetic/{v}"),
                shape,
                dtype: ImageDtype::F32,
                image_crc32: VolumeRecord::crc32(&bytes),
                image: bytes.into(),
                masks: Vec::new(),
            }
        })
        .collect();
    let mut manifest = Manifest::new("cap", "m3d-worker eval tests");
    let key = volume_shard_key(0);
    let bytes = m3d_shards::write_volume_shard(&vols, &opts).unwrap();
    manifest
        .volume_shards
        .push(ShardEntry::describe(&key, vols.len() as u64, &bytes));
    store.put(&key, bytes).unwrap();
    let samples: Vec<SampleRecord> = vols
        .iter()
        .enumerate()
        .map(|(i, v)| SampleRecord {
            sample_id: format!("c{i}"),
            dataset: "cap".into(),
            task: Task::Caption,
            split: "test".into(),
            volume_id: v.volume_id.clone(),
            mask_index: None,
            question: None,
            answer: None,
            answer_choice: None,
            question_type: None,
            class_name: None,
            bbox: None,
            report: Some(report(i)),
            source_row: None,
        })
        .collect();
    let key = sample_shard_key(0);
    let bytes = m3d_shards::write_sample_shard(&samples, &opts).unwrap();
    manifest
        .sample_shards
        .push(ShardEntry::describe(&key, samples.len() as u64, &bytes));
    store.put(&key, bytes).unwrap();
    manifest.count_samples(&samples);
    manifest.update_totals();
    manifest.save(&store).unwrap();
    // Written as a dataset from before the volume index, then given one as `m3d data-prep reindex` does.
    m3d_shards::reindex(&store).unwrap();
    url
}

/// A run's `final/` folder: config.json, tokenizer.json, model.safetensors.
fn write_model(dir: &Path) -> M3dClipConfig {
    std::fs::create_dir_all(dir).unwrap();
    let texts: Vec<String> = (0..PAIRS).map(report).collect();
    let json = word_level_tokenizer(texts.iter().map(String::as_str), VocabStyle::Bert);
    write_tokenizer(&dir.join("tokenizer.json"), &json).unwrap();
    let tok = Tokenizer::from_file(dir).unwrap();
    let cfg = cfg(tok.vocab_size(true) as i64);
    tch::manual_seed(31);
    let vs = VarStore::new(Device::Cpu);
    let _clip = M3dClip::new(&VarBuilder::new(&vs), &cfg).unwrap();
    weights::save_safetensors(&dir.join("model.safetensors"), &weights::state_dict(&vs)).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    cfg
}

#[test]
fn cpu_retrieval_is_unchanged_and_independent_of_the_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("final");
    let cfg = write_model(&model_dir);
    let [d, h, w] = cfg.vision.img_size;
    let shards = write_shards(&dir.path().join("cap"), [1, d as u32, h as u32, w as u32]);

    // What the evaluation computed before it took a device: one batch, the device-checked forward pass.
    let (_vs, clip, tok) = m3d_eval::load_clip(&model_dir, Device::Cpu).unwrap();
    let loader = m3d_data::loader::ShardLoader::open(&shards, Default::default()).unwrap();
    let indices: Vec<u64> = (0..PAIRS as u64).collect();
    let samples = loader.load(&indices).unwrap();
    let flat: Vec<f32> = samples
        .iter()
        .flat_map(|s| s.image.iter().copied())
        .collect();
    let images = Tensor::from_slice(&flat).view([PAIRS as i64, 1, d, h, w]);
    let texts: Vec<&str> = samples
        .iter()
        .map(|s| s.sample.report.as_deref().unwrap())
        .collect();
    let enc = tok
        .encode_batch(&texts, cfg.max_text_len as usize, Padding::MaxLength, true)
        .unwrap();
    let out = tch::no_grad(|| {
        clip.forward_t(
            &images,
            &enc.input_ids,
            &enc.attention_mask,
            &SingleProcess,
            false,
        )
    })
    .unwrap();
    let want = retrieval_scores(&out.image_features.matmul(&out.text_features.tr()));
    assert_eq!(want.pairs, PAIRS);

    for batch in [1, 3, PAIRS, 16] {
        let got = clip_retrieval_on(&model_dir, &shards, "test", None, batch, Device::Cpu).unwrap();
        assert_eq!(got, want, "batch {batch}");
    }
    if !tch::Cuda::is_available() {
        // The default device is the CPU here; a GPU that is not there is an error naming it.
        assert_eq!(
            clip_retrieval(&model_dir, &shards, "test", 4).unwrap(),
            want
        );
        let err =
            clip_retrieval_on(&model_dir, &shards, "test", None, 4, Device::Cuda(0)).unwrap_err();
        assert!(
            matches!(&err, EvalError::Input(m) if m.contains("cuda:0")),
            "{err}"
        );
    }
}
