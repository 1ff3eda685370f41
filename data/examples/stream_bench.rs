//! The data plane's throughput and a worker's memory, for bench/stream_throughput.py (against Mosaic Streaming).
//!
//! `stream_bench read <url> --rank R --world W [--global-batch 32] [--steps 200] [--warmup 2]
//! [--shuffle global|blocks:32x8] [--seed 0] [--read-ahead 4] [--cache-mib 1024]` is one rank of a job: it opens
//! the dataset as a worker does (`ShardLoader`, the recipe defaults' cache and read-ahead), then for each global
//! step asks the read-ahead thread for the step `read-ahead` ahead and loads its own slice of the step's global
//! batch (`PlanSpec::rank_slice`) decoded and augmented (`load_augmented`, with the parameters a worker draws for
//! each sample). One JSON line: seconds to open and to the first batch, and the samples and seconds of the steady
//! state (the steps after `--warmup`).
//!
//! `stream_bench write-vqa <url> --samples M --volumes N [--cap <url>]` writes a sample-only M3D-VQA-like dataset
//! (no volume shards: its samples name the volumes `v0000000..` of a cap dataset; closed and open questions
//! alternating, with M3D-VQA's text lengths: question ~80 characters, answer ~40, four choices of ~20); with
//! `--cap`, its sample lookup locates the volumes in that dataset's index, as `m3d data-prep vqa --cap` does.
//!
//! `stream_bench write-cap <url> --volumes N [--report-chars 400]` writes an M3D-Cap-like dataset of N tiny
//! (1x2x2) volumes, one caption sample each, with M3D-Cap-like ids and a report of `report-chars` characters
//! (the volumes' size does not change what opening costs: the index holds locations, not bytes).
//!
//! `stream_bench rss <recipe.yaml>` does what a worker does before step 0 (`TrainData::open`) and prints its
//! VmRSS / VmHWM with the sizes of what it holds.

use std::time::Instant;

use m3d_coordinator::plan::{PlanSpec, Shuffle};
use m3d_data::draws::augment_params;
use m3d_data::{LoaderOptions, ShardLoader, TrainData};
use m3d_shards::{
    write_dataset, ForeignVolumes, ImageDtype, Manifest, SampleRecord, Store, Task, VolumeRecord,
    WriteOptions,
};
use m3d_volume::augment::AugmentParams;

#[global_allocator]
static ALLOC: m3d_allocator::MiMalloc = m3d_allocator::MiMalloc;

type Error = Box<dyn std::error::Error>;

fn flag(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn num(args: &[String], name: &str, default: u64) -> Result<u64, Error> {
    let v = flag(args, name, &default.to_string());
    v.parse().map_err(|e| format!("{name} {v:?}: {e}").into())
}

/// `VmRSS` and `VmHWM` of this process, MiB.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn shuffle_of(s: &str) -> Result<Shuffle, Error> {
    if s == "global" {
        return Ok(Shuffle::Global);
    }
    let spec = s
        .strip_prefix("blocks:")
        .ok_or_else(|| format!("--shuffle {s:?}: expected global or blocks:<block>x<window>"))?;
    let (b, w) = spec
        .split_once('x')
        .ok_or_else(|| format!("--shuffle {s:?}: expected blocks:<block>x<window>"))?;
    Ok(Shuffle::Blocks {
        block: b.parse()?,
        window: w.parse()?,
    })
}

fn read(url: &str, args: &[String]) -> Result<(), Error> {
    let rank = num(args, "--rank", 0)? as u32;
    let world = num(args, "--world", 1)? as u32;
    let global_batch = num(args, "--global-batch", 32)?;
    let steps = num(args, "--steps", 200)?;
    let warmup = num(args, "--warmup", 2)?.max(1);
    let seed = num(args, "--seed", 0)?;
    let read_ahead = num(args, "--read-ahead", 4)?;
    let shuffle = shuffle_of(&flag(args, "--shuffle", "global"))?;
    let opts = LoaderOptions {
        cache_bytes: (num(args, "--cache-mib", 1024)? as usize) << 20,
        prefetch_depth: read_ahead as usize,
    };
    let start = Instant::now();
    // As a worker opens it (`TrainData::open`): through the sample lookup where the dataset has one.
    let loader = match ShardLoader::open_lookup(url, &[], opts.clone(), &mut Default::default())? {
        Some(l) => l,
        None => ShardLoader::open(url, opts)?,
    };
    let opened = start.elapsed().as_secs_f64();
    let spec = PlanSpec {
        kind: m3d_coordinator::PlanKind::Train,
        samples: loader.len() as u64,
        global_batch,
        seed,
        epochs: 1,
        max_steps: None,
        shuffle,
    }
    .with_max_steps(steps);
    let slice = |step: u64| spec.rank_slice(step, rank, world);
    for s in 0..read_ahead.min(steps) {
        loader.prefetch(&slice(s)?)?;
    }
    let (mut first, mut steady_start, mut steady_samples) = (0.0, Instant::now(), 0u64);
    let mut checksum = 0f64;
    for step in 0..steps {
        if step + read_ahead < steps {
            loader.prefetch(&slice(step + read_ahead)?)?;
        }
        let indices = slice(step)?;
        let (epoch, _) = spec.position(step);
        let params: Vec<Option<AugmentParams>> = indices
            .iter()
            .map(|&i| Some(augment_params(seed, epoch, i)))
            .collect();
        let loaded = loader.load_augmented(&indices, &params)?;
        // Touch the output so that nothing is optimised away.
        checksum += loaded
            .iter()
            .map(|s| f64::from(s.image[s.image.len() / 2]))
            .sum::<f64>();
        if step + 1 == warmup {
            first = start.elapsed().as_secs_f64();
            steady_start = Instant::now();
        } else if step + 1 > warmup {
            steady_samples += loaded.len() as u64;
        }
    }
    let steady_s = steady_start.elapsed().as_secs_f64();
    let stats = loader.stats();
    let (rss, hwm) = rss_mib();
    println!(
        "{}",
        serde_json::json!({
            "rank": rank, "world": world, "open_s": opened, "first_batch_s": first,
            "steady_samples": steady_samples, "steady_s": steady_s,
            "samples_per_s": steady_samples as f64 / steady_s.max(1e-9),
            "volume_reads": stats.volume_reads, "requests": stats.requests, "cache_hits": stats.cache_hits,
            "cache_misses": stats.cache_misses, "evictions": stats.evictions,
            "rss_mib": rss, "peak_rss_mib": hwm, "checksum": checksum,
        })
    );
    Ok(())
}

/// A volume id shaped like M3D-Cap's (`ct_case/011475/Axial_C__portal_venous_phase`), unique per `i`.
fn cap_volume_id(i: usize) -> String {
    format!("ct_case/{i:07}/Axial_C__portal_venous_phase")
}

/// `n` characters of text (words of 4-9 letters), different per `salt`.
fn text(n: usize, salt: usize) -> String {
    let mut s = String::with_capacity(n + 10);
    let mut k = salt;
    while s.len() < n {
        k = k.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let len = 4 + (k >> 33) % 6;
        s.extend((0..len).map(|j| (b'a' + ((k >> (j * 5)) % 26) as u8) as char));
        s.push(' ');
    }
    s.truncate(n);
    s
}

fn write_cap(url: &str, args: &[String]) -> Result<(), Error> {
    let n = num(args, "--volumes", 1000)? as usize;
    let report_chars = num(args, "--report-chars", 400)? as usize;
    let store = Store::open(url)?;
    let shards: Vec<Vec<VolumeRecord>> = (0..n)
        .collect::<Vec<_>>()
        .chunks(32)
        .map(|c| {
            c.iter()
                .map(|&i| {
                    let image = vec![(i % 251) as u8; 4];
                    VolumeRecord {
                        volume_id: cap_volume_id(i),
                        dataset: "cap".into(),
                        source: format!("M3D_Cap_npy/{}.npy", cap_volume_id(i)),
                        shape: [1, 1, 2, 2],
                        dtype: ImageDtype::U8,
                        image_crc32: crc32fast::hash(&image),
                        image: image.into(),
                        masks: Vec::new(),
                    }
                })
                .collect()
        })
        .collect();
    let samples: Vec<SampleRecord> = (0..n)
        .map(|i| SampleRecord {
            sample_id: format!("cap/train/{i}"),
            dataset: "cap".into(),
            task: Task::Caption,
            split: "train".into(),
            volume_id: cap_volume_id(i),
            mask_index: None,
            question: None,
            answer: None,
            answer_choice: None,
            question_type: None,
            class_name: None,
            bbox: None,
            report: Some(text(report_chars, i)),
            source_row: Some(format!("M3D_Cap.json:train[{i}]")),
        })
        .collect();
    let m = write_dataset(
        &store,
        Manifest::new("cap", "stream_bench"),
        &shards,
        &samples,
        &WriteOptions::default(),
    )?;
    println!(
        "{}",
        serde_json::json!({"volumes": n, "samples": samples.len(), "bytes": m.totals.bytes})
    );
    Ok(())
}

fn write_vqa(url: &str, args: &[String]) -> Result<(), Error> {
    let m = num(args, "--samples", 1000)? as usize;
    let n = num(args, "--volumes", 1000)?.max(1) as usize;
    let store = Store::open(url)?;
    let samples: Vec<SampleRecord> = (0..m)
        .map(|i| {
            let row = i / 2;
            let closed = i % 2 == 0;
            let (question, answer) = (text(80, 3 * i), text(40, 3 * i + 1));
            let choice = ["A", "B", "C", "D"][row % 4];
            let task = if closed {
                Task::VqaClosed
            } else {
                Task::VqaOpen
            };
            let (q, a) = if closed {
                let c: Vec<String> = (0..4).map(|k| text(20, 7 * i + k)).collect();
                (
                    format!(
                        "{question} Choices: A. {} B. {} C. {} D. {}",
                        c[0], c[1], c[2], c[3]
                    ),
                    format!("{choice}. {answer}"),
                )
            } else {
                (question, answer)
            };
            SampleRecord {
                sample_id: format!("vqa/train/M3D_VQA_train.csv/{row}/{}", task.as_str()),
                dataset: "vqa".into(),
                task,
                split: "train".into(),
                volume_id: cap_volume_id(row % n),
                mask_index: None,
                question: Some(q),
                answer: Some(a),
                answer_choice: Some(choice.into()),
                question_type: Some((1 + row % 5).to_string()),
                class_name: None,
                bbox: None,
                report: None,
                source_row: Some(format!("M3D_VQA_train.csv:{}", row + 2)),
            }
        })
        .collect();
    let mut manifest = write_dataset(
        &store,
        Manifest::new("vqa", "stream_bench"),
        &[],
        &samples,
        &WriteOptions::default(),
    )?;
    let cap = flag(args, "--cap", "");
    if !cap.is_empty() {
        // As `m3d data-prep vqa --cap` writes it: the lookup locates each row's volume in Cap's index.
        let foreign = ForeignVolumes::open(&cap)?;
        m3d_shards::lookup::write_lookup(
            &store,
            &mut manifest,
            &samples,
            &m3d_shards::VolumeIndex::default(),
            Some(&foreign),
        )?;
        manifest.save(&store)?;
    }
    println!(
        "{}",
        serde_json::json!({"samples": m, "bytes": manifest.totals.bytes})
    );
    Ok(())
}

fn rss(path: &str) -> Result<(), Error> {
    let before = rss_mib();
    let recipe = m3d_recipes::Recipe::load(std::path::Path::new(path), &[])?;
    let start = Instant::now();
    let data = TrainData::open(&recipe)?;
    // As the worker does right after opening (`m3d_allocator::release_freed_memory` as its `after_open`).
    m3d_allocator::release_freed_memory();
    let opened = start.elapsed().as_secs_f64();
    let (rss, hwm) = rss_mib();
    // Measured after the RSS: decoding every text allocates them all.
    let text_bytes: usize = data.texts()?.iter().map(String::len).sum();
    println!(
        "{}",
        serde_json::json!({
            "samples": data.len(), "open_s": opened, "rss_before_mib": before.0,
            "rss_mib": rss, "peak_rss_mib": hwm, "text_bytes_indexed": text_bytes,
            "sample_record_size": std::mem::size_of::<SampleRecord>(),
            "record_bytes": data.len() as usize * std::mem::size_of::<SampleRecord>(),
            "sample_table_bytes": data.sample_table_bytes(),
            "sample_table_memory_bytes": data.sample_table_memory_bytes(),
        })
    );
    Ok(())
}

fn main() -> Result<(), Error> {
    m3d_allocator::configure();
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: stream_bench read|write-cap|write-vqa|rss <url or recipe> [options]";
    let (cmd, target) = (args.get(1).ok_or(usage)?, args.get(2).ok_or(usage)?);
    match cmd.as_str() {
        "read" => read(target, &args),
        "write-cap" => write_cap(target, &args),
        "write-vqa" => write_vqa(target, &args),
        "rss" => rss(target),
        _ => Err(usage.into()),
    }
}
