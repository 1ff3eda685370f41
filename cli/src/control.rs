//! `m3d coordinator` and `m3d status`: the control-plane roles (the coordinator never touches tensors; with
//! `--recipe` it reads the shard indexes to size the data plan).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use m3d_coordinator::{Client, ControlPlane, Coordinator, JobConfig, PlanSpec, Token};

#[derive(Args)]
pub struct CoordinatorArgs {
    /// Address to serve gRPC on (port 0: any free port; the address is printed on stdout).
    #[arg(long)]
    listen: SocketAddr,
    /// Where the job state lives (path, file://, s3://): a restarted coordinator continues from it.
    #[arg(long)]
    state: String,
    /// A round starts with at least this many workers once the rendezvous timeout has passed.
    #[arg(long, default_value_t = 1)]
    min_workers: u32,
    /// A round starts at once with this many workers (default: --min-workers).
    #[arg(long)]
    max_workers: Option<u32>,
    /// How long a round waits for slow starters (e.g. 30s, 500ms, 2m), counted from its first registration.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    rendezvous_timeout: Duration,
    /// A worker silent for this long has failed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    heartbeat_timeout: Duration,
    /// Restart rounds allowed after failures; one more failure fails the job.
    #[arg(long, default_value_t = 3)]
    restarts: u32,
    /// Take the data plan (samples, global batch, seed, epochs, max steps) from this recipe and its shards,
    /// instead of --samples / --global-batch / --seed / --epochs.
    #[arg(long, conflicts_with_all = ["samples", "global_batch", "seed", "epochs"])]
    recipe: Option<PathBuf>,
    /// Overrides of the recipe's values (as `m3d train --set`).
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "recipe")]
    sets: Vec<String>,
    /// Samples in the training set (the data plan's range 0..N).
    #[arg(long, default_value_t = 1024)]
    samples: u64,
    /// Samples per global step over all ranks (must be divisible by the world size).
    #[arg(long, default_value_t = 8)]
    global_batch: u64,
    /// Seed of the sample order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    /// File holding the bearer token workers must present (else the M3D_TOKEN environment variable; neither: no
    /// authentication).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Exit (after a short grace period for the last status queries) once the job has completed or failed.
    #[arg(long)]
    exit_on_finish: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    /// Coordinator URL, e.g. http://127.0.0.1:7070.
    #[arg(long)]
    coordinator: String,
    /// Print JSON instead of a summary.
    #[arg(long)]
    json: bool,
    /// File holding the bearer token (else M3D_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
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

pub fn coordinator(a: CoordinatorArgs) -> Result<()> {
    let plan = match &a.recipe {
        Some(path) => {
            let recipe = m3d_recipes::Recipe::load(path, &a.sets)?;
            let data = m3d_worker::dataset::TrainData::open(&recipe)?;
            crate::train::plan_for(&recipe, &data)?
        }
        None => PlanSpec {
            max_steps: None,
            samples: a.samples,
            global_batch: a.global_batch,
            seed: a.seed,
            epochs: a.epochs,
        },
    };
    let cfg = JobConfig {
        initial_checkpoint: None,
        min_workers: a.min_workers,
        max_workers: a.max_workers.unwrap_or(a.min_workers),
        rendezvous_timeout: a.rendezvous_timeout,
        heartbeat_timeout: a.heartbeat_timeout,
        max_restarts: a.restarts,
        plan,
    };
    let token = load_token(a.token_file.as_ref())?;
    runtime()?.block_on(async move {
        let coord = Coordinator::open(cfg, Some(&a.state))
            .await
            .with_context(|| format!("opening the job state at {}", a.state))?;
        let (listener, addr) = m3d_coordinator::grpc::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        // The first line of stdout is the address, for scripts and tests that asked for port 0.
        println!("m3d coordinator listening on {addr}");
        tracing::info!(%addr, state = %a.state, auth = token.is_some(), "coordinator serving");
        let mut watch = coord.watch();
        let exit_on_finish = a.exit_on_finish;
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
                tokio::time::sleep(Duration::from_secs(2)).await;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
                _ = finished => tracing::info!("job finished: shutting down"),
            }
        };
        m3d_coordinator::serve(coord, listener, token, shutdown)
            .await
            .context("serving gRPC")
    })
}

pub fn status(a: StatusArgs) -> Result<()> {
    let token = load_token(a.token_file.as_ref())?;
    let s = runtime()?.block_on(async {
        let mut c = Client::connect(&a.coordinator, token).await?;
        c.status().await
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "job: {}  round {}  world size {} (min {}, max {})  restarts {}/{}",
        s.phase,
        s.generation,
        s.world_size,
        s.min_workers,
        s.max_workers,
        s.restarts,
        s.max_restarts
    );
    println!(
        "position: step {}/{} (epoch {}, step {} in epoch)  round resumed at step {}  last loss {:.4}",
        s.step, s.total_steps, s.epoch, s.step_in_epoch, s.resume_step, s.last_loss
    );
    if s.waiting > 0 {
        println!("waiting in rendezvous: {}", s.waiting);
    }
    if let Some(c) = &s.last_checkpoint {
        println!("last checkpoint: step {} at {}", c.step, c.url);
    }
    if let Some(f) = &s.failure {
        println!("last failure: {f}");
    }
    for m in s.members.iter().take(16) {
        println!(
            "  rank {:>4}  {}  {}  {}  gpus {}",
            m.rank, m.worker_id, m.host, m.collective_addr, m.gpus
        );
    }
    if s.members.len() > 16 {
        println!("  ... {} more (use --json)", s.members.len() - 16);
    }
    Ok(())
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
