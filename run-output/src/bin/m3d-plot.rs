//! `m3d-plot OUT.png METRICS...`: loss and learning-rate curves of one or more runs as a PNG (one line per
//! input). `m3d plot` is the same with flags. Inputs are metrics files, run folders or store URLs of either
//! (`s3://bucket/runs/x` reads a run's metrics parts, also while it trains); OUT may be a store URL too.

use std::process::ExitCode;

use m3d_runs::plot::{plot_inputs, PlotSize};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("usage: m3d-plot OUT.png METRICS [METRICS ...]  (paths or s3:// / file:// URLs)");
        return ExitCode::from(2);
    }
    let out = &args[0];
    match plot_inputs(&args[1..], out, PlotSize::default()) {
        Ok(()) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("m3d-plot: {e}");
            ExitCode::FAILURE
        }
    }
}
