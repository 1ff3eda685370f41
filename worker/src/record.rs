//! Recording a run's inputs (`output.record_batches`): the weights before the first step, the trainable
//! parameters' names and every step's batch exactly as the objective received it, so that another trainer (the
//! reference's HF `Trainer`, in the trajectory test) can replay the same run from the same inputs.
//!
//! Files, in the recipe's folder: `init.safetensors` (the state dict), `trainable.json` (names, in the
//! optimizer's order) and, when the round finishes, `batches.safetensors`: per step `s` the batch's tensors as
//! `{s}.<name>` (`input_ids`, `attention_mask`, `labels`), except volumes (`images`, `segs`), which are pooled —
//! each distinct volume stored once in `images` / `segs` (N, C, D, H, W) and referenced by `{s}.image_index` /
//! `{s}.seg_index` (an all-zero mask is -1), because a run revisits the same volumes and each is megabytes.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::train::{io, TrainError};

/// Volumes stored once each.
#[derive(Default)]
struct Pool {
    volumes: Vec<Tensor>,
    by_hash: HashMap<u64, Vec<i64>>,
}

impl Pool {
    /// The index of `v` (one sample, on the CPU), adding it if it is new.
    fn index(&mut self, v: &Tensor) -> Result<i64, TrainError> {
        let bits = Vec::<f32>::try_from(&v.to_kind(Kind::Float).flatten(0, -1))
            .map_err(|e| TrainError::Recipe(format!("recording a batch: {e}")))?;
        let mut h = DefaultHasher::new();
        for x in &bits {
            x.to_bits().hash(&mut h);
        }
        v.size().hash(&mut h);
        let key = h.finish();
        let slot = self.by_hash.entry(key).or_default();
        if let Some(&i) = slot.iter().find(|&&i| self.volumes[i as usize].equal(v)) {
            return Ok(i);
        }
        let i = self.volumes.len() as i64;
        self.volumes.push(v.copy());
        slot.push(i);
        Ok(i)
    }
}

/// Records a one-worker run's inputs (see the module docs).
pub struct BatchRecorder {
    dir: PathBuf,
    images: Pool,
    segs: Pool,
    tensors: Vec<(String, Tensor)>,
}

impl BatchRecorder {
    /// Creates `dir` and writes the weights before the first step and the trainable parameters' names.
    pub fn create(
        dir: &Path,
        state: &[(String, Tensor)],
        trainable: &[String],
    ) -> Result<BatchRecorder, TrainError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        m3d_models::weights::save_safetensors(&dir.join("init.safetensors"), state)?;
        let names = serde_json::to_vec_pretty(trainable).unwrap_or_default();
        let path = dir.join("trainable.json");
        std::fs::write(&path, names).map_err(io(&path))?;
        Ok(BatchRecorder {
            dir: dir.to_path_buf(),
            images: Pool::default(),
            segs: Pool::default(),
            tensors: Vec::new(),
        })
    }

    /// Adds step `step`'s batch (named whole-batch tensors, see [`crate::objective::Objective::record`]).
    pub fn add(&mut self, step: u64, batch: Vec<(&'static str, Tensor)>) -> Result<(), TrainError> {
        for (name, t) in batch {
            let t = t.to_device(Device::Cpu);
            match name {
                "images" | "segs" => {
                    let (pool, key) = if name == "images" {
                        (&mut self.images, "image_index")
                    } else {
                        (&mut self.segs, "seg_index")
                    };
                    let mut index = Vec::new();
                    for i in 0..t.size()[0] {
                        let v = t.get(i);
                        let empty = name == "segs" && v.abs().max().double_value(&[]) == 0.0;
                        index.push(if empty { -1 } else { pool.index(&v)? });
                    }
                    self.tensors
                        .push((format!("{step}.{key}"), Tensor::from_slice(&index)));
                }
                _ => self.tensors.push((format!("{step}.{name}"), t)),
            }
        }
        Ok(())
    }

    /// Writes `batches.safetensors` (through a temporary file renamed into place).
    pub fn finish(mut self) -> Result<(), TrainError> {
        for (name, pool) in [("images", &self.images), ("segs", &self.segs)] {
            if !pool.volumes.is_empty() {
                let stacked = Tensor::stack(&pool.volumes, 0);
                self.tensors.push((name.to_string(), stacked));
            }
        }
        let tmp = self.dir.join(".batches.safetensors.tmp");
        m3d_models::weights::save_safetensors(&tmp, &self.tensors)?;
        let path = self.dir.join("batches.safetensors");
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }
}
