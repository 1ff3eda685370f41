//! The `m3d` command. Thin glue: parses arguments, sets up logging and threads, calls the library crates, and
//! reports their typed errors with context.

use anyhow::Result;
use clap::{Parser, Subcommand};
use m3d_coordinator::cli::LogArgs;

mod control;
mod generate;
mod k8s;
mod plan;
mod signals;
mod train;

// See m3d-allocator: volume-sized buffers must be reused, not returned to the kernel after every item.
#[global_allocator]
static ALLOC: m3d_allocator::MiMalloc = m3d_allocator::MiMalloc;

#[derive(Parser)]
#[command(
    name = "m3d",
    version,
    about = "Distributed training for M3D 3-D medical multi-modal models"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert M3D-Data into volume shards, synthesise data, inspect shards.
    #[command(name = "data-prep", subcommand)]
    DataPrep(m3d_prep_cli::DataPrep),
    /// Run a job's coordinator (gRPC control plane: rendezvous, data plan, failures, checkpoints).
    Coordinator(m3d_coordinator::cli::CoordinatorArgs),
    /// Show a running job's status, from its coordinator.
    Status(control::StatusArgs),
    /// Run a whole training job on this machine: the coordinator and N worker processes.
    Train(train::TrainArgs),
    /// Run one worker of a job (as a cluster does, one per GPU or pod).
    Worker(train::WorkerArgs),
    /// Render loss / learning-rate curves of metrics files to a PNG.
    Plot(train::PlotArgs),
    /// Write plain weights (HF safetensors, or the vision encoder alone) from a run or a checkpoint.
    Export(train::ExportArgs),
    /// Fold a run's LoRA adapters into its base weights.
    #[command(name = "merge-lora")]
    MergeLora(train::MergeLoraArgs),
    /// Evaluate a trained model on held-out shards.
    #[command(subcommand)]
    Eval(Eval),
    /// Ask a trained M3D-LaMed about volumes: answers, boxes, and masks for `[SEG]` answers.
    Generate(generate::GenerateArgs),
    /// What a recipe costs before launching it: parameters, memory per GPU, FLOPs, time.
    Plan(plan::PlanArgs),
    /// Render Kubernetes objects for a recipe (JobSet) or a data-prep conversion.
    #[command(subcommand)]
    K8s(k8s::K8s),
}

#[derive(Subcommand)]
enum Eval {
    /// M3D-CLIP image-text retrieval (R@1/5/10 in both directions).
    Retrieval(train::EvalRetrievalArgs),
    /// M3D-Bench for M3D-LaMed: report generation, VQA, REC/REG and segmentation on the test splits.
    Bench(Box<generate::EvalBenchArgs>),
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Coordinator(a) => control::coordinator(a),
        Command::Status(a) => control::status(a),
        Command::Train(a) => train::train(a),
        Command::Worker(a) => train::worker(a),
        Command::Plot(a) => train::plot(a),
        Command::Export(a) => train::export(a),
        Command::MergeLora(a) => train::merge_lora(a),
        Command::Eval(Eval::Retrieval(a)) => train::eval_retrieval(a),
        Command::Generate(a) => generate::generate(a),
        Command::Eval(Eval::Bench(a)) => generate::eval_bench(*a),
        Command::K8s(cmd) => k8s::run(cmd),
        Command::Plan(a) => plan::plan(a),
        // The conversion links no libtorch: run it in `m3d-data-prep`, which does not pay libtorch's start-up.
        Command::DataPrep(cmd) => control::hand_over("m3d-data-prep", "data-prep")
            .unwrap_or_else(|| m3d_prep_cli::run(cmd)),
    }
}

fn main() {
    m3d_allocator::configure();
    let cli = Cli::parse();
    cli.log.init();
    let status = match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", m3d_coordinator::cli::report::render(&e));
            i32::from(m3d_coordinator::cli::exit_code(&e))
        }
    };
    exit_now(status)
}

/// Ends the process without running C++ static destructors. `exit` would run libtorch's: it frees the
/// operator registry its static constructors built, about 3,000 mappings returned one `munmap` at a time,
/// measured 0.2 s per process (`strace -tt`), paid by every rank of an `eval bench` job and then by the
/// parent that waits for them. Nothing of ours needs them: by now every file we wrote is closed (and synced
/// where it matters), logs go to stderr unbuffered, and stdout is flushed here.
fn exit_now(status: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` takes a plain integer and does not return; skipping atexit handlers is its purpose.
    #[allow(unsafe_code)]
    unsafe {
        libc::_exit(status)
    }
}
