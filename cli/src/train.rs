//! `m3d train`, `m3d worker` and `m3d plot`: the training roles. `m3d train` runs a whole job on this
//! machine — the coordinator in this process, serving gRPC on a loopback port, and N `m3d worker`
//! processes that it supervises (a worker that dies is started again under the same id, and the
//! coordinator turns that into a restart round).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use m3d_coordinator::{
    CheckpointRef, ControlPlane, Coordinator, JobConfig, JobPhase, PlanSpec, Token,
};
use m3d_export::ExportKind;
use m3d_recipes::Recipe;
use m3d_runs::output::RunDir;
use m3d_store::Store;
use m3d_worker::checkpoint::{self, IdentityCheck};
use m3d_worker::role::{run_worker, WorkerExit, WorkerOptions};
use rand::RngCore;

use m3d_coordinator::cli::{load_token, parse_duration, runtime};

#[derive(Args)]
pub struct TrainArgs {
    /// The recipe (YAML; see docs/recipes.md).
    recipe: PathBuf,
    /// Worker processes to start (default: the recipe's workers.min).
    #[arg(long)]
    workers: Option<usize>,
    /// Override a recipe value, e.g. --set train.lr=2e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// A worker silent for this long has failed. Default: the recipe's `workers.heartbeat_timeout_s`.
    #[arg(long, value_parser = parse_duration)]
    heartbeat_timeout: Option<Duration>,
    /// Restart rounds allowed after failures. Default: the recipe's `workers.restart_rounds`.
    #[arg(long)]
    restarts: Option<u32>,
    /// Timeout of the workers' collective operations.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    collective_timeout: Duration,
    /// libtorch intra-op threads per worker (default: this machine's cores divided among the workers).
    #[arg(long)]
    threads: Option<usize>,
    /// Continue from the latest committed checkpoint under the recipe's checkpoint URL (any number of
    /// workers: the sample sequence continues exactly; a larger train.max_steps extends a finished run).
    /// Refused if the recipe changed the run's training set, global batch, seed or data order.
    #[arg(long, conflicts_with = "fresh")]
    resume: bool,
    /// With --resume: resume although these differ from the checkpoint's run (data: the training set,
    /// data.shuffle, train.global_batch, train.seed). Steps done are not redone; the sample order after
    /// the checkpoint's step differs from an uninterrupted run's.
    #[arg(
        long,
        value_name = "FIELD[,FIELD]",
        value_delimiter = ',',
        requires = "resume",
        value_parser = clap::builder::PossibleValuesParser::new(checkpoint::RunIdentity::FIELDS)
    )]
    accept_changed: Vec<String>,
    /// Delete the checkpoint folders (`step-*`) a previous run left under the checkpoint URL, and the job
    /// state, and start from step 0. Other objects under the URL are kept.
    #[arg(long)]
    fresh: bool,
    /// Start from another run's weights (repeatable): the n-th flag sets `model.init_from.<n>.path`, keeping
    /// that entry's prefix mapping, or adds an entry. A committed checkpoint (`.../checkpoints/step-N`, or a
    /// checkpoint folder for its latest), a `final/` or HF folder, a weight file, or an `s3://` folder.
    #[arg(long, value_name = "URL")]
    init_from: Vec<String>,
    /// The local folder for the job's own files: the effective recipe, `logs/` (one per worker) and
    /// `coordinator/` (the job state). Default: the run folder when output.run is a local path, else
    /// `runs/<recipe name>` (the results — metrics, final weights, plot — go to output.run in the store).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct WorkerArgs {
    /// Coordinator URL, e.g. http://10.0.0.5:7070.
    #[arg(long)]
    coordinator: String,
    /// The job's recipe (the same file the coordinator was started with).
    #[arg(long)]
    recipe: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// This worker's id, stable across its restarts (default: host name and process id).
    #[arg(long)]
    worker_id: Option<String>,
    /// Host name for rank ordering (default: the machine's host name).
    #[arg(long)]
    host: Option<String>,
    /// Address the collective ring listens on; peers connect to it.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    collective_timeout: Duration,
    /// File holding the bearer token (else M3D_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// libtorch intra-op threads (default: this host's cores divided among its workers in the round).
    #[arg(long)]
    threads: Option<usize>,
    /// Worker processes to run (one per GPU of a pod): with N > 1 this process starts N `m3d worker`s with
    /// the same flags and ids `<worker-id>-<i>`, forwards SIGTERM to them, and exits as the worst of them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    procs: u32,
}

#[derive(Args)]
pub struct EvalRetrievalArgs {
    /// A saved M3D-CLIP (a run's `final/` folder: config.json, tokenizer.json, model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// The caption shard dataset.
    #[arg(long)]
    shards: String,
    /// The split whose image-text pairs are retrieved (M3D-Bench uses `hard_test`).
    #[arg(long, default_value = "test")]
    split: String,
    /// Only the split's first K pairs (M3D-Bench retrieves among 2,000).
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Where the encoders run: cpu, cuda (the first GPU) or cuda:N [default: cuda when a GPU is visible,
    /// else cpu].
    #[arg(long, value_parser = eval_device)]
    device: Option<String>,
    #[arg(long)]
    json: bool,
}

fn eval_device(s: &str) -> Result<String, String> {
    m3d_eval::parse_device(s).map(|_| s.to_string())
}

#[derive(Args)]
pub struct ExportArgs {
    /// A run's `final/` folder or a checkpoint folder (`.../checkpoints/step-000000020`).
    #[arg(long)]
    from: PathBuf,
    /// The folder to write.
    #[arg(long)]
    out: PathBuf,
    /// Only the vision encoder, in M3D's `pretrained_ViT` layout (MONAI keys without a prefix).
    #[arg(long, conflicts_with = "merge_lora")]
    vision_encoder: bool,
    /// Fold LoRA adapters into their base weights (as PEFT's merge_and_unload).
    #[arg(long)]
    merge_lora: bool,
    /// A LaMed in the released M3D-LaMed layout (LoRA merged, `config.json` of `LamedPhi3ForCausalLM` /
    /// `LamedLlamaForCausalLM`, tokenizer files), loadable by `m3d generate` and by the reference's code.
    #[arg(long, conflicts_with_all = ["merge_lora", "vision_encoder"])]
    released: bool,
}

#[derive(Args)]
pub struct MergeLoraArgs {
    /// A run's `final/` folder (with `adapter/`) or a checkpoint folder of a LoRA run.
    #[arg(long)]
    from: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct PlotArgs {
    /// Metrics files (JSONL) or run folders, local or in a store (`s3://bucket/runs/x`: the run's metrics,
    /// as far as they were flushed while it trains); several are drawn as one figure.
    inputs: Vec<String>,
    /// The PNG to write: a path or a store URL (`s3://bucket/plots/loss.png`).
    #[arg(long, short)]
    out: String,
}

pub fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The run folder of a recipe: a local folder, or a folder in a store (`file://`, `s3://`).
fn run_dir(recipe: &Recipe) -> RunDir {
    RunDir::of(&recipe.run_url())
}

pub fn worker(a: WorkerArgs) -> Result<()> {
    if a.procs > 1 {
        return worker_processes(&a);
    }
    let recipe = Recipe::load(&a.recipe, &a.sets)?;
    let token = load_token(a.token_file.as_ref())?;
    let host = a.host.unwrap_or_else(host_name);
    let opts = WorkerOptions {
        coordinator: a.coordinator,
        token,
        worker_id: a
            .worker_id
            .unwrap_or_else(|| format!("{host}-{}", std::process::id())),
        host,
        bind: a.bind,
        collective_timeout: a.collective_timeout,
        run: run_dir(&recipe),
        threads: a.threads,
        after_open: Some(m3d_allocator::release_freed_memory),
        stop: crate::signals::stop_flag()?,
    };
    match run_worker(&recipe, &opts) {
        Ok(WorkerExit::Finished) => tracing::info!(worker = %opts.worker_id, "finished"),
        Ok(WorkerExit::Stopped) => tracing::info!(worker = %opts.worker_id, "the job is over"),
        Ok(WorkerExit::Terminated { step }) => {
            let what = match step {
                Some(s) if recipe.checkpoint.every > 0 => {
                    format!("stopped after step {s}, checkpoint committed")
                }
                Some(s) => format!("stopped after step {s} (the recipe writes no checkpoints)"),
                None => "stopped before training".to_string(),
            };
            tracing::info!(worker = %opts.worker_id, "{what}");
            return Err(m3d_coordinator::cli::Terminated(what).into());
        }
        Err(e) => {
            // Bad data, a bad recipe, a refused token: starting the worker again would fail the same way.
            eprintln!(
                "error: worker `{}`: {}",
                opts.worker_id,
                m3d_coordinator::cli::report::render(&anyhow::Error::new(e))
            );
            std::process::exit(FATAL_EXIT);
        }
    }
    Ok(())
}

/// `m3d worker --procs N`: N worker processes of one host (a pod with N GPUs). Ranks are ordered by host, then
/// id, so they are contiguous and their local ranks 0..N pick `cuda:0..N`.
fn worker_processes(a: &WorkerArgs) -> Result<()> {
    let host = a.host.clone().unwrap_or_else(host_name);
    let base = a
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("{host}-{}", std::process::id()));
    // Every flag as given, less the ones set per child.
    let mut flags: Vec<std::ffi::OsString> = Vec::new();
    let mut argv = std::env::args_os().skip_while(|x| x != "worker").skip(1);
    while let Some(x) = argv.next() {
        let text = x.to_string_lossy();
        if text == "--procs" || text == "--worker-id" || text == "--host" {
            argv.next();
        } else if !["--procs=", "--worker-id=", "--host="]
            .iter()
            .any(|p| text.starts_with(p))
        {
            flags.push(x);
        }
    }
    let exe = std::env::current_exe().context("locating the m3d executable")?;
    let stop = crate::signals::stop_flag()?;
    let mut children = Vec::new();
    for i in 0..a.procs {
        let child = Command::new(&exe)
            .arg("worker")
            .args(&flags)
            .args(["--worker-id", &format!("{base}-{i}"), "--host", &host])
            .spawn()
            .with_context(|| format!("starting worker process {i}"))?;
        children.push(Some(child));
    }
    let mut stopping = false;
    let mut codes: Vec<Option<i32>> = vec![None; children.len()];
    loop {
        if !stopping && stop.load(std::sync::atomic::Ordering::SeqCst) {
            stopping = true;
            for c in children.iter().flatten() {
                crate::signals::terminate(c.id());
            }
        }
        for (i, slot) in children.iter_mut().enumerate() {
            if let Some(c) = slot {
                if let Some(status) = c.try_wait()? {
                    codes[i] = Some(status.code().unwrap_or(1));
                    *slot = None;
                }
            }
        }
        let failed = codes
            .iter()
            .flatten()
            .find(|&&c| c != 0 && c != i32::from(m3d_coordinator::cli::Terminated::EXIT_STATUS));
        if let Some(&code) = failed {
            // One process of the pod failed: so does the pod (its Job restarts it whole).
            for c in children.iter_mut().flatten() {
                let _ = c.kill();
                let _ = c.wait();
            }
            std::process::exit(code);
        }
        if children.iter().all(Option::is_none) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if codes.iter().flatten().all(|&c| c == 0) {
        return Ok(());
    }
    Err(m3d_coordinator::cli::Terminated(format!("{} worker processes stopped", a.procs)).into())
}

/// The error a worker reported before exiting with [`FATAL_EXIT`]: the last `error: worker ...` line of its log,
/// without the `error: ` prefix (the supervisor's own report adds it), so the user sees the cause without
/// opening the log.
fn worker_error(log: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("error: worker "))
        .map(|l| format!("worker {l}"))
}

/// Exit status of a worker that failed in a way a restart cannot fix (the supervisor stops the job).
pub const FATAL_EXIT: i32 = 3;

struct Supervised {
    id: String,
    child: Child,
    starts: u32,
    exited_ok: bool,
}

/// How the supervisor starts a worker process.
struct Launch {
    exe: PathBuf,
    url: String,
    recipe: PathBuf,
    token: String,
    logs: PathBuf,
    timeout: Duration,
    threads: Option<usize>,
}

impl Launch {
    fn spawn(&self, id: &str) -> Result<Child> {
        let log_path = self.logs.join(format!("{id}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let err = log.try_clone()?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(["worker", "--coordinator", &self.url, "--worker-id", id]);
        if let Some(t) = self.threads {
            cmd.arg("--threads").arg(t.to_string());
        }
        cmd.arg("--recipe")
            .arg(&self.recipe)
            .arg("--collective-timeout")
            .arg(format!("{}ms", self.timeout.as_millis()))
            // The token goes through the environment, never the command line (`ps` shows that).
            .env("M3D_TOKEN", &self.token)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting worker {id} ({})", self.exe.display()))
    }
}

/// Where a new job starts, and what `--fresh` deleted to start there.
struct Start {
    checkpoint: Option<CheckpointRef>,
    deleted: Option<checkpoint::Deleted>,
}

/// Where a new job starts: with `--resume`, the latest committed checkpoint, if it belongs to the same run
/// (or the differences are accepted) and steps are left after it; step 0 otherwise, refusing to mix a new
/// run with an old run's checkpoints unless `--fresh` deletes them.
fn start_point(recipe: &Recipe, a: &TrainArgs, plan: &PlanSpec) -> Result<Start> {
    let base = recipe.checkpoint_url();
    let store =
        Store::open(&base).with_context(|| format!("opening the checkpoint store {base}"))?;
    let steps = checkpoint::committed_steps(&store)?;
    if a.resume {
        let Some(&step) = steps.last() else {
            bail!("--resume: no committed checkpoint under {base}");
        };
        let url = checkpoint::step_url(&base, step);
        check_same_run(recipe, &store, step, &url, &a.accept_changed)?;
        let total = plan.total_steps();
        if step >= total {
            bail!(
                "--resume: the latest checkpoint {url} is at step {step} and the recipe's run has {total} steps: \
                 nothing is left to train (a larger train.max_steps extends the run; `m3d export --from {url}` \
                 writes its weights)"
            );
        }
        return Ok(Start {
            checkpoint: Some(CheckpointRef { step, url }),
            deleted: None,
        });
    }
    if a.fresh {
        let deleted = checkpoint::delete_checkpoints(&store)
            .with_context(|| format!("--fresh: deleting the checkpoints under {base}"))?;
        return Ok(Start {
            checkpoint: None,
            deleted: Some(deleted),
        });
    }
    if !steps.is_empty() {
        bail!(
            "{base} holds checkpoints of a previous run (steps {steps:?}): pass --resume to continue it, or \
             --fresh to delete them and start again"
        );
    }
    Ok(Start {
        checkpoint: None,
        deleted: None,
    })
}

/// Refuses to resume from the checkpoint of `step` if its run differs from `recipe`'s in a field not in
/// `accept`; warns when the checkpoint predates recorded run identities.
fn check_same_run(
    recipe: &Recipe,
    store: &Store,
    step: u64,
    url: &str,
    accept: &[String],
) -> Result<()> {
    let recorded = checkpoint::read_state(store, step)?;
    let now = checkpoint::RunIdentity::of(recipe)
        .context("--resume: identifying the recipe's training set")?;
    match checkpoint::check_identity(&recorded, url, &now, accept) {
        Ok(IdentityCheck::Same) => {}
        Ok(IdentityCheck::Unrecorded) => tracing::warn!(
            checkpoint = url,
            "the checkpoint predates recorded run identities (state format 0): its training set, global \
             batch, seed and data order could not be checked against the recipe's"
        ),
        Ok(IdentityCheck::Accepted(changes)) => {
            for c in changes {
                println!("--accept-changed {}: resuming with {c}", c.field);
            }
        }
        Err(e) => {
            let checkpoint::CheckpointError::Changed { changes, .. } = &e else {
                return Err(e.into());
            };
            let fields: Vec<&str> = changes.iter().map(|c| c.field).collect();
            bail!(
                "--resume: {e}. To resume anyway, pass --accept-changed {}: the steps done are kept, and the \
                 sample order after step {step} differs from an uninterrupted run's",
                fields.join(",")
            );
        }
    }
    Ok(())
}

/// What `--fresh` deleted, e.g. `--fresh: deleted 3 checkpoints (step-000000004 .. step-000000012), 41
/// objects under <url>, and the job state <run>/coordinator`.
fn fresh_report(base: &str, d: &checkpoint::Deleted, state: Option<&Path>) -> String {
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let checkpoints = match (d.steps.first(), d.steps.last()) {
        (Some(&first), Some(&last)) => {
            let range = if first == last {
                checkpoint::step_dir(first)
            } else {
                format!(
                    "{} .. {}",
                    checkpoint::step_dir(first),
                    checkpoint::step_dir(last)
                )
            };
            Some(format!(
                "{} ({range}), {} under {base}",
                plural(d.steps.len(), "checkpoint"),
                plural(d.objects, "object")
            ))
        }
        _ => None,
    };
    match (checkpoints, state) {
        (Some(c), Some(s)) => format!("--fresh: deleted {c}, and the job state {}", s.display()),
        (Some(c), None) => format!("--fresh: deleted {c}"),
        (None, Some(s)) => format!(
            "--fresh: deleted the job state {} (no checkpoints under {base})",
            s.display()
        ),
        (None, None) => format!("--fresh: nothing to delete (no checkpoints under {base})"),
    }
}

pub fn train(a: TrainArgs) -> Result<()> {
    let started = Instant::now();
    let mut recipe = Recipe::load(&a.recipe, &a.sets)?;
    for (i, url) in a.init_from.iter().enumerate() {
        match recipe.model.init_from.get_mut(i) {
            Some(entry) => entry.path = url.clone(),
            None => recipe.model.init_from.push(m3d_recipes::InitFrom {
                path: url.clone(),
                select_prefix: None,
                add_prefix: None,
                exclude: Vec::new(),
                strict: true,
            }),
        }
    }
    if !a.init_from.is_empty() {
        recipe.validate(&format!("{} with --init-from", a.recipe.display()))?;
    }
    // Job settings: the flag, else the recipe.
    let heartbeat_timeout = a
        .heartbeat_timeout
        .unwrap_or_else(|| recipe.heartbeat_timeout());
    let restarts = a.restarts.unwrap_or(recipe.workers.restart_rounds);
    let workers = a.workers.unwrap_or(recipe.workers.min);
    if !recipe.world_sizes().contains(&workers) || recipe.grad_accum(workers).is_err() {
        bail!(
            "--workers {workers}: recipe `{}` runs with workers.min..=workers.max = {:?} workers whose number \
             divides global_batch {}",
            recipe.name(),
            recipe.world_sizes(),
            recipe.train.global_batch
        );
    }
    let run = run_dir(&recipe);
    // Logs and the job state are this machine's: local files even when the results go to a store.
    let work = match (&a.work_dir, &run) {
        (Some(dir), _) => dir.clone(),
        (None, RunDir::Local(dir)) => dir.clone(),
        (None, RunDir::Store(_)) => PathBuf::from("runs").join(recipe.name()),
    };
    std::fs::create_dir_all(work.join("logs"))
        .with_context(|| format!("creating {}", work.display()))?;
    // The effective recipe (overrides applied) is what every worker reads.
    let effective = work.join("recipe.yaml");
    std::fs::write(&effective, recipe.to_yaml())
        .with_context(|| format!("writing {}", effective.display()))?;
    if let RunDir::Store(url) = &run {
        // Beside the results, so the run says what produced it; also fails early on an unreachable store.
        run.put("recipe.yaml", recipe.to_yaml().into_bytes())
            .with_context(|| format!("writing the recipe to the run {url}"))?;
    }
    let set = m3d_coordinator::TrainingSet::of(&recipe)?;
    let plan = m3d_coordinator::plan_spec(&recipe, set.samples)?;
    let fingerprint = set.fingerprint;
    let start = start_point(&recipe, &a, &plan)?;
    let state = work.join("coordinator");
    let had_state = state.exists();
    if had_state {
        // A new `m3d train` is a new job (resuming one is `--resume`, with checkpoints).
        std::fs::remove_dir_all(&state).with_context(|| format!("clearing {}", state.display()))?;
    }
    if let Some(deleted) = &start.deleted {
        let report = fresh_report(
            &recipe.checkpoint_url(),
            deleted,
            had_state.then_some(state.as_path()),
        );
        println!("{report}");
    }
    let initial_checkpoint = start.checkpoint;
    let cfg = JobConfig {
        data_fingerprint: Some(fingerprint),
        initial_checkpoint: initial_checkpoint.clone(),
        min_workers: workers as u32,
        max_workers: workers as u32,
        rendezvous_timeout: Duration::from_secs(120),
        heartbeat_timeout,
        max_restarts: restarts,
        plan,
    };
    let mut secret = [0u8; 24];
    rand::rng().fill_bytes(&mut secret);
    let token_text: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let token = Token::new(&token_text);
    let exe = std::env::current_exe().context("locating the m3d executable")?;
    let rt = runtime()?;
    let state_url = state.display().to_string();
    let coord = rt
        .block_on(Coordinator::open(cfg, Some(&state_url)))
        .with_context(|| format!("opening the job state at {state_url}"))?;
    let (listener, addr) = rt
        .block_on(m3d_coordinator::grpc::bind("127.0.0.1:0".parse()?))
        .context("binding the coordinator")?;
    let url = format!("http://{addr}");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let coord = coord.clone();
        rt.spawn(async move {
            m3d_coordinator::serve(coord, listener, token, async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    if let Some(c) = &initial_checkpoint {
        println!("resuming from step {} ({})", c.step, c.url);
    }
    let local_files = match &run {
        RunDir::Local(dir) if *dir == work => String::new(),
        _ => format!("; logs and job state in {}", work.display()),
    };
    println!(
        "m3d train {}: {} worker(s), {} steps of {} samples ({} in the training set); coordinator {url}; run {}{local_files}",
        recipe.name(),
        workers,
        plan.total_steps(),
        plan.global_batch,
        plan.samples,
        run.display()
    );
    let logs = work.join("logs");
    let launch = Launch {
        exe,
        url: url.clone(),
        recipe: effective.clone(),
        token: token_text,
        logs: logs.clone(),
        timeout: a.collective_timeout,
        threads: a.threads,
    };
    // SIGTERM/SIGINT: the workers are stopped the same way (each finishes its step, rank 0 commits a
    // checkpoint), the coordinator keeps serving until they have exited, and --resume continues.
    let stop = crate::signals::stop_flag()?;
    let mut stopping = false;
    let mut children = Vec::new();
    for i in 0..workers {
        let id = format!("w{i}");
        let child = launch.spawn(&id)?;
        println!("worker {id} pid {}", child.id());
        children.push(Supervised {
            id,
            child,
            starts: 1,
            exited_ok: false,
        });
    }
    // A resumed job starts at its checkpoint's step, which no worker has reported a loss for.
    let mut last_step = coord.status().step;
    let outcome: Result<()> = loop {
        std::thread::sleep(Duration::from_millis(200));
        if !stopping && stop.load(std::sync::atomic::Ordering::SeqCst) {
            stopping = true;
            println!("stopping: the workers finish their step and save a checkpoint");
            for w in children.iter().filter(|w| !w.exited_ok) {
                crate::signals::terminate(w.child.id());
            }
        }
        let status = coord.status();
        if status.step != last_step && status.phase == JobPhase::Running {
            // Rank 0 reports about once a second, not every step: a line whenever a multiple of log_every
            // was passed.
            let every = recipe.train.log_every.max(1);
            let crossed = status.step / every != last_step / every;
            last_step = status.step;
            if crossed {
                println!(
                    "step {}/{}  loss {:.4}",
                    status.step, status.total_steps, status.last_loss
                );
            }
        }
        if status.phase == JobPhase::Failed {
            break Err(anyhow::anyhow!(
                "the job failed: {}",
                status.failure.unwrap_or_default()
            ));
        }
        let mut failed_worker = None;
        for w in children.iter_mut().filter(|w| !w.exited_ok) {
            if let Some(code) = w.child.try_wait()? {
                if code.success()
                    || (stopping
                        && code.code()
                            == Some(i32::from(m3d_coordinator::cli::Terminated::EXIT_STATUS)))
                {
                    w.exited_ok = true;
                } else if code.code() == Some(FATAL_EXIT) {
                    let log = logs.join(format!("{}.log", w.id));
                    failed_worker = Some(match worker_error(&log) {
                        Some(line) => format!("{line} (log: {})", log.display()),
                        None => format!("worker {} failed; see {}", w.id, log.display()),
                    });
                } else if status.phase.is_final() || stopping {
                    failed_worker = Some(format!("worker {} exited with {code}", w.id));
                } else if w.starts > restarts {
                    failed_worker = Some(format!(
                        "worker {} exited with {code} after {} starts; see {}",
                        w.id,
                        w.starts,
                        logs.join(format!("{}.log", w.id)).display()
                    ));
                } else {
                    println!(
                        "worker {} exited with {code}; starting it again (round {} restarts)",
                        w.id, status.generation
                    );
                    w.child = launch.spawn(&w.id)?;
                    w.starts += 1;
                    println!("worker {} pid {}", w.id, w.child.id());
                }
            }
        }
        if let Some(f) = failed_worker {
            break Err(anyhow::anyhow!(f));
        }
        if children.iter().all(|w| w.exited_ok) {
            if status.phase == JobPhase::Completed {
                break Ok(());
            }
            if stopping {
                let at = match &status.last_checkpoint {
                    Some(c) => format!(
                        "last committed checkpoint: step {} ({}); `m3d train --resume` continues",
                        c.step, c.url
                    ),
                    None => "no checkpoint was committed".to_string(),
                };
                break Err(m3d_coordinator::cli::Terminated(at).into());
            }
            break Err(anyhow::anyhow!(
                "every worker exited but the job is {}",
                status.phase
            ));
        }
    };
    for w in children.iter_mut().filter(|w| !w.exited_ok) {
        let _ = w.child.kill();
        let _ = w.child.wait();
    }
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
    outcome?;
    let status = coord.status();
    let metrics = run.metrics_display();
    let png = run.child("loss.png");
    m3d_runs::plot::plot_inputs(&[run.display()], &png, m3d_runs::plot::PlotSize::default())
        .with_context(|| format!("plotting {metrics}"))?;
    println!(
        "done: {} steps in {:.1} s, final loss {:.4}, {} restart(s); final weights {}, metrics {metrics}, plot {png}",
        status.step,
        started.elapsed().as_secs_f64(),
        status.last_loss,
        status.restarts,
        run.child("final"),
    );
    Ok(())
}

pub fn plot(a: PlotArgs) -> Result<()> {
    if a.inputs.is_empty() {
        bail!("give at least one metrics file or run folder");
    }
    m3d_runs::plot::plot_inputs(&a.inputs, &a.out, m3d_runs::plot::PlotSize::default())?;
    println!("wrote {}", a.out);
    Ok(())
}

pub fn eval_retrieval(a: EvalRetrievalArgs) -> Result<()> {
    let device = match a.device.as_deref() {
        Some(d) => m3d_eval::parse_device(d).map_err(anyhow::Error::msg)?,
        None => m3d_eval::default_device(),
    };
    let r = m3d_eval::clip_retrieval_on(&a.model, &a.shards, &a.split, a.limit, a.batch, device)
        .with_context(|| format!("evaluating {}", a.model.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "retrieval on {} pairs of `{}` (chance R@1 {:.3}):\n  image->text R@1 {:.3}  R@5 {:.3}  R@10 {:.3}\n  \
             text->image R@1 {:.3}  R@5 {:.3}  R@10 {:.3}",
            r.pairs,
            a.split,
            1.0 / r.pairs as f64,
            r.image_to_text_r1,
            r.image_to_text_r5,
            r.image_to_text_r10,
            r.text_to_image_r1,
            r.text_to_image_r5,
            r.text_to_image_r10
        );
    }
    Ok(())
}

pub fn export(a: ExportArgs) -> Result<()> {
    let kind = if a.vision_encoder {
        ExportKind::VisionEncoder
    } else if a.released {
        ExportKind::Released
    } else {
        ExportKind::Full {
            merge_lora: a.merge_lora,
        }
    };
    let files = m3d_export::export(&a.from, &a.out, kind)
        .with_context(|| format!("exporting {}", a.from.display()))?;
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

pub fn merge_lora(a: MergeLoraArgs) -> Result<()> {
    export(ExportArgs {
        from: a.from,
        out: a.out,
        vision_encoder: false,
        merge_lora: true,
        released: false,
    })
}
