//! Reader throughput: streams every volume of a dataset, decodes it and applies the reference training
//! augmentation into an f32 buffer, as a training worker does. Used by bench/data_prep.py.
//!
//! Usage: read_bench <dataset url> [--passes N] [--threads T] [--seed S]
//! Prints one JSON line: {"volumes": .., "seconds": .., "volumes_per_s": ..}.

use std::time::Instant;

use m3d_shards::dataset::{decode_sample_into, ShardDataset};
use m3d_volume::augment::{AugmentConfig, AugmentParams};
use rand::SeedableRng;

// Decoding allocates a few MiB per volume; glibc hands such blocks back to the kernel on free, so every volume
// paid page faults again (measured: half the reader's time). mimalloc keeps them; the `m3d` binary does the same.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn arg(args: &[String], name: &str, default: u64) -> Result<u64, String> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a number")),
        None => Ok(default),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .ok_or("usage: read_bench <url> [--passes N] [--threads T] [--seed S]")?;
    let passes = arg(&args, "--passes", 1)?;
    let threads = arg(&args, "--threads", 1)?.max(1) as usize;
    let seed = arg(&args, "--seed", 42)?;
    let ds = ShardDataset::open(url)?;
    let shards = ds.manifest().volume_shards.len();
    let cfg = AugmentConfig::default();
    let start = Instant::now();
    let counts: Vec<Result<u64, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let ds = &ds;
                let cfg = &cfg;
                scope.spawn(move || -> Result<u64, String> {
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed + t as u64);
                    let (mut scratch, mut image) = (Vec::new(), Vec::new());
                    let mut n = 0u64;
                    for _ in 0..passes {
                        for shard in (t..shards).step_by(threads) {
                            for rec in ds.stream_volumes(shard).map_err(|e| e.to_string())? {
                                let rec = rec.map_err(|e| e.to_string())?;
                                image.resize(rec.shape.iter().map(|&d| d as usize).product(), 0.0);
                                let p = AugmentParams::sample(cfg, &mut rng);
                                decode_sample_into(
                                    &rec,
                                    None,
                                    Some(&p),
                                    &mut scratch,
                                    &mut image,
                                    None,
                                )
                                .map_err(|e| e.to_string())?;
                                std::hint::black_box(&image);
                                n += 1;
                            }
                        }
                    }
                    Ok(n)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("reader thread panicked".to_string()))
            })
            .collect()
    });
    let mut volumes = 0;
    for c in counts {
        volumes += c?;
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"volumes": volumes, "seconds": seconds, "volumes_per_s": volumes as f64 / seconds, "threads": threads})
    );
    Ok(())
}
