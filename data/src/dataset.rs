//! The training set of a recipe: its tasks' shard datasets behind one global sample index, which is what the
//! coordinator's data plan permutes. Entry `i` of the index is a (shard dataset, sample) pair; the order is
//! a pure function of the recipe and the shards (tasks in recipe order, datasets in listed order, samples
//! in shard order, each task repeated `ceil(weight × samples)` times), so every worker derives the same
//! index without talking to the others. Consecutive indices are stored together, which is what the block
//! shuffle (`data.shuffle: blocks`, `m3d_coordinator::Shuffle::of_recipe`) relies on for locality.

use m3d_recipes::Recipe;
use m3d_shards::schema::SampleRecord;
use m3d_volume::augment::AugmentParams;

use crate::loader::{LoadError, LoadedSample, LoaderOptions, ShardLoader, VolumeReaders};

/// Errors opening or reading the training set.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("data.tasks.{task_index} (`{task}`): {reason}")]
    Task {
        task_index: usize,
        task: String,
        reason: String,
    },
    #[error("sample index {index} is outside the training set of {len} samples")]
    OutOfRange { index: u64, len: u64 },
}

struct Source {
    /// Index into `data.tasks`.
    task: usize,
    loader: ShardLoader,
}

/// The recipe's training samples behind one index.
pub struct TrainData {
    sources: Vec<Source>,
    /// (source, sample index within the source's loader).
    entries: Vec<(u32, u64)>,
}

impl std::fmt::Debug for TrainData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainData")
            .field("sources", &self.sources.len())
            .field("len", &self.entries.len())
            .finish()
    }
}

impl TrainData {
    /// Opens every shard dataset of `recipe.data.tasks` (indexing each once) and builds the index from the
    /// samples of split `data.split` whose task the recipe names. A task that contributes no sample is an
    /// error naming it.
    pub fn open(recipe: &Recipe) -> Result<TrainData, DatasetError> {
        let d = &recipe.data;
        let datasets: usize = d.tasks.iter().map(|t| t.shards.len()).sum();
        let opts = LoaderOptions {
            cache_bytes: (d.cache_bytes as usize / datasets.max(1)).max(1),
            prefetch_depth: d.read_ahead,
        };
        let mut sources = Vec::new();
        let mut entries = Vec::new();
        let mut readers = VolumeReaders::default();
        for (ti, t) in d.tasks.iter().enumerate() {
            if t.weight == 0.0 {
                continue;
            }
            let mut task_entries: Vec<(u32, u64)> = Vec::new();
            let selected = m3d_shards::Task::selection(&t.task, &t.kinds).map_err(|reason| {
                DatasetError::Task {
                    task_index: ti,
                    task: t.task.clone(),
                    reason,
                }
            })?;
            for url in &t.shards {
                let src = sources.len() as u32;
                // Through the sample lookup where the dataset has one that locates its samples' volumes: its
                // rows of a split and task are ranges the manifest lists, so opening reads no table.
                let lazy = ShardLoader::open_lookup(url, &t.volumes, opts.clone(), &mut readers)?;
                let loader = match lazy {
                    Some(loader) => {
                        for g in loader.lookup_groups().unwrap_or_default() {
                            let task = g.task.parse::<m3d_shards::Task>().ok();
                            if g.split == d.split && task.is_some_and(|k| selected.contains(&k)) {
                                task_entries.extend((g.start..g.start + g.rows).map(|i| (src, i)));
                            }
                        }
                        loader
                    }
                    None => {
                        let loader =
                            ShardLoader::open_sharing(url, &t.volumes, opts.clone(), &mut readers)?;
                        let table = loader.samples();
                        task_entries.extend(
                            (0..table.len())
                                .filter(|&i| {
                                    table.split(i) == Some(d.split.as_str())
                                        && table.task(i).is_some_and(|k| selected.contains(&k))
                                })
                                .map(|i| (src, i as u64)),
                        );
                        loader
                    }
                };
                sources.push(Source { task: ti, loader });
            }
            if task_entries.is_empty() {
                return Err(DatasetError::Task {
                    task_index: ti,
                    task: t.task.clone(),
                    reason: format!(
                        "no `{}` sample of split `{}` in {}",
                        t.task,
                        d.split,
                        t.shards.join(", ")
                    ),
                });
            }
            let n = (t.weight * task_entries.len() as f64).ceil() as usize;
            entries.extend((0..n).map(|j| task_entries[j % task_entries.len()]));
        }
        Ok(TrainData { sources, entries })
    }

    /// Samples in one epoch of the index.
    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn entry(&self, index: u64) -> Result<(u32, u64), DatasetError> {
        self.entries
            .get(index as usize)
            .copied()
            .ok_or(DatasetError::OutOfRange {
                index,
                len: self.len(),
            })
    }

    /// The sample record at global index `index` (decoded from its dataset's compact table).
    pub fn record(&self, index: u64) -> Result<SampleRecord, DatasetError> {
        let (src, i) = self.entry(index)?;
        Ok(self.sources[src as usize].loader.sample(i)?)
    }

    /// Every text of the training samples (reports, questions, answers) in index order, repeats included, for
    /// building a vocabulary. Each dataset's table is decoded once, block by block.
    pub fn texts(&self) -> Result<Vec<String>, DatasetError> {
        let mut decoded: Vec<Option<Vec<Vec<String>>>> = vec![None; self.sources.len()];
        let mut out = Vec::new();
        for &(src, i) in &self.entries {
            let texts = match &mut decoded[src as usize] {
                Some(t) => t,
                slot @ None => {
                    let loader = &self.sources[src as usize].loader;
                    let mut all = Vec::with_capacity(loader.len());
                    let len = loader.len() as u64;
                    for a in (0..len).step_by(4096) {
                        for s in loader.records(a..(a + 4096).min(len))? {
                            all.push(
                                [s.report, s.question, s.answer, s.answer_choice]
                                    .into_iter()
                                    .flatten()
                                    .collect(),
                            );
                        }
                    }
                    slot.insert(all)
                }
            };
            out.extend(texts.get(i as usize).into_iter().flatten().cloned());
        }
        Ok(out)
    }

    /// Bytes the datasets' compact sample tables hold (see [`crate::samples::SampleTable::stored_bytes`]).
    pub fn sample_table_bytes(&self) -> usize {
        self.sources
            .iter()
            .map(|s| s.loader.samples().stored_bytes())
            .sum()
    }

    /// Bytes of the datasets' sample tables held in memory (see [`crate::samples::SampleTable::memory_bytes`]).
    pub fn sample_table_memory_bytes(&self) -> usize {
        self.sources
            .iter()
            .map(|s| s.loader.samples().memory_bytes())
            .sum()
    }

    /// Which `data.tasks` entry a global index belongs to.
    pub fn task_of(&self, index: u64) -> Result<usize, DatasetError> {
        let (src, _) = self.entry(index)?;
        Ok(self.sources[src as usize].task)
    }

    fn by_source(&self, indices: &[u64]) -> Result<Vec<Vec<(usize, u64)>>, DatasetError> {
        let mut groups: Vec<Vec<(usize, u64)>> = vec![Vec::new(); self.sources.len()];
        for (pos, &index) in indices.iter().enumerate() {
            let (src, i) = self.entry(index)?;
            groups[src as usize].push((pos, i));
        }
        Ok(groups)
    }

    /// Loads the samples at `indices` (global), in that order, each augmented with `augment[i]` when given
    /// (see [`ShardLoader::load_augmented`]). [`LoadedSample::index`] is the index within its shard dataset.
    pub fn load(
        &self,
        indices: &[u64],
        augment: &[Option<AugmentParams>],
    ) -> Result<Vec<LoadedSample>, DatasetError> {
        let mut out: Vec<Option<LoadedSample>> = vec![None; indices.len()];
        for (src, group) in self.by_source(indices)?.into_iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            let local: Vec<u64> = group.iter().map(|&(_, i)| i).collect();
            let params: Vec<Option<AugmentParams>> = group
                .iter()
                .map(|&(pos, _)| augment.get(pos).copied().flatten())
                .collect();
            let loaded = self.sources[src].loader.load_augmented(&local, &params)?;
            for ((pos, _), sample) in group.into_iter().zip(loaded) {
                out[pos] = Some(sample);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Starts reading the shards of `indices` in the background (see [`ShardLoader::prefetch`]).
    pub fn prefetch(&self, indices: &[u64]) -> Result<(), DatasetError> {
        for (src, group) in self.by_source(indices)?.into_iter().enumerate() {
            if !group.is_empty() {
                let local: Vec<u64> = group.iter().map(|&(_, i)| i).collect();
                self.sources[src].loader.prefetch(&local)?;
            }
        }
        Ok(())
    }
}
