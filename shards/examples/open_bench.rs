//! Opening a dataset at scale, for bench/open_stream.py (against Mosaic Streaming).
//!
//! `open_bench write <url> --volumes N [--per-shard 32] [--shape 4x32x32] [--seed S] [--no-lookup]` writes N
//! random u8 volumes (one caption sample each) as volume shards with the volume index, the sample lookup (unless
//! `--no-lookup`) and manifest, as `m3d data-prep` lays them out.
//!
//! `open_bench open <url> [--batch 8] [--seed S] [--no-lookup]` opens the dataset as a worker does (through the
//! sample lookup where the dataset has one: the manifest alone, then per sample its lookup block and volume;
//! else, or with `--no-lookup`, the manifest, sample shards and volume index), then reads the volumes of one
//! batch of random samples, and prints one JSON line: seconds to
//! open, seconds to the first batch (from the start), requests and bytes read before the first batch (all of
//! them, and those of volume shards), and the process's peak RSS.

use std::time::Instant;

use m3d_shards::manifest::{sample_shard_key, volume_shard_key};
use m3d_shards::{
    shard_layout, write_index, ImageDtype, LookupReader, Manifest, SampleRecord, ShardDataset,
    ShardEntry, Store, Task, VolumeIndex, VolumeReader, VolumeRecord, WriteOptions,
};
use rand::{Rng, SeedableRng};

#[global_allocator]
static ALLOC: m3d_allocator::MiMalloc = m3d_allocator::MiMalloc;

type Error = Box<dyn std::error::Error>;

fn has(args: &[String], name: &str) -> bool {
    args.iter().any(|a| a == name)
}

fn flag(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn num(args: &[String], name: &str, default: u64) -> Result<u64, Error> {
    Ok(flag(args, name, &default.to_string()).parse()?)
}

fn sample(i: usize, volume_id: &str) -> SampleRecord {
    SampleRecord {
        sample_id: format!("s{i:07}"),
        dataset: "cap".into(),
        task: Task::Caption,
        split: "train".into(),
        volume_id: volume_id.to_string(),
        mask_index: None,
        question: None,
        answer: None,
        answer_choice: None,
        question_type: None,
        class_name: None,
        bbox: None,
        report: Some(format!("report of case {i}")),
        source_row: None,
    }
}

fn write(url: &str, args: &[String]) -> Result<(), Error> {
    let n = num(args, "--volumes", 1000)? as usize;
    let per_shard = num(args, "--per-shard", 32)?.max(1) as usize;
    let seed = num(args, "--seed", 0)?;
    let shape: Vec<u32> = flag(args, "--shape", "4x32x32")
        .split('x')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let [d, h, w] = shape[..] else {
        return Err("--shape is DxHxW".into());
    };
    let store = Store::open(url)?;
    let shards = n.div_ceil(per_shard);
    // Shards are written from a few threads: on S3 each put is mostly waiting.
    let written: Vec<Result<(ShardEntry, m3d_shards::ShardLayout), String>> = std::thread::scope(
        |s| {
            let threads = 8;
            let handles: Vec<_> = (0..threads)
            .map(|t| {
                let store = store.clone();
                s.spawn(move || {
                    (t..shards)
                        .step_by(threads)
                        .map(|k| {
                            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ k as u64);
                            let vols: Vec<VolumeRecord> = (k * per_shard..((k + 1) * per_shard).min(n))
                                .map(|i| {
                                    let image: Vec<u8> =
                                        (0..d * h * w).map(|_| rng.random::<u8>()).collect();
                                    VolumeRecord {
                                        volume_id: format!("v{i:07}"),
                                        dataset: "cap".into(),
                                        source: format!("synthetic/{i}"),
                                        shape: [1, d, h, w],
                                        dtype: ImageDtype::U8,
                                        image_crc32: crc32fast::hash(&image),
                                        image: image.into(),
                                        masks: Vec::new(),
                                    }
                                })
                                .collect();
                            let key = volume_shard_key(k);
                            let bytes = m3d_shards::write_volume_shard(&vols, &WriteOptions::default())
                                .map_err(|e| e.to_string())?;
                            let entry = ShardEntry::describe(&key, vols.len() as u64, &bytes);
                            let layout =
                                shard_layout(&bytes, &key, k as u32).map_err(|e| e.to_string())?;
                            store.put(&key, bytes).map_err(|e| e.to_string())?;
                            Ok((k, entry, layout))
                        })
                        .collect::<Vec<Result<(usize, ShardEntry, m3d_shards::ShardLayout), String>>>()
                })
            })
            .collect();
            let mut all: Vec<(usize, ShardEntry, m3d_shards::ShardLayout)> = Vec::new();
            let mut errors = Vec::new();
            for h in handles {
                for r in h.join().unwrap_or_default() {
                    match r {
                        Ok(x) => all.push(x),
                        Err(e) => errors.push(Err(e)),
                    }
                }
            }
            all.sort_by_key(|(k, _, _)| *k);
            errors
                .into_iter()
                .chain(all.into_iter().map(|(_, e, l)| Ok((e, l))))
                .collect()
        },
    );
    let mut manifest = Manifest::new("cap", "open_bench");
    let mut layouts = Vec::new();
    for r in written {
        let (entry, layout) = r?;
        manifest.volume_shards.push(entry);
        layouts.push(layout);
    }
    let samples: Vec<SampleRecord> = (0..n).map(|i| sample(i, &format!("v{i:07}"))).collect();
    let key = sample_shard_key(0);
    let bytes = m3d_shards::write_sample_shard(&samples, &WriteOptions::default())?;
    manifest
        .sample_shards
        .push(ShardEntry::describe(&key, samples.len() as u64, &bytes));
    store.put(&key, bytes)?;
    manifest.count_samples(&samples);
    manifest.update_totals();
    let index = VolumeIndex::from_layouts(&layouts);
    write_index(&store, &mut manifest, &index)?;
    if !has(args, "--no-lookup") {
        m3d_shards::lookup::write_lookup(&store, &mut manifest, &samples, &index, None)?;
    }
    manifest.save(&store)?;
    println!(
        "{}",
        serde_json::json!({"volumes": n, "shards": shards, "bytes": manifest.totals.bytes})
    );
    Ok(())
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn open(url: &str, args: &[String]) -> Result<(), Error> {
    let batch = num(args, "--batch", 8)? as usize;
    let seed = num(args, "--seed", 0)?;
    let start = Instant::now();
    let (store, log) = Store::open_existing(url)?.with_io_log();
    let head = Manifest::load_head(&store)?;
    if let Some(entry) = head.sample_lookup.filter(|_| !has(args, "--no-lookup")) {
        // As a training worker opens it (`ShardLoader::open_lookup`): the manifest alone, then per sample its
        // lookup block and its volume.
        let lookup = LookupReader::new(store.clone(), entry);
        let reader = VolumeReader::learning(store, head.totals.volumes as usize);
        let opened = start.elapsed().as_secs_f64();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let picks: Vec<u64> = (0..batch)
            .map(|_| rng.random_range(0..lookup.len()))
            .collect();
        let mut volumes = Vec::new();
        for row in lookup.get_many(&picks)? {
            let v = row.volume.ok_or("a sample without a volume")?;
            reader.learn(&v);
            volumes.push(v.position as usize);
        }
        read_concurrently(&reader, &volumes)?;
        return report(start, opened, &log, lookup.len() as usize, "lookup");
    }
    let ds = ShardDataset::open_store(store)?;
    let reader = VolumeReader::open(&ds)?;
    let opened = start.elapsed().as_secs_f64();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let samples = ds.samples();
    let picks: Vec<usize> = (0..batch)
        .map(|_| rng.random_range(0..samples.len()))
        .collect();
    let mut volumes = Vec::new();
    for &i in &picks {
        let id = samples[i].volume_id.as_str();
        volumes.push(
            reader
                .locate(id)
                .ok_or(format!("volume {id} not indexed"))?,
        );
    }
    read_concurrently(&reader, &volumes)?;
    report(start, opened, &log, samples.len(), "tables")
}

/// Reads `volumes` (positions) as the loader does a batch's: concurrently.
fn read_concurrently(reader: &VolumeReader, volumes: &[usize]) -> Result<(), Error> {
    let results: Vec<Result<usize, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = volumes
            .iter()
            .map(|&v| {
                s.spawn(move || {
                    reader
                        .read(v, true, true)
                        .map(|r| r.image.len())
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("reader panicked".into())))
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(())
}

/// Prints the JSON line of `open`.
fn report(
    start: Instant,
    opened: f64,
    log: &m3d_shards::IoLog,
    samples: usize,
    path: &str,
) -> Result<(), Error> {
    let first = start.elapsed().as_secs_f64();
    let (requests, bytes) = log.totals("");
    let (shard_requests, shard_bytes) = log.totals("volumes/");
    println!(
        "{}",
        serde_json::json!({
            "open_s": opened, "first_batch_s": first, "requests": requests, "bytes": bytes,
            "volume_shard_requests": shard_requests, "volume_shard_bytes": shard_bytes,
            "samples": samples, "peak_rss_mib": peak_rss_mib(), "path": path,
        })
    );
    Ok(())
}

fn main() -> Result<(), Error> {
    m3d_allocator::configure();
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: open_bench write|open <url> [options]";
    let (cmd, url) = (args.get(1).ok_or(usage)?, args.get(2).ok_or(usage)?);
    match cmd.as_str() {
        "write" => write(url, &args),
        "open" => open(url, &args),
        _ => Err(usage.into()),
    }
}
