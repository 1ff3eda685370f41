//! `m3d-data-prep`: the `m3d data-prep` subcommands in a process that links no libtorch (`m3d data-prep` hands
//! over to it when it is installed beside `m3d`).

use clap::Parser;
use m3d_coordinator::cli::LogArgs;

#[global_allocator]
static ALLOC: m3d_allocator::MiMalloc = m3d_allocator::MiMalloc;

#[derive(Parser)]
#[command(
    name = "m3d-data-prep",
    version,
    about = "Convert M3D-Data into volume shards, synthesise data, inspect shards (`m3d data-prep`)"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: m3d_prep_cli::DataPrep,
}

fn main() -> std::process::ExitCode {
    m3d_allocator::configure();
    let cli = Cli::parse();
    cli.log.init();
    match m3d_prep_cli::run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", m3d_coordinator::cli::report::render(&e));
            m3d_coordinator::cli::exit_status(&e)
        }
    }
}
