//! `m3d-coordinator`: the control plane's process (the flags of `m3d coordinator`). It links neither libtorch
//! nor the data loader, so the coordinator's container needs neither and it idles at a few tens of MiB.

use clap::Parser;
use m3d_coordinator::cli::{init_logging, LogFormat};

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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.verbose);
    match m3d_coordinator::cli::run(cli.args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            m3d_coordinator::cli::exit_status(&e)
        }
    }
}
