//! `m3d coordinator` and `m3d status`: the control-plane roles, and [`hand_over`], how `m3d` runs a role in the
//! lean binary installed beside it. The coordinator itself lives in `m3d-coordinator` (its flags:
//! `m3d_coordinator::cli`); `m3d coordinator` hands over to that binary, so the control plane never maps libtorch,
//! and runs it in-process only where that binary is missing. `m3d data-prep` hands over to `m3d-data-prep` alike.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use m3d_coordinator::cli::{load_token, runtime, CoordinatorArgs};
use m3d_coordinator::Client;

/// A binary installed beside the running `m3d`, if there is one.
fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.with_file_name(name);
    bin.is_file().then_some(bin)
}

/// Replaces this process by the binary `name` installed beside `m3d`, given the command line as it came minus the
/// `subcommand` word: the lean binaries take the same flags, and the global ones (`--log-format`, `-v`) wherever
/// they stood, before or after it (passing them again would give them twice). Returns `None` where that binary
/// is not installed (the caller then runs the same code in this process), else the error of the `exec`, which
/// returns only when it fails.
pub fn hand_over(name: &str, subcommand: &str) -> Option<Result<()>> {
    let bin = sibling_binary(name)?;
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let at = args.iter().position(|a| a == subcommand)?;
    args.remove(at);
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&bin).args(&args).exec();
    Some(Err(err).with_context(|| format!("running {}", bin.display())))
}

/// `m3d coordinator ...`: `m3d-coordinator ...` with the same arguments ([`hand_over`]), or the coordinator in
/// this process when that binary is missing.
pub fn coordinator(a: CoordinatorArgs) -> Result<()> {
    hand_over("m3d-coordinator", "coordinator").unwrap_or_else(|| {
        tracing::warn!(
            "m3d-coordinator is not installed beside m3d: running the coordinator in this process, which maps \
             libtorch (about 0.5 GiB resident)"
        );
        m3d_coordinator::cli::run(a)
    })
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["coordinator", "run"])))]
pub struct StatusArgs {
    /// Coordinator URL, e.g. http://127.0.0.1:7070.
    #[arg(long)]
    coordinator: Option<String>,
    /// The run's output.run (a folder, `file://` or `s3://`): also show its metrics as far as rank 0 has
    /// flushed them (in a store, every `output.metrics_flush_s` seconds).
    #[arg(long, value_name = "URL")]
    run: Option<String>,
    /// Print JSON instead of a summary.
    #[arg(long)]
    json: bool,
    /// File holding the bearer token (else M3D_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

/// What `m3d status --run` shows of a run's metrics.
struct MetricsProgress {
    run: String,
    lines: usize,
    last: Option<m3d_runs::metrics::MetricsLine>,
}

impl MetricsProgress {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "run": self.run, "lines": self.lines, "last": self.last })
    }
}

fn metrics_progress(run: &str) -> Result<MetricsProgress> {
    let (_, lines) = m3d_runs::output::read_run_metrics(run)
        .with_context(|| format!("reading the metrics of {run}"))?;
    Ok(MetricsProgress {
        run: run.to_string(),
        lines: lines.len(),
        last: lines.last().cloned(),
    })
}

fn print_metrics(m: &MetricsProgress) {
    let Some(l) = &m.last else {
        println!("metrics: none yet under {}", m.run);
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    // A line without a time (written by hand, or by an older m3d) has none to show.
    let age = if l.time > 0.0 {
        format!(", last {:.0} s ago", (now - l.time).max(0.0))
    } else {
        String::new()
    };
    println!(
        "metrics: step {}  loss {:.4}  lr {:.3e}  {:.1} samples/s  ({} lines{age}, {})",
        l.step, l.loss, l.lr, l.samples_per_s, m.lines, m.run
    );
}

pub fn status(a: StatusArgs) -> Result<()> {
    let metrics = a.run.as_deref().map(metrics_progress).transpose()?;
    let Some(coordinator) = &a.coordinator else {
        if let Some(m) = &metrics {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&m.json())?);
            } else {
                print_metrics(m);
            }
        }
        return Ok(());
    };
    let token = load_token(a.token_file.as_ref())?;
    let s = runtime()?.block_on(async {
        let mut c = Client::connect(coordinator, token).await?;
        c.status().await
    })?;
    if a.json {
        match &metrics {
            // With --run, the job's status and the run's metrics side by side; without, as before.
            Some(m) => println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({ "job": &s, "metrics": m.json() })
                )?
            ),
            None => println!("{}", serde_json::to_string_pretty(&s)?),
        }
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
    if let Some(m) = &metrics {
        print_metrics(m);
    }
    Ok(())
}
