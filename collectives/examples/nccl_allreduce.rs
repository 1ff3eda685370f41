//! NCCL all-reduce bus bandwidth on every visible GPU of this machine: one thread per GPU, one communicator per
//! thread, the unique id created by rank 0 and handed to the others as bytes (as the coordinator will).
//!
//!   nccl_allreduce [--gpus N] [--sizes-mib 4,16,64,256,1024] [--iters 20] [--dtype f32|bf16]
//!
//! Prints a markdown table: size, mean time, algorithm and bus bandwidth (nccl-tests definitions).

use std::time::{Duration, Instant};

use m3d_collectives::{
    nccl_available, nccl_library, AbortSignal, Collective, Nccl, NcclId, ReduceOp,
};
use tch::{Device, Kind, Tensor};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    nccl_available()?;
    let gpus: usize =
        arg(&args, "--gpus").map_or(Ok(tch::Cuda::device_count() as usize), |s| s.parse())?;
    anyhow::ensure!(gpus >= 1, "no CUDA device visible");
    let sizes: Vec<usize> = arg(&args, "--sizes-mib")
        .unwrap_or_else(|| "4,16,64,256,1024".into())
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let iters: usize = arg(&args, "--iters").map_or(Ok(20), |s| s.parse())?;
    let kind = match arg(&args, "--dtype").as_deref() {
        None | Some("f32") => Kind::Float,
        Some("bf16") => Kind::BFloat16,
        Some(other) => anyhow::bail!("unknown dtype {other}"),
    };
    let id_bytes = NcclId::new()?.as_bytes().to_vec();
    let lib = nccl_library()?;
    println!(
        "# NCCL {} ({}) all-reduce, {gpus} GPU(s), {kind:?}, {iters} iterations per size",
        lib.version, lib.path
    );
    println!("| size (MiB) | time (ms) | algbw (GB/s) | busbw (GB/s) |");
    println!("|---:|---:|---:|---:|");
    let results: Vec<anyhow::Result<Vec<(usize, f64)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..gpus)
            .map(|rank| {
                let (id_bytes, sizes) = (&id_bytes, &sizes);
                s.spawn(move || -> anyhow::Result<Vec<(usize, f64)>> {
                    let id = NcclId::from_bytes(id_bytes)?;
                    let mut comm = Nccl::new(
                        rank,
                        gpus,
                        &id,
                        rank,
                        Duration::from_secs(120),
                        &AbortSignal::new(),
                    )?;
                    let dev = Device::Cuda(rank);
                    let mut out = Vec::new();
                    for &mib in sizes {
                        let n = (mib << 20) / kind.elt_size_in_bytes();
                        let mut t = Tensor::full([n as i64], rank as f64 + 1.0, (kind, dev));
                        comm.all_reduce(&mut t, ReduceOp::Sum)?;
                        let want = (gpus * (gpus + 1) / 2) as f64;
                        let got = t.get(n as i64 - 1).to_kind(Kind::Double).double_value(&[]);
                        anyhow::ensure!(got == want, "rank {rank}: got {got}, expected {want}");
                        for _ in 0..3 {
                            comm.all_reduce(&mut t, ReduceOp::Sum)?;
                        }
                        comm.barrier()?;
                        let start = Instant::now();
                        for _ in 0..iters {
                            comm.all_reduce(&mut t, ReduceOp::Sum)?;
                        }
                        tch::Cuda::synchronize(rank as i64);
                        out.push((
                            n * kind.elt_size_in_bytes(),
                            start.elapsed().as_secs_f64() / iters as f64,
                        ));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a rank panicked")))
            })
            .collect()
    });
    let mut per_rank = Vec::new();
    for r in results {
        per_rank.push(r?);
    }
    for (i, &(bytes, _)) in per_rank[0].iter().enumerate() {
        // The slowest rank defines the collective's time.
        let secs = per_rank.iter().map(|r| r[i].1).fold(0.0, f64::max);
        let algbw = bytes as f64 / secs / 1e9;
        let busbw = algbw * 2.0 * (gpus as f64 - 1.0) / gpus as f64;
        println!(
            "| {} | {:.3} | {algbw:.1} | {busbw:.1} |",
            bytes >> 20,
            secs * 1e3
        );
    }
    Ok(())
}
