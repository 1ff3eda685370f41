//! `m3d k8s render`, `render-prep` and `render-eval`: flags in, YAML out (files in a folder, or one stream on stdout).
//! The objects themselves are `m3d_k8s`'s.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use m3d_k8s::{EvalJob, Flavor, Object, PrepJob, TrainJob};
use m3d_recipes::{DeviceKind, ModelKind, Recipe};

#[derive(Subcommand)]
pub enum K8s {
    /// Render a training recipe as Kubernetes objects: a JobSet (coordinator + workers), the recipe as a
    /// ConfigMap and the job token as a Secret.
    Render(RenderArgs),
    /// Render a data-prep conversion split over pods (one part per pod, then finalize).
    #[command(name = "render-prep")]
    RenderPrep(RenderPrepArgs),
    /// Render `m3d eval bench` over pods: a JobSet of one coordinator pod and N rank pods sharing an
    /// object-store output folder, and the job token as a Secret.
    #[command(name = "render-eval")]
    RenderEval(RenderEvalArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum FlavorArg {
    /// A JobSet (jobset.x-k8s.io/v1alpha2; needs the JobSet controller).
    Jobset,
    /// Plain objects: an Indexed Job + headless Service for the workers, a Deployment + Service for the
    /// coordinator.
    IndexedJob,
}

impl FlavorArg {
    fn flavor(self) -> Flavor {
        match self {
            FlavorArg::Jobset => Flavor::JobSet,
            FlavorArg::IndexedJob => Flavor::IndexedJob,
        }
    }
}

#[derive(Args)]
pub struct RenderArgs {
    /// The recipe (its data, checkpoint.url and output.run must be object store URLs).
    recipe: PathBuf,
    /// The container image with `m3d` and `m3d-coordinator` (k8s/image.sh builds one).
    #[arg(long)]
    image: String,
    /// Worker pods [default: the recipe's workers.max, else workers.min].
    #[arg(long)]
    workers: Option<u32>,
    /// GPUs per worker pod [default: 1 when workers.device is cuda, else 0].
    #[arg(long)]
    gpus_per_worker: Option<u32>,
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Name of the job's objects [default: from the recipe's name].
    #[arg(long)]
    name: Option<String>,
    /// Kueue LocalQueue: label the job for it and create it suspended, for Kueue to admit as one gang.
    #[arg(long)]
    queue: Option<String>,
    /// PriorityClass of the pods.
    #[arg(long)]
    priority_class: Option<String>,
    /// Secret whose keys become every pod's environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_ENDPOINT_URL, AWS_REGION, ...).
    #[arg(long)]
    s3_secret: Option<String>,
    /// An existing Secret holding the job token under the key `token`; without it a Secret with a fresh
    /// token is rendered.
    #[arg(long)]
    token_secret: Option<String>,
    /// Where the coordinator keeps the job state [default: <output.run>/coordinator].
    #[arg(long)]
    state: Option<String>,
    /// Recipe overrides, as `m3d train --set`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[arg(long, value_enum, default_value_t = FlavorArg::Jobset)]
    flavor: FlavorArg,
    /// CPU request of a worker pod [default: 8 with GPUs, else 2].
    #[arg(long)]
    cpu: Option<String>,
    /// Memory request (and limit) of a worker pod [default: 64Gi with GPUs, else 8Gi].
    #[arg(long)]
    memory: Option<String>,
    /// Size limit of a worker's memory-backed /dev/shm [default: 16Gi with GPUs, else 1Gi].
    #[arg(long)]
    shm: Option<String>,
    /// Seconds between SIGTERM and SIGKILL for a worker [default: from the checkpoint size, see
    /// docs/kubernetes.md].
    #[arg(long)]
    grace_period: Option<i64>,
    /// Restarts for failures other than preemption and node loss (which never count) [default: the
    /// recipe's workers.max_restarts].
    #[arg(long)]
    max_restarts: Option<u32>,
    /// Place all worker pods in one domain of this node label, exclusive to the job (JobSet exclusive
    /// placement, e.g. a node-pool label). Not `kubernetes.io/hostname` unless every worker fits one node.
    #[arg(long, value_name = "NODE_LABEL")]
    exclusive_topology: Option<String>,
    /// Write one file per object into this folder (created); without it, one YAML stream on stdout.
    #[arg(short = 'o', long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
pub struct RenderPrepArgs {
    #[arg(long)]
    image: String,
    /// Pods converting in parallel (each `--part-index $JOB_COMPLETION_INDEX --parts N`).
    #[arg(long)]
    parts: u32,
    /// The dataset URL the conversion writes (as the data-prep arguments' --out).
    #[arg(long)]
    out_url: String,
    #[arg(long)]
    name: String,
    #[arg(long, default_value = "default")]
    namespace: String,
    #[arg(long)]
    s3_secret: Option<String>,
    /// A PersistentVolumeClaim with the published raw data, mounted read-only: CLAIM:/mount/path.
    #[arg(long, value_name = "CLAIM:PATH")]
    claim: Vec<String>,
    #[arg(long)]
    cpu: Option<String>,
    #[arg(long)]
    memory: Option<String>,
    #[arg(long)]
    priority_class: Option<String>,
    #[arg(long)]
    queue: Option<String>,
    #[arg(long, value_enum, default_value_t = FlavorArg::Jobset)]
    flavor: FlavorArg,
    #[arg(short = 'o', long)]
    out: Option<PathBuf>,
    /// The `m3d data-prep` arguments of one conversion, after `--`: e.g. `-- cap --src /data/M3D_Cap --out
    /// s3://bucket/shards/cap`.
    #[arg(last = true, required = true)]
    args: Vec<String>,
}

#[derive(Args)]
pub struct RenderEvalArgs {
    #[arg(long)]
    image: String,
    #[arg(long)]
    name: String,
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Rank pods (each takes work items from the coordinator's queue, a batch at a time).
    #[arg(long)]
    ranks: u32,
    /// GPUs per rank pod (`nvidia.com/gpu`); 0 on CPU.
    #[arg(long, default_value_t = 0)]
    gpus_per_rank: u32,
    /// A PersistentVolumeClaim mounted read-only on every pod (the model folder): CLAIM:/mount/path.
    #[arg(long, value_name = "CLAIM:PATH")]
    claim: Vec<String>,
    #[arg(long)]
    s3_secret: Option<String>,
    /// An existing Secret with the job token (key `token`); without it, one is rendered with a fresh token.
    #[arg(long)]
    token_secret: Option<String>,
    #[arg(long)]
    cpu: Option<String>,
    #[arg(long)]
    memory: Option<String>,
    #[arg(long)]
    priority_class: Option<String>,
    #[arg(long)]
    queue: Option<String>,
    /// Restart rounds over the surviving ranks after a rank fails.
    #[arg(long, default_value_t = 0)]
    restarts: u32,
    /// A JobSet, or (clusters without the JobSet controller) the coordinator's Job and Service and an Indexed
    /// Job of ranks.
    #[arg(long, value_enum, default_value_t = FlavorArg::Jobset)]
    flavor: FlavorArg,
    #[arg(short = 'o', long)]
    out: Option<PathBuf>,
    /// The `m3d eval bench` arguments every pod shares, after `--`: e.g. `-- --model /models/lamed --data
    /// s3://bucket/shards/cap --volumes s3://bucket/shards/cap -o s3://bucket/bench`.
    #[arg(last = true, required = true)]
    args: Vec<String>,
}

fn claims(given: &[String]) -> Result<Vec<(String, String)>> {
    given
        .iter()
        .map(|c| match c.split_once(':') {
            Some((claim, path)) => Ok((claim.to_string(), path.to_string())),
            None => bail!("--claim {c}: expected CLAIM:/mount/path"),
        })
        .collect()
}

fn render_eval(a: RenderEvalArgs) -> Result<()> {
    let q = |v: Option<String>| v.map(k8s_openapi::apimachinery::pkg::api::resource::Quantity);
    let job = EvalJob {
        name: a.name,
        namespace: a.namespace,
        image: a.image,
        ranks: a.ranks,
        gpus_per_rank: a.gpus_per_rank,
        args: a.args,
        s3_secret: a.s3_secret,
        token: if a.token_secret.is_none() {
            m3d_k8s::new_token()
        } else {
            String::new()
        },
        token_secret: a.token_secret,
        claims: claims(&a.claim)?,
        cpu: q(a.cpu),
        memory: q(a.memory),
        priority_class: a.priority_class,
        queue: a.queue,
        restarts: a.restarts,
        flavor: a.flavor.flavor(),
    };
    let objects = m3d_k8s::render_eval(&job)?;
    emit(&objects, a.out.as_deref())
}

pub fn run(cmd: K8s) -> Result<()> {
    match cmd {
        K8s::Render(a) => render(a),
        K8s::RenderPrep(a) => render_prep(a),
        K8s::RenderEval(a) => render_eval(a),
    }
}

/// Checkpoint size (model weights + AdamW state) the default grace period is derived from: M3D-CLIP's is
/// measured (2.4 GB, docs/benchmarks.md); M3D-LaMed's is that of a 7B LLM's bf16 weights with LoRA adapters
/// and their optimizer state, rounded up.
fn checkpoint_bytes(recipe: &Recipe) -> u64 {
    match (recipe.model.kind, recipe.model.preset.as_str()) {
        (ModelKind::Clip, "m3d") => 2_400_000_000,
        (ModelKind::Lamed, p) if p != "tiny" && p != "debug" => 16_000_000_000,
        _ => 100_000_000,
    }
}

/// Seconds a worker may need to finish the step in flight before saving.
const STEP_ALLOWANCE_S: u64 = 60;

fn render(a: RenderArgs) -> Result<()> {
    let mut sets = a.sets.clone();
    // The recipe as given, for its world size and device; with --workers its own range does not matter
    // (the world is fixed below), so it is read with a world of one.
    let base = match a.workers {
        Some(_) => {
            let mut one = sets.clone();
            one.extend(["workers.min=1".to_string(), "workers.max=1".to_string()]);
            Recipe::load(&a.recipe, &one)?
        }
        None => Recipe::load(&a.recipe, &sets)?,
    };
    let workers = match a.workers {
        Some(n) => n,
        None => {
            u32::try_from(base.workers.max.unwrap_or(base.workers.min)).context("workers.max")?
        }
    };
    if workers == 0 {
        bail!("--workers 0: a job needs at least one worker");
    }
    let cuda = base.workers.device == DeviceKind::Cuda;
    let gpus = a.gpus_per_worker.unwrap_or(u32::from(cuda));
    // Every process of the gang is in every round: the world size is pods x processes per pod.
    let world = workers * gpus.max(1);
    sets.push(format!("workers.min={world}"));
    sets.push(format!("workers.max={world}"));
    let recipe = Recipe::load(&a.recipe, &sets)?;
    let quantity = |v: Option<String>, gpu: &str, cpu: &str| {
        k8s_openapi::apimachinery::pkg::api::resource::Quantity(
            v.unwrap_or_else(|| if gpus > 0 { gpu } else { cpu }.to_string()),
        )
    };
    let name = match a.name {
        Some(n) => n,
        None => m3d_k8s::sanitize_name(recipe.name(), 40),
    };
    let state_url = a
        .state
        .unwrap_or_else(|| format!("{}/coordinator", recipe.run_url().trim_end_matches('/')));
    let grace = a
        .grace_period
        .unwrap_or_else(|| m3d_k8s::grace_period_s(checkpoint_bytes(&recipe), STEP_ALLOWANCE_S));
    let job = TrainJob {
        name,
        namespace: a.namespace,
        image: a.image,
        workers,
        gpus_per_worker: gpus,
        worker_cpu: Some(quantity(a.cpu, "8", "2")),
        worker_memory: Some(quantity(a.memory, "64Gi", "8Gi")),
        shm: quantity(a.shm, "16Gi", "1Gi"),
        queue: a.queue,
        priority_class: a.priority_class,
        s3_secret: a.s3_secret,
        token: if a.token_secret.is_none() {
            m3d_k8s::new_token()
        } else {
            String::new()
        },
        token_secret: a.token_secret,
        state_url,
        flavor: a.flavor.flavor(),
        grace_period_s: grace,
        max_restarts: a.max_restarts.unwrap_or(recipe.workers.max_restarts),
        exclusive_topology: a.exclusive_topology,
        recipe,
    };
    let objects = m3d_k8s::render_train(&job)?;
    emit(&objects, a.out.as_deref())
}

fn render_prep(a: RenderPrepArgs) -> Result<()> {
    let claims = claims(&a.claim)?;
    let q = |v: Option<String>| v.map(k8s_openapi::apimachinery::pkg::api::resource::Quantity);
    let job = PrepJob {
        name: a.name,
        namespace: a.namespace,
        image: a.image,
        parts: a.parts,
        args: a.args,
        out: a.out_url,
        s3_secret: a.s3_secret,
        claims,
        cpu: q(a.cpu),
        memory: q(a.memory),
        priority_class: a.priority_class,
        queue: a.queue,
        flavor: a.flavor.flavor(),
    };
    let objects = m3d_k8s::render_prep(&job)?;
    emit(&objects, a.out.as_deref())
}

/// Writes the objects: numbered files in `dir` (a Secret's file readable by its owner only), or one stream on
/// stdout.
fn emit(objects: &[Object], dir: Option<&std::path::Path>) -> Result<()> {
    let Some(dir) = dir else {
        print!("{}", m3d_k8s::to_yaml_documents(objects)?);
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (i, o) in objects.iter().enumerate() {
        let path = dir.join(o.file_name(i));
        let yaml = o.to_yaml()?;
        write_private(&path, yaml.as_bytes(), o.kind == "Secret")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

fn write_private(path: &std::path::Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        opts.mode(0o600);
    }
    opts.open(path)?.write_all(bytes)
}
