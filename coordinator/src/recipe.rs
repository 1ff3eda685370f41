//! A job's data plan from its recipe, sized from the datasets' manifests alone: no sample table, volume index
//! or volume shard is read, so the coordinator and the `m3d train` supervisor plan a job over 120K volumes with
//! one small read per dataset, and every worker can check the plan it is handed against its own recipe.
//!
//! The training set is what `m3d_data::TrainData` serves: the recipe's tasks in order, each contributing
//! `ceil(weight × n)` entries where `n` counts its datasets' samples of `data.split` whose stored task the recipe
//! task names ([`m3d_shards::Task::in_recipe_task`]). The manifest's `counts` (task -> split -> samples) give `n`
//! exactly; `m3d_data`'s tests check that both agree.

use m3d_recipes::Recipe;
use m3d_shards::{sha256_hex, Manifest, ShardError, Task};
use m3d_store::Store;

use crate::plan::{PlanSpec, Shuffle};
use crate::PlanError;

/// Errors sizing a recipe's training set.
#[derive(Debug, thiserror::Error)]
pub enum RecipePlanError {
    /// A dataset's manifest could not be read.
    #[error("dataset `{url}`: {source}")]
    Dataset {
        url: String,
        #[source]
        source: ShardError,
    },
    /// A task whose datasets hold no sample of the recipe's split.
    #[error(
        "data.tasks.{task_index} (`{task}`): no `{task}` sample of split `{split}` in {datasets}"
    )]
    EmptyTask {
        task_index: usize,
        task: String,
        split: String,
        datasets: String,
    },
    /// `data.tasks[].kinds` names a kind the task does not have.
    #[error("data.tasks.{task_index}.kinds: {reason}")]
    Kinds { task_index: usize, reason: String },
    #[error("recipe `{recipe}`: {source}")]
    Plan {
        recipe: String,
        #[source]
        source: PlanError,
    },
}

/// What the plan needs to know of a recipe's training set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainingSet {
    /// Entries in one epoch of the global sample index.
    pub samples: u64,
    /// sha256 over what the sample sequence depends on besides the plan's numbers: per task of `data.tasks`
    /// in order, its name, weight and the split, and the key and sha256 of every shard each of its datasets
    /// (`shards`, then `volumes`) lists. Unchanged by a conversion that reproduces the same shards (the
    /// manifest's own bytes carry its creation time, so they are not hashed).
    pub fingerprint: String,
}

impl TrainingSet {
    /// Reads the manifests of `recipe.data.tasks` (one read per dataset).
    pub fn of(recipe: &Recipe) -> Result<TrainingSet, RecipePlanError> {
        let d = &recipe.data;
        let mut listing = format!("split {}\n", d.split);
        let mut samples = 0u64;
        for (i, task) in d.tasks.iter().enumerate() {
            if task.weight == 0.0 {
                continue;
            }
            listing.push_str(&format!("task {i} {} weight {}\n", task.task, task.weight));
            // Only a selection changes the listing, so runs without one keep their fingerprints.
            if !task.kinds.is_empty() {
                listing.push_str(&format!("kinds {}\n", task.kinds.join(" ")));
            }
            let selected = Task::selection(&task.task, &task.kinds).map_err(|reason| {
                RecipePlanError::Kinds {
                    task_index: i,
                    reason,
                }
            })?;
            let mut n = 0u64;
            let urls = task.shards.iter().map(|u| ("shards", u));
            for (role, url) in urls.chain(task.volumes.iter().map(|u| ("volumes", u))) {
                let manifest = dataset_manifest(url)?;
                listing.push_str(&format!("{role}\n"));
                shard_listing(&manifest, &mut listing);
                if role == "shards" {
                    n += manifest
                        .counts
                        .iter()
                        .filter(|(stored, _)| {
                            selected.iter().any(|t| t.as_str() == stored.as_str())
                        })
                        .filter_map(|(_, splits)| splits.get(&d.split))
                        .sum::<u64>();
                }
            }
            if n == 0 {
                return Err(RecipePlanError::EmptyTask {
                    task_index: i,
                    task: task.task.clone(),
                    split: d.split.clone(),
                    datasets: task.shards.join(", "),
                });
            }
            samples += (task.weight * n as f64).ceil() as u64;
        }
        Ok(TrainingSet {
            samples,
            fingerprint: sha256_hex(listing.as_bytes()),
        })
    }
}

/// The manifest of the dataset at `url` (one read).
pub fn dataset_manifest(url: &str) -> Result<Manifest, RecipePlanError> {
    let err = |source: ShardError| RecipePlanError::Dataset {
        url: url.to_string(),
        source,
    };
    let store = Store::open_existing(url).map_err(|e| err(e.into()))?;
    // The head alone: the counts size the plan, and the shard lists' own sha256 identifies them.
    Manifest::load_head(&store).map_err(err)
}

/// Appends what identifies a dataset's contents to a fingerprint's listing: the key and sha256 of every shard
/// its manifest lists, one line each (the manifest's own bytes carry its creation time, so they are not used),
/// or, where the lists are kept in their own object, that object's sha256 (which covers every shard's).
pub fn shard_listing(manifest: &Manifest, listing: &mut String) {
    if let Some(list) = &manifest.shard_list {
        listing.push_str(&format!("shards {} {}\n", list.key, list.sha256));
        return;
    }
    for (kind, shards) in [
        ("volumes", &manifest.volume_shards),
        ("samples", &manifest.sample_shards),
    ] {
        for e in shards {
            listing.push_str(&format!("{kind} {} {}\n", e.key, e.sha256));
        }
    }
}

/// The data plan `recipe` asks for over a training set of `samples` entries: its global batch, seed, epochs,
/// `max_steps` and shuffle, validated.
pub fn plan_spec(recipe: &Recipe, samples: u64) -> Result<PlanSpec, RecipePlanError> {
    let spec = PlanSpec {
        kind: crate::PlanKind::Train,
        samples,
        global_batch: recipe.train.global_batch as u64,
        seed: recipe.train.seed,
        epochs: u64::from(recipe.train.epochs),
        max_steps: None,
        shuffle: Shuffle::of_recipe(&recipe.data),
    };
    spec.validate().map_err(|source| RecipePlanError::Plan {
        recipe: recipe.name().to_string(),
        source,
    })?;
    Ok(match recipe.train.max_steps {
        Some(m) => spec.with_max_steps(m),
        None => spec,
    })
}
