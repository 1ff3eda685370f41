//! All-reduce bus bandwidth of `RingTcp` for one rank; run one process per rank (bench/allreduce.py does).
//!
//!   allreduce_bench --rank R --world N --addrs 127.0.0.1:P0,127.0.0.1:P1,... [--sizes-mib 4,16,64,256]
//!
//! Prints one JSON line per size from rank 0: size, mean seconds per all-reduce over the timed iterations
//! (after warm-up), and bus bandwidth as nccl-tests define it: `size * 2 (n - 1) / n / time`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use m3d_collectives::{Collective, ReduceOp, RingTcp};
use tch::{Kind, Tensor};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let need = |name: &str| arg(&args, name).ok_or_else(|| anyhow::anyhow!("missing {name}"));
    let rank: usize = need("--rank")?.parse()?;
    let world: usize = need("--world")?.parse()?;
    let addrs: Vec<SocketAddr> = need("--addrs")?
        .split(',')
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let sizes: Vec<usize> = arg(&args, "--sizes-mib")
        .unwrap_or_else(|| "4,16,64,256".into())
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let budget_mib: usize = arg(&args, "--budget-mib").map_or(Ok(1024), |s| s.parse())?;
    tch::set_num_threads(1);

    let mut ring = RingTcp::connect(rank, world, &addrs, Duration::from_secs(60))?;
    if let Some(c) = arg(&args, "--chunk-bytes") {
        ring.set_chunk_bytes(c.parse()?);
    }
    for mib in sizes {
        let n = (mib << 20) / 4;
        // Correctness first: rank r contributes r + 1 everywhere.
        let mut t = Tensor::full(
            [n as i64],
            rank as f64 + 1.0,
            (Kind::Float, tch::Device::Cpu),
        );
        ring.all_reduce(&mut t, ReduceOp::Sum)?;
        let want = (world * (world + 1) / 2) as f64;
        let got = t.sum(Kind::Double).double_value(&[]) / n as f64;
        anyhow::ensure!(
            got == want,
            "rank {rank}: mean of the sum is {got}, expected {want}"
        );
        let iters = (budget_mib / mib).clamp(3, 20);
        let warmup = if mib >= 64 { 1 } else { 2 };
        for _ in 0..warmup {
            ring.all_reduce(&mut t, ReduceOp::Sum)?;
        }
        ring.barrier()?;
        let start = Instant::now();
        for _ in 0..iters {
            ring.all_reduce(&mut t, ReduceOp::Sum)?;
        }
        let secs = start.elapsed().as_secs_f64() / iters as f64;
        if rank == 0 {
            let bytes = (n * 4) as f64;
            let busbw = bytes * 2.0 * (world as f64 - 1.0) / world as f64 / secs / 1e9;
            println!(
                "{{\"impl\":\"m3d-ring\",\"world\":{world},\"size_bytes\":{},\"iters\":{iters},\"time_s\":{secs},\"busbw_gbs\":{busbw}}}",
                n * 4
            );
        }
    }
    ring.barrier()?;
    Ok(())
}
