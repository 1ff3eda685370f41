//! `m3d plan`: prints what a recipe costs (parameters, memory per GPU, FLOPs, time) and refuses one that
//! does not fit (exit 1, with the numbers and what to change). The work is `m3d_planner`'s.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use m3d_planner::{Gpu, PlanOptions};
use m3d_recipes::Recipe;

#[derive(Args)]
pub struct PlanArgs {
    /// The recipe YAML.
    recipe: PathBuf,
    /// World size (default: the recipe's workers.max).
    #[arg(long)]
    workers: Option<usize>,
    /// Accelerator to check memory against: h100-80gb, h200-141gb, a100-80gb, a100-40gb, l40s-48gb
    /// (default: h100-80gb for a CUDA recipe).
    #[arg(long)]
    gpu: Option<String>,
    /// Samples per epoch, instead of reading the datasets' manifests.
    #[arg(long)]
    samples: Option<u64>,
    /// Model FLOPs utilisation the time estimate assumes.
    #[arg(long, default_value_t = 0.4)]
    mfu: f64,
    /// Recipe overrides, as for `m3d train`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

pub fn plan(a: PlanArgs) -> Result<()> {
    let recipe = Recipe::load(&a.recipe, &a.set)?;
    let gpu = match &a.gpu {
        None => None,
        Some(name) => Some(Gpu::named(name).with_context(|| {
            format!(
                "unknown --gpu `{name}` (known: {})",
                Gpu::names().join(", ")
            )
        })?),
    };
    if !(a.mfu > 0.0 && a.mfu <= 1.0) {
        bail!("--mfu {} must be in (0, 1]", a.mfu);
    }
    let scratch = tempfile_dir()?;
    let opts = PlanOptions {
        workers: a.workers,
        gpu,
        samples: a.samples,
        mfu: a.mfu,
        scratch: scratch.path().to_path_buf(),
    };
    let plan = m3d_planner::plan(&recipe, &opts)
        .with_context(|| format!("planning {}", a.recipe.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", plan.render());
    }
    if !plan.fits {
        let usable = plan.usable_bytes.unwrap_or(0.0) / (1u64 << 30) as f64;
        bail!(
            "{} needs {:.1} GiB per GPU, {:.1} GiB with activation checkpointing; {} leaves {usable:.1} GiB{}",
            a.recipe.display(),
            plan.memory.total / (1u64 << 30) as f64,
            plan.memory.total_checkpointed / (1u64 << 30) as f64,
            plan.gpu.map(|g| g.name).unwrap_or("the GPU"),
            if plan.advice.is_empty() {
                String::new()
            } else {
                format!(": {}", plan.advice.join("; or "))
            }
        );
    }
    Ok(())
}

fn tempfile_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("m3d-plan-")
        .tempdir()
        .context("creating a scratch folder for the vocabulary")
}
