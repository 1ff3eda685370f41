//! The coordinator's command line, shared by the `m3d-coordinator` binary (the control plane's own process:
//! no libtorch, no loader, so it idles at a few tens of MiB) and `m3d coordinator`, which runs that binary when it
//! is installed beside `m3d` and this code in-process otherwise. Also the flag parsers the other roles share
//! ([`parse_duration`], [`load_token`]), logging ([`init_logging`]), exit codes ([`exit_code`]) and how an error
//! is printed ([`report::render`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::io::IsTerminal;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use crate::{ControlPlane, Coordinator, JobConfig, PlanSpec, Token};

pub mod report;

#[derive(Args)]
pub struct CoordinatorArgs {
    /// Address to serve gRPC on (port 0: any free port; the address is printed on stdout).
    #[arg(long)]
    listen: SocketAddr,
    /// Where the job state lives (path, file://, s3://): a restarted coordinator continues from it.
    #[arg(long)]
    state: String,
    /// A round starts with at least this many workers once the rendezvous timeout has passed. Default with
    /// --recipe: the recipe's `workers.min`; required without.
    #[arg(long)]
    min_workers: Option<u32>,
    /// A round starts at once with this many workers. Default: the recipe's `workers.max` (else its
    /// `workers.min`), or --min-workers without --recipe.
    #[arg(long)]
    max_workers: Option<u32>,
    /// How long a round waits for slow starters (e.g. 30s, 500ms, 2m), counted from its first registration.
    /// Default: the recipe's `workers.rendezvous_timeout_s`, else 30s.
    #[arg(long, value_parser = parse_duration)]
    rendezvous_timeout: Option<Duration>,
    /// A worker silent for this long has failed. Default: the recipe's `workers.heartbeat_timeout_s`, else
    /// 10s.
    #[arg(long, value_parser = parse_duration)]
    heartbeat_timeout: Option<Duration>,
    /// Restart rounds allowed after failures; one more failure fails the job. Default: the recipe's
    /// `workers.restart_rounds`, else 3.
    #[arg(long)]
    restarts: Option<u32>,
    /// Take the data plan (samples, global batch, seed, epochs, max steps, shuffle) and the workers' range from
    /// this recipe and its shards. Without it, --samples, --global-batch and --min-workers must be given: there are
    /// no defaults for a plan.
    #[arg(long, conflicts_with_all = ["samples", "global_batch", "seed", "epochs"])]
    recipe: Option<PathBuf>,
    /// Overrides of the recipe's values (as `m3d train --set`).
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "recipe")]
    sets: Vec<String>,
    /// Samples in the training set (the data plan's range 0..N); required without --recipe.
    #[arg(long)]
    samples: Option<u64>,
    /// Samples per global step over all ranks (must be divisible by the world size); required without --recipe.
    #[arg(long)]
    global_batch: Option<u64>,
    /// Seed of the sample order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    /// File holding the bearer token workers must present (else the M3D_TOKEN environment variable; neither: no
    /// authentication).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Exit once the job has completed or failed: after a short grace period for the last status queries,
    /// and after a failure once every worker still running has heard it (at most a heartbeat timeout).
    #[arg(long)]
    exit_on_finish: bool,
    /// On SIGTERM, keep serving until the round's workers have gone quiet (they save and commit a checkpoint
    /// on their own SIGTERM) or this long has passed; then write the job state and exit with status 143.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    drain_timeout: Duration,
}

/// The process was stopped by SIGTERM after saving what it had to (the coordinator its job state, a worker
/// its checkpoint): the binaries exit with status 143 (128 + SIGTERM), not 0, because a stopped process has
/// not finished its work — Kubernetes would count a pod that exits 0 as a completed index of its Job.
#[derive(Debug, thiserror::Error)]
#[error("stopped by SIGTERM: {0}")]
pub struct Terminated(pub String);

impl Terminated {
    /// The exit status for a process stopped this way.
    pub const EXIT_STATUS: u8 = 143;
}

/// The exit status for `e`: [`Terminated::EXIT_STATUS`] when it is a [`Terminated`], else 1.
pub fn exit_status(e: &anyhow::Error) -> std::process::ExitCode {
    std::process::ExitCode::from(exit_code(e))
}

/// [`exit_status`] as the number, for a process that ends through `_exit`.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<Terminated>().is_some() {
        Terminated::EXIT_STATUS
    } else {
        1
    }
}

/// How the roles log (to stderr): human-readable on a terminal, JSON lines for clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

impl LogFormat {
    /// The flag's value, for handing it to another process.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        }
    }
}

/// The logging flags every m3d binary takes (`--log-format`, `-v`), before or after its subcommand.
#[derive(Args, Clone, Copy)]
pub struct LogArgs {
    /// Log format: human on a terminal, json for clusters.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "M3D_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// More logging (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl LogArgs {
    /// [`init_logging`] with these flags.
    pub fn init(self) {
        init_logging(self.log_format, self.verbose);
    }
}

/// Installs the process's `tracing` subscriber: `info`, `debug` (-v) or `trace` (-vv) unless `RUST_LOG` says
/// otherwise.
pub fn init_logging(format: LogFormat, verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Parses `500ms`, `30s`, `2m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a duration like 30s or 500ms"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "" | "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

/// The token from `--token-file` or `M3D_TOKEN`. Read here, never passed on a command line (which `ps` shows)
/// and never printed.
pub fn load_token(file: Option<&PathBuf>) -> Result<Option<Token>> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading the token file {}", f.display()))?;
        let Some(t) = Token::new(&text) else {
            bail!("the token file {} is empty", f.display());
        };
        return Ok(Some(t));
    }
    Ok(std::env::var("M3D_TOKEN")
        .ok()
        .as_deref()
        .and_then(Token::new))
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("m3d-coordinator")
        .build()
        .context("starting the async runtime")
}

/// Runs the coordinator until interrupted (or, with `--exit-on-finish`, until the job has ended).
pub fn run(a: CoordinatorArgs) -> Result<()> {
    let recipe = match &a.recipe {
        Some(path) => Some(m3d_recipes::Recipe::load(path, &a.sets)?),
        None => None,
    };
    let checkpoint_base = recipe.as_ref().map(|r| r.checkpoint_url());
    let (plan, min_workers, max_workers, data_fingerprint) = match &recipe {
        Some(recipe) => {
            let set = crate::TrainingSet::of(recipe)?;
            let min = match a.min_workers {
                Some(m) => m,
                None => u32::try_from(recipe.workers.min).context("workers.min")?,
            };
            let max = match (a.max_workers, a.min_workers, recipe.workers.max) {
                (Some(m), _, _) => m,
                // --min-workers alone sets the round's size, as it does without a recipe.
                (None, Some(m), _) => m,
                (None, None, Some(m)) => u32::try_from(m).context("workers.max")?,
                (None, None, None) => min,
            };
            (
                crate::plan_spec(recipe, set.samples)?,
                min,
                max,
                Some(set.fingerprint),
            )
        }
        None => {
            let missing: Vec<&str> = [
                ("--samples", a.samples.is_none()),
                ("--global-batch", a.global_batch.is_none()),
                ("--min-workers", a.min_workers.is_none()),
            ]
            .into_iter()
            .filter_map(|(flag, missing)| missing.then_some(flag))
            .collect();
            if !missing.is_empty() {
                bail!(
                    "m3d coordinator plans a job from --recipe, or from --samples, --global-batch and \
                     --min-workers given explicitly (missing: {}); it has no default plan",
                    missing.join(", ")
                );
            }
            let min = a.min_workers.unwrap_or(1);
            let plan = PlanSpec {
                kind: crate::PlanKind::Train,
                max_steps: None,
                samples: a.samples.unwrap_or(0),
                global_batch: a.global_batch.unwrap_or(0),
                seed: a.seed,
                epochs: a.epochs,
                shuffle: crate::Shuffle::Global,
            };
            (plan, min, a.max_workers.unwrap_or(min), None)
        }
    };
    // Job settings: the flag, else the recipe, else the recipe schema's defaults.
    let defaults = m3d_recipes::WorkersSection::default();
    let workers = recipe.as_ref().map(|r| &r.workers).unwrap_or(&defaults);
    let heartbeat_timeout = a
        .heartbeat_timeout
        .unwrap_or_else(|| Duration::from_secs_f64(workers.heartbeat_timeout_s));
    let cfg = JobConfig {
        data_fingerprint,
        initial_checkpoint: None,
        min_workers,
        max_workers,
        rendezvous_timeout: a
            .rendezvous_timeout
            .unwrap_or_else(|| Duration::from_secs_f64(workers.rendezvous_timeout_s)),
        heartbeat_timeout,
        max_restarts: a.restarts.unwrap_or(workers.restart_rounds),
        plan,
    };
    let token = load_token(a.token_file.as_ref())?;
    // A checkpoint saved on SIGTERM may have been committed in the store after the previous coordinator
    // stopped answering: the newest committed one is where the next round resumes.
    let found = match &checkpoint_base {
        Some(base) => crate::checkpoints::latest_committed(base)
            .with_context(|| format!("listing the checkpoints under {base}"))?,
        None => None,
    };
    serve_job(
        cfg,
        ServeOptions {
            listen: a.listen,
            state: a.state,
            token,
            exit_on_finish: a.exit_on_finish,
            drain_timeout: a.drain_timeout,
        },
        found,
    )
}

/// How [`serve_job`] serves a job.
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// Where the job state lives (path, file://, s3://).
    pub state: String,
    pub token: Option<Token>,
    /// Exit once the job has completed or failed (after a short grace period for the last status queries, and
    /// after a failure once every worker still running has heard it, at most a heartbeat timeout).
    pub exit_on_finish: bool,
    /// On SIGTERM, how long to keep serving while the workers stop.
    pub drain_timeout: Duration,
}

/// Serves the job `cfg` until interrupted (or, with `exit_on_finish`, until it has ended), starting from the
/// committed checkpoint `found` when there is one. What `m3d coordinator` runs, and the coordinator of
/// `m3d eval bench --serve`.
pub fn serve_job(
    cfg: JobConfig,
    a: ServeOptions,
    found: Option<crate::CheckpointRef>,
) -> Result<()> {
    let (drain_timeout, token) = (a.drain_timeout, a.token);
    let heartbeat_timeout = cfg.heartbeat_timeout;
    runtime()?.block_on(async move {
        let coord = Coordinator::open(cfg, Some(&a.state))
            .await
            .with_context(|| format!("opening the job state at {}", a.state))?;
        if let Some(c) = found {
            coord
                .adopt_checkpoint(c)
                .await
                .with_context(|| format!("writing the job state at {}", a.state))?;
        }
        let (listener, addr) = crate::grpc::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        // The first line of stdout is the address, for scripts and tests that asked for port 0.
        println!("m3d coordinator listening on {addr}");
        tracing::info!(%addr, state = %a.state, auth = token.is_some(), "coordinator serving");
        let mut watch = coord.watch();
        let exit_on_finish = a.exit_on_finish;
        let finish_coord = coord.clone();
        let terminated = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (drain_coord, drain_flag) = (coord.clone(), terminated.clone());
        let shutdown = async move {
            let finished = async {
                if !exit_on_finish {
                    return std::future::pending::<()>().await;
                }
                while !watch.borrow_and_update().phase.is_final() {
                    if watch.changed().await.is_err() {
                        return;
                    }
                }
                // After a failure, until every rank still working has called and heard it (each calls at
                // least once per heartbeat interval, well within the timeout), so that none waits on a
                // coordinator gone away instead; then a grace period for the last status queries.
                let started = std::time::Instant::now();
                while !finish_coord.unheard().is_empty() && started.elapsed() < heartbeat_timeout {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let unheard = finish_coord.unheard();
                if !unheard.is_empty() {
                    tracing::warn!(workers = ?unheard, "exiting before these workers heard that the job failed");
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            };
            // Kubernetes stops a pod with SIGTERM: the job state is in the store, so a replacement continues.
            let terminate = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            let stop = tokio::select! {
                _ = tokio::signal::ctrl_c() => "interrupted",
                _ = terminate => "terminated",
                _ = finished => {
                    tracing::info!("job finished: shutting down");
                    return;
                }
            };
            drain_flag.store(true, std::sync::atomic::Ordering::SeqCst);
            drain_coord.drain();
            // Workers stopped with us save a checkpoint first and commit it here: serve until they are gone.
            // Quiet for longer than a heartbeat interval (a third of the timeout): a worker between two beats
            // is not gone.
            let quiet = (heartbeat_timeout / 2).max(Duration::from_secs(2));
            let started = std::time::Instant::now();
            tracing::info!(
                signal = stop,
                timeout_s = drain_timeout.as_secs_f64(),
                "draining: serving until the workers have stopped"
            );
            while !drain_coord.members_quiet(quiet) && started.elapsed() < drain_timeout {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            tracing::info!(drained_s = started.elapsed().as_secs_f64(), "shutting down");
        };
        crate::serve(coord.clone(), listener, token, shutdown)
            .await
            .context("serving gRPC")?;
        coord
            .flush()
            .await
            .with_context(|| format!("writing the job state at {}", a.state))?;
        if terminated.load(std::sync::atomic::Ordering::SeqCst) && !coord.status().phase.is_final()
        {
            return Err(Terminated(format!("job state saved at {}", a.state)).into());
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("").is_err());
    }
}
