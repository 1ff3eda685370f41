//! Reader throughput: reads every volume of a dataset the way a training worker does (`VolumeReader`: one
//! ranged read of the volume's row group, crc-checked, decoded), then decodes and augments it with a random
//! `AugmentParams` into a reused f32 buffer (`decode_sample_into`, as `worker/src/data.rs`). Used by
//! bench/data_prep.py.
//!
//! Usage: read_bench <dataset url> [--passes N] [--threads T] [--seed S]
//! Prints one JSON line: {"volumes": .., "seconds": .., "volumes_per_s": .., "read_s": .., "augment_s": ..}
//! (`read_s` / `augment_s`: time of thread 0 in the ranged read + row-group decode and in the decode + augment).

use std::time::{Duration, Instant};

use m3d_shards::dataset::{decode_sample_into, ShardDataset};
use m3d_shards::VolumeReader;
use m3d_volume::augment::{AugmentConfig, AugmentParams};
use rand::SeedableRng;

// Decoding allocates a few MiB per volume; glibc hands such blocks back to the kernel on free, so every volume
// paid page faults again (measured: half the reader's time). The `m3d` binary's allocator policy (m3d-allocator:
// mimalloc, freed memory kept for 1 s), so that this measures what a worker does.
#[global_allocator]
static ALLOC: m3d_allocator::MiMalloc = m3d_allocator::MiMalloc;

fn arg(args: &[String], name: &str, default: u64) -> Result<u64, String> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a number")),
        None => Ok(default),
    }
}

struct Counts {
    volumes: u64,
    read: Duration,
    augment: Duration,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    m3d_allocator::configure();
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .ok_or("usage: read_bench <url> [--passes N] [--threads T] [--seed S]")?;
    let passes = arg(&args, "--passes", 1)?;
    let threads = arg(&args, "--threads", 1)?.max(1) as usize;
    let seed = arg(&args, "--seed", 42)?;
    let ds = ShardDataset::open(url)?;
    let reader = VolumeReader::open(&ds)?;
    let volumes = reader.len();
    let cfg = AugmentConfig::default();
    let start = Instant::now();
    let counts: Vec<Result<Counts, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let reader = &reader;
                let cfg = &cfg;
                scope.spawn(move || -> Result<Counts, String> {
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed + t as u64);
                    let (mut scratch, mut image) = (Vec::new(), Vec::new());
                    let mut c = Counts {
                        volumes: 0,
                        read: Duration::ZERO,
                        augment: Duration::ZERO,
                    };
                    for _ in 0..passes {
                        for i in (t..volumes).step_by(threads) {
                            let t0 = Instant::now();
                            let rec = reader.read(i, true, false).map_err(|e| e.to_string())?;
                            let t1 = Instant::now();
                            image.resize(rec.numel(), 0.0);
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
                            c.read += t1 - t0;
                            c.augment += t1.elapsed();
                            c.volumes += 1;
                        }
                    }
                    Ok(c)
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
    let (mut n, mut read_s, mut augment_s) = (0, None, None);
    for c in counts {
        let c = c?;
        n += c.volumes;
        read_s.get_or_insert(c.read.as_secs_f64());
        augment_s.get_or_insert(c.augment.as_secs_f64());
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"volumes": n, "seconds": seconds, "volumes_per_s": n as f64 / seconds,
            "threads": threads, "read_s": read_s, "augment_s": augment_s})
    );
    Ok(())
}
