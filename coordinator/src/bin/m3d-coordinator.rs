//! `m3d-coordinator`: the control plane's process (the flags of `m3d coordinator`). It links neither libtorch
//! nor the data loader, so the coordinator's container needs neither and it idles at a few tens of MiB.

use clap::Parser;
use m3d_coordinator::cli::LogArgs;

#[derive(Parser)]
#[command(
    name = "m3d-coordinator",
    version,
    about = "The m3d coordinator: rendezvous, ranks, the data plan, checkpoints and restarts of one job"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    args: m3d_coordinator::cli::CoordinatorArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    cli.log.init();
    match m3d_coordinator::cli::run(cli.args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", m3d_coordinator::cli::report::render(&e));
            m3d_coordinator::cli::exit_status(&e)
        }
    }
}
