//! `m3d-coordinator`: the control plane's process (the flags of `m3d coordinator`). It links neither libtorch
//! nor the data loader, so the coordinator's container needs neither and it idles at a few tens of MiB.

use std::io::IsTerminal;

use clap::{Parser, ValueEnum};

#[derive(Parser)]
#[command(
    name = "m3d-coordinator",
    version,
    about = "The m3d coordinator: rendezvous, ranks, the data plan, checkpoints and restarts of one job"
)]
struct Cli {
    /// Log format: human on a terminal, json for clusters.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, env = "M3D_LOG_FORMAT")]
    log_format: LogFormat,
    /// More logging (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(flatten)]
    args: m3d_coordinator::cli::CoordinatorArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    match m3d_coordinator::cli::run(cli.args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
