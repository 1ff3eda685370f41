//! Evaluation of trained models on held-out shards. Today: M3D-Bench's image-text retrieval for M3D-CLIP
//! ([`clip_retrieval`]): CLS features of every image and report of a split, cosine similarity, and
//! R@1/5/10 in both directions, as the reference computes them (pair i's image matches pair i's text).
//! The encoders run in batches on a chosen device ([`clip_retrieval_on`]; by default the first GPU when there
//! is one, else the CPU), the batches reaching it as the trainer's do ([`m3d_worker::batch::to_device`]).

pub mod bench;
pub mod bertscore;
pub mod job;
pub mod model_dir;
pub mod output;

use std::path::Path;

use m3d_data::loader::{LoaderOptions, ShardLoader};
use m3d_models::clip::{M3dClip, M3dClipConfig, SingleProcess};
use m3d_models::layers::CheckedIds;
use m3d_models::tokenizer::{Padding, Tokenizer};
use m3d_models::weights::{load_file_into, LoadOptions};
use m3d_models::VarBuilder;
use m3d_worker::batch::{stack_volumes, to_device};
use m3d_worker::job::JobError;
use serde::Serialize;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Retrieval scores over `pairs` image-text pairs, in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct Retrieval {
    pub pairs: usize,
    pub image_to_text_r1: f64,
    pub image_to_text_r5: f64,
    pub image_to_text_r10: f64,
    pub text_to_image_r1: f64,
    pub text_to_image_r5: f64,
    pub text_to_image_r10: f64,
}

/// Errors of an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Model(#[from] m3d_models::ModelError),
    #[error(transparent)]
    Load(#[from] m3d_data::loader::LoadError),
    #[error("{0}")]
    Input(String),
    /// Talking to the coordinator, or what it answered.
    #[error("{0}")]
    Control(String),
    /// The rank's round ended before its slice was done (the coordinator formed a new one).
    #[error("interrupted: {0}")]
    Interrupted(String),
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

/// Parses a device for evaluation: `cpu`, `cuda` (the first GPU) or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, String> {
    let bad = || format!("unknown device `{s}` (cpu, cuda or cuda:N)");
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Device::Cuda)
            .ok_or_else(bad),
    }
}

/// Where evaluation runs when no device is named: the first GPU when libtorch sees one, else the CPU.
pub fn default_device() -> Device {
    Device::cuda_if_available()
}

/// Errors unless `device` exists here.
fn check_device(device: Device) -> Result<(), EvalError> {
    if let Device::Cuda(n) = device {
        let count = tch::Cuda::device_count();
        if n as i64 >= count {
            return Err(EvalError::Input(format!(
                "device cuda:{n} asked for, but {count} GPU(s) are visible"
            )));
        }
    }
    Ok(())
}

/// Share of rows whose own index is among the `k` highest scores of the row.
fn recall_at(sim: &Tensor, k: i64) -> f64 {
    let n = sim.size()[0];
    let k = k.min(n);
    let (_, top) = sim.topk(k, 1, true, true);
    let target = Tensor::arange(n, (Kind::Int64, sim.device())).unsqueeze(1);
    top.eq_tensor(&target)
        .any_dim(1, false)
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[])
}

/// R@1/5/10 of a similarity matrix (rows: images, columns: texts; the diagonal holds the true pairs).
pub fn retrieval_scores(sim: &Tensor) -> Retrieval {
    let t = sim.tr();
    Retrieval {
        pairs: sim.size()[0] as usize,
        image_to_text_r1: recall_at(sim, 1),
        image_to_text_r5: recall_at(sim, 5),
        image_to_text_r10: recall_at(sim, 10),
        text_to_image_r1: recall_at(&t, 1),
        text_to_image_r5: recall_at(&t, 5),
        text_to_image_r10: recall_at(&t, 10),
    }
}

/// Loads the M3D-CLIP a run saved in `model_dir` (`config.json`, `tokenizer.json`, weights; strict).
pub fn load_clip(
    model_dir: &Path,
    device: Device,
) -> Result<(VarStore, M3dClip, Tokenizer), EvalError> {
    let cfg_path = model_dir.join("config.json");
    let cfg: M3dClipConfig = serde_json::from_slice(
        &std::fs::read(&cfg_path)
            .map_err(|e| EvalError::Input(format!("{}: {e}", cfg_path.display())))?,
    )
    .map_err(|e| EvalError::Input(format!("{}: {e}", cfg_path.display())))?;
    let tokenizer = Tokenizer::from_file(model_dir)?;
    let vs = VarStore::new(device);
    let clip = M3dClip::new(&VarBuilder::new(&vs), &cfg)?;
    load_file_into(&vs, model_dir, &LoadOptions::default())?;
    Ok((vs, clip, tokenizer))
}

/// The caption samples of `split` in the dataset `loader` reads: retrieval's image-text pairs.
pub fn caption_pairs(loader: &ShardLoader, split: &str) -> Vec<u64> {
    let table = loader.samples();
    (0..table.len())
        .filter(|&i| {
            table.split(i) == Some(split) && table.task(i).is_some_and(|t| t.in_recipe_task("cap"))
        })
        .map(|i| i as u64)
        .collect()
}

/// Retrieval of the `cap` samples of `split` in the shard dataset `shards` by the model in `model_dir`,
/// in batches of `batch`, on [`default_device`].
pub fn clip_retrieval(
    model_dir: &Path,
    shards: &str,
    split: &str,
    batch: usize,
) -> Result<Retrieval, EvalError> {
    clip_retrieval_on(model_dir, shards, split, None, batch, default_device())
}

/// [`clip_retrieval`] over the first `limit` pairs (all without one; M3D-Bench's set is 2,000), with the
/// encoders, the features and the similarity matrix on `device`.
pub fn clip_retrieval_on(
    model_dir: &Path,
    shards: &str,
    split: &str,
    limit: Option<usize>,
    batch: usize,
    device: Device,
) -> Result<Retrieval, EvalError> {
    check_device(device)?;
    let (_vs, clip, tokenizer) = load_clip(model_dir, device)?;
    let vocab = clip.config().text.vocab_size;
    let loader = ShardLoader::open(
        shards,
        LoaderOptions {
            prefetch_depth: 0,
            ..LoaderOptions::default()
        },
    )?;
    let mut indices = caption_pairs(&loader, split);
    if let Some(limit) = limit {
        indices.truncate(limit);
    }
    if indices.len() < 2 {
        return Err(EvalError::Input(format!(
            "{shards}: {} caption pair(s) in split `{split}`; retrieval needs at least 2",
            indices.len()
        )));
    }
    let max_len = clip.config().max_text_len as usize;
    let (mut img_feats, mut txt_feats) = (Vec::new(), Vec::new());
    for chunk in indices.chunks(batch.max(1)) {
        let samples = loader.load(chunk)?;
        let views: Vec<(&[f32], [usize; 4])> = samples
            .iter()
            .map(|s| (s.image.as_slice(), s.shape))
            .collect();
        let images = stack_volumes(&views).map_err(JobError::from)?;
        let images = to_device(&images, device, Kind::Float)?;
        let texts: Vec<&str> = samples
            .iter()
            .map(|s| s.sample.report.as_deref().unwrap_or(""))
            .collect();
        let enc = tokenizer.encode_batch(&texts, max_len, Padding::MaxLength, true)?;
        // Checked here, on the host: the forward pass then reads nothing back from the device.
        let checked = CheckedIds::check("BERT input_ids", &enc.input_ids, vocab)?;
        let ids = to_device(&enc.input_ids, device, Kind::Int64)?;
        let mask = to_device(&enc.attention_mask, device, enc.attention_mask.kind())?;
        let out = tch::no_grad(|| {
            clip.forward_t_checked(&images, &ids, &mask, &checked, &SingleProcess, false)
        })?;
        img_feats.push(out.image_features);
        txt_feats.push(out.text_features);
    }
    let img = Tensor::cat(&img_feats, 0);
    let txt = Tensor::cat(&txt_feats, 0);
    // Features are L2-normalised: the product is the cosine similarity.
    Ok(retrieval_scores(&img.matmul(&txt.tr())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_default_to_the_cpu_without_a_gpu() {
        assert_eq!(parse_device("cpu"), Ok(Device::Cpu));
        assert_eq!(parse_device("cuda"), Ok(Device::Cuda(0)));
        assert_eq!(parse_device("cuda:3"), Ok(Device::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", "cuda:-1"] {
            assert!(parse_device(bad).is_err(), "{bad}");
        }
        if !tch::Cuda::is_available() {
            assert_eq!(default_device(), Device::Cpu);
            assert!(matches!(
                check_device(Device::Cuda(0)),
                Err(EvalError::Input(m)) if m.contains("cuda:0")
            ));
        }
        assert!(check_device(Device::Cpu).is_ok());
    }

    #[test]
    fn recall_counts_the_diagonal() {
        // Images (rows): 0 ranks its text first, 1 second, 2 last. Texts (columns): 0 and 2 rank their
        // image first, 1 second.
        let sim =
            Tensor::from_slice(&[0.9f32, 0.1, 0.0, 0.8, 0.5, 0.1, 0.7, 0.6, 0.3]).view([3, 3]);
        let r = retrieval_scores(&sim);
        assert!((r.image_to_text_r1 - 1.0 / 3.0).abs() < 1e-12, "{r:?}");
        assert!((r.text_to_image_r1 - 2.0 / 3.0).abs() < 1e-12, "{r:?}");
        assert!((recall_at(&sim, 2) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(
            r.image_to_text_r5, 1.0,
            "k is capped at the number of pairs"
        );
    }
}
