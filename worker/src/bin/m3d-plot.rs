//! `m3d-plot OUT.png METRICS.jsonl...`: loss and learning-rate curves of one or more runs as a PNG (one
//! line per file). Becomes `m3d plot` when the training commands land.

use std::path::PathBuf;
use std::process::ExitCode;

use m3d_worker::plot::{plot_files, PlotSize};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("usage: m3d-plot OUT.png METRICS.jsonl [METRICS.jsonl ...]");
        return ExitCode::from(2);
    }
    let out = PathBuf::from(&args[0]);
    let files: Vec<PathBuf> = args[1..].iter().map(PathBuf::from).collect();
    match plot_files(&files, &out, PlotSize::default()) {
        Ok(()) => {
            println!("{}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("m3d-plot: {e}");
            ExitCode::FAILURE
        }
    }
}
