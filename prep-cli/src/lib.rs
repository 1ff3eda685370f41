//! The `m3d data-prep` subcommands (convert, synthesise, finalize, reindex, inspect) and the `m3d-data-prep`
//! binary that runs them. Nothing here links libtorch: `m3d data-prep` hands over to `m3d-data-prep` when it is
//! installed beside `m3d`, so a conversion does not pay libtorch's start-up (0.4-0.5 s and ~0.5 GiB resident a
//! process: a fifth of converting 20 series, and every part pod of a cluster conversion pays it).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use m3d_data_prep::cap::{CapOptions, CapSource, ResizeMode};
use m3d_data_prep::refseg::{AxisOrder, RefSegOptions, RefSegSource};
use m3d_data_prep::seg::{SegOptions, SegSource};
use m3d_data_prep::vqa::VqaOptions;
use m3d_data_prep::{convert_volumes, ConvertOptions, ConvertReport, Part};

#[derive(Subcommand)]
pub enum DataPrep {
    /// Write a small, learnable dataset in the published raw layouts of all four M3D datasets.
    Synth {
        /// Output folder (M3D_Cap/, M3D_VQA/, M3D_Seg/, M3D_RefSeg/ are created in it).
        dir: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// M3D-Cap cases (1-2 series each).
        #[arg(long)]
        cap_cases: Option<usize>,
        /// M3D-Seg datasets (codes 0000, 0001, ...).
        #[arg(long)]
        seg_datasets: Option<usize>,
        /// Cases per M3D-Seg dataset.
        #[arg(long)]
        seg_cases: Option<usize>,
        /// M3D-RefSeg cases.
        #[arg(long)]
        refseg_cases: Option<usize>,
        /// Size of M3D-Cap slices, HxW (e.g. 512x512 for realistic benchmarks).
        #[arg(long)]
        slice_size: Option<String>,
    },
    /// Convert M3D-Cap (raw slice folders or prepared .npy) into shards.
    Cap {
        #[command(flatten)]
        common: Common,
        /// Split file (default <src>/M3D_Cap.json).
        #[arg(long)]
        split_file: Option<PathBuf>,
        /// Resize mode: "trilinear" is the current reference script's (`mode="bilinear"`, since 2024-06-12);
        /// "area" (MONAI's default) is its first release's (2024-04-28, no mode given).
        #[arg(long, value_enum, default_value_t = Resize::Trilinear)]
        resize_mode: Resize,
    },
    /// Convert the M3D-VQA tables into sample shards referencing M3D-Cap volumes.
    Vqa {
        #[command(flatten)]
        common: Common,
        /// Converted M3D-Cap dataset: every row must reference one of its volumes.
        #[arg(long)]
        cap: Option<String>,
    },
    /// Convert M3D-Seg datasets into shards.
    Seg {
        #[command(flatten)]
        common: Common,
        /// Dataset codes, comma separated (default: all found).
        #[arg(long, value_delimiter = ',')]
        datasets: Vec<String>,
    },
    /// Convert M3D-RefSeg into shards.
    Refseg {
        #[command(flatten)]
        common: Common,
        /// In-plane axis order: "consistent" (as M3D-Seg and M3D-Cap) or "reference" (the published RefSeg
        /// transpose(2, 0, 1), transposed in-plane; use it to compare with models trained on published data).
        #[arg(long, value_enum, default_value_t = Axes::Consistent)]
        axis_order: Axes,
    },
    /// Merge the parts of a conversion split with --part I/N (run once every part is done): checks that parts
    /// 1..N are each recorded once with the same N and settings, then writes the sample shards, the volume index
    /// and, last, the manifest, the same bytes as one process converting everything.
    Finalize {
        /// Dataset URL the parts were written to (path, file://, s3://).
        url: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Wait up to this long (e.g. 30m) for the parts' records to appear before merging, for a finalize
        /// pod started beside the part pods.
        #[arg(long, value_parser = m3d_coordinator::cli::parse_duration)]
        wait: Option<std::time::Duration>,
    },
    /// Add the volume index and the sample lookup to a dataset converted before m3d wrote them (reads every
    /// shard once, then writes `index/volumes.parquet`, `index/samples.lookup` and the manifest that lists them).
    Reindex {
        /// Dataset URL (path, file://, s3://).
        url: String,
    },
    /// Statistics of a converted dataset; --verify checks every checksum; --png renders a volume.
    Inspect {
        /// Dataset URL (path, file://, s3://).
        url: String,
        /// Recompute every shard's sha256 and every volume's crc32.
        #[arg(long)]
        verify: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Render the middle slices (masks overlaid) of a volume to this PNG.
        #[arg(long)]
        png: Option<PathBuf>,
        /// Volume to render (default: the first, or the volume of --sample).
        #[arg(long)]
        volume: Option<String>,
        /// Render the volume of this sample number.
        #[arg(long)]
        sample: Option<usize>,
        /// Print the first N samples as the instruction-response pairs a trainer would see (wording drawn from
        /// the prompt templates with --seed).
        #[arg(long, value_name = "N")]
        show_samples: Option<usize>,
        /// Prompt templates (JSON, same shape as the built-in set) for --show-samples.
        #[arg(long)]
        templates: Option<PathBuf>,
        /// Use the description ("des") wording family instead of class names ("cls").
        #[arg(long)]
        describe: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Axes {
    Consistent,
    Reference,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Resize {
    Area,
    Trilinear,
}

#[derive(Args)]
pub struct Common {
    /// Source folder of the published dataset.
    #[arg(long)]
    src: PathBuf,
    /// Output URL: a path, file:///abs or s3://bucket/prefix (AWS_* variables for credentials and endpoint).
    #[arg(long)]
    out: String,
    /// Volumes per Parquet shard.
    #[arg(long, default_value_t = 32)]
    shard_volumes: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Continue past bad inputs, listing each in <out>/skipped.json (default: stop at the first).
    #[arg(long)]
    skip_bad: bool,
    /// Convert only the first N volumes.
    #[arg(long)]
    limit: Option<usize>,
    /// Redo every shard, ignoring completion records of an earlier run.
    #[arg(long)]
    force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Storage dtype of images (default per dataset: u8 for M3D-Cap, f16 for CT); f32 stores exact values.
    #[arg(long, value_enum)]
    dtype: Option<Dtype>,
    /// Convert only part I of N (e.g. 2/8; one per machine, all with the same options and --out), then run
    /// `m3d data-prep finalize <out>`: the dataset has no manifest until then.
    #[arg(long, value_name = "I/N", conflicts_with = "part_index")]
    part: Option<Part>,
    /// --part as a 0-based index (part I+1 of --parts), for Indexed Jobs: `--part-index $JOB_COMPLETION_INDEX`.
    #[arg(long, value_name = "I", requires = "parts")]
    part_index: Option<usize>,
    /// The number of parts with --part-index.
    #[arg(long, value_name = "N", requires = "part_index")]
    parts: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Dtype {
    U8,
    F16,
    F32,
}

impl Dtype {
    fn image(self) -> m3d_shards::encode::ImageDtype {
        match self {
            Dtype::U8 => m3d_shards::encode::ImageDtype::U8,
            Dtype::F16 => m3d_shards::encode::ImageDtype::F16,
            Dtype::F32 => m3d_shards::encode::ImageDtype::F32,
        }
    }
}

impl Common {
    fn options(&self) -> Result<ConvertOptions> {
        if let Some(n) = self.threads {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global()
                .context("setting up the thread pool")?;
        }
        let mut o = ConvertOptions::new(self.out.clone());
        o.shard_volumes = self.shard_volumes;
        o.skip_bad = self.skip_bad;
        o.limit = self.limit;
        o.force = self.force;
        o.progress = true;
        o.part = match (self.part, self.part_index, self.parts) {
            (Some(p), _, _) => Some(p),
            (None, Some(i), Some(n)) => Some(Part::new(i + 1, n).with_context(|| {
                format!("--part-index {i} --parts {n}: want 0 <= index < parts")
            })?),
            _ => None,
        };
        Ok(o)
    }
}

fn print_report(report: &ConvertReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    if let Some(part) = report.part {
        print!("part {part} of ");
    }
    println!(
        "{}: {} volume(s), {} sample(s), {:.2} MiB -> {} ({} shard(s) written, {} reused)",
        report.dataset,
        report.volumes,
        report.samples,
        report.bytes as f64 / 1048576.0,
        report.out,
        report.shards_written,
        report.shards_reused
    );
    for (task, by_split) in &report.counts {
        let parts: Vec<String> = by_split.iter().map(|(s, n)| format!("{s} {n}")).collect();
        println!("  {task:<12} {}", parts.join(", "));
    }
    if !report.skipped.is_empty() {
        println!(
            "  skipped {} input(s); see {}/skipped.json{}",
            report.skipped.len(),
            report.out,
            if report.part.is_some() {
                " after finalize"
            } else {
                ""
            }
        );
    }
    if let Some(part) = report.part {
        println!(
            "  part {part} recorded in {}/{}; once all {} parts are done: m3d data-prep finalize {}",
            report.out,
            part.key(),
            part.count,
            report.out
        );
    }
    Ok(())
}

fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (h, w) = s
        .split_once('x')
        .with_context(|| format!("--slice-size {s:?}: expected HxW"))?;
    Ok((
        h.parse().context("--slice-size height")?,
        w.parse().context("--slice-size width")?,
    ))
}

/// Runs one `data-prep` subcommand, in whichever binary: the process's memory is backed by small pages from here
/// on ([`m3d_allocator::disable_transparent_huge_pages`]; a conversion is a data-prep process's whole life).
pub fn run(cmd: DataPrep) -> Result<()> {
    m3d_allocator::disable_transparent_huge_pages();
    match cmd {
        DataPrep::Synth {
            dir,
            seed,
            cap_cases,
            seg_datasets,
            seg_cases,
            refseg_cases,
            slice_size,
        } => {
            let mut cfg = m3d_synth::SynthConfig {
                seed,
                ..Default::default()
            };
            if let Some(n) = cap_cases {
                cfg.cap_cases = n;
            }
            if let Some(n) = seg_datasets {
                cfg.seg_datasets = n;
            }
            if let Some(n) = seg_cases {
                cfg.seg_cases = n;
            }
            if let Some(n) = refseg_cases {
                cfg.refseg_cases = n;
            }
            if let Some(s) = slice_size {
                cfg.slice_size = parse_size(&s)?;
            }
            let summary = m3d_synth::write_all(&dir, &cfg)
                .with_context(|| format!("synthesising M3D-Data into {}", dir.display()))?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        DataPrep::Cap {
            common,
            split_file,
            resize_mode,
        } => {
            let opts = common.options()?;
            let src = CapSource::new(CapOptions {
                src: common.src.clone(),
                split_file,
                resize: match resize_mode {
                    Resize::Area => ResizeMode::Area,
                    Resize::Trilinear => ResizeMode::Trilinear,
                },
                dtype: common.dtype.map(Dtype::image),
            })
            .with_context(|| format!("planning M3D-Cap from {}", common.src.display()))?;
            let report = convert_volumes(&src, &opts).context("converting M3D-Cap")?;
            print_report(&report, common.json)?;
        }
        DataPrep::Vqa { common, cap } => {
            let opts = common.options()?;
            let volumes_from = match cap {
                Some(url) => Some(
                    m3d_shards::ForeignVolumes::open(&url)
                        .with_context(|| format!("reading M3D-Cap's volume index from {url}"))?,
                ),
                None => None,
            };
            let known_volumes = volumes_from.as_ref().map(|f| {
                f.index
                    .volumes
                    .iter()
                    .map(|v| v.volume_id.clone())
                    .collect()
            });
            let report = m3d_data_prep::vqa::convert(
                &VqaOptions {
                    src: common.src.clone(),
                    known_volumes,
                    volumes_from,
                },
                &opts,
            )
            .context("converting M3D-VQA")?;
            print_report(&report, common.json)?;
        }
        DataPrep::Seg { common, datasets } => {
            let opts = common.options()?;
            let src = SegSource::new(SegOptions {
                src: common.src.clone(),
                codes: datasets,
                dtype: common.dtype.map(Dtype::image),
            })
            .with_context(|| format!("planning M3D-Seg from {}", common.src.display()))?;
            let report = convert_volumes(&src, &opts).context("converting M3D-Seg")?;
            print_report(&report, common.json)?;
        }
        DataPrep::Refseg { common, axis_order } => {
            let opts = common.options()?;
            let src = RefSegSource::new(
                RefSegOptions {
                    src: common.src.clone(),
                    dtype: common.dtype.map(Dtype::image),
                    axis_order: match axis_order {
                        Axes::Consistent => AxisOrder::Consistent,
                        Axes::Reference => AxisOrder::Reference,
                    },
                },
                opts.skip_bad,
            )
            .with_context(|| format!("planning M3D-RefSeg from {}", common.src.display()))?;
            let report = convert_volumes(&src, &opts).context("converting M3D-RefSeg")?;
            print_report(&report, common.json)?;
        }
        DataPrep::Finalize { url, json, wait } => {
            if let Some(limit) = wait {
                m3d_data_prep::wait_for_parts(&url, limit)
                    .with_context(|| format!("waiting for the parts under {url}"))?;
            }
            let report = m3d_data_prep::finalize(&url)
                .with_context(|| format!("finalizing the parts under {url}"))?;
            print_report(&report, json)?;
        }
        DataPrep::Reindex { url } => {
            let store = m3d_store::Store::open_existing(&url)?;
            let report = m3d_shards::reindex(&store)
                .with_context(|| format!("adding the volume index and sample lookup to {url}"))?;
            println!(
                "{}: indexed {} volumes in {} shards{}",
                report.url,
                report.volumes,
                report.shards,
                if report.replaced {
                    " (index rebuilt)"
                } else {
                    ""
                }
            );
        }
        DataPrep::Inspect {
            url,
            verify,
            json,
            png,
            volume,
            sample,
            show_samples,
            templates,
            describe,
            seed,
        } => {
            let ds = m3d_shards::dataset::ShardDataset::open(&url)
                .with_context(|| format!("opening dataset {url}"))?;
            let summary = m3d_data_prep::inspect::summarise(&ds, &url, verify)
                .with_context(|| format!("inspecting {url}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", m3d_data_prep::inspect::render_text(&summary));
            }
            if let Some(v) = summary.verified.as_ref().filter(|v| !v.failures.is_empty()) {
                bail!(
                    "{url}: {} shard problem(s); first: {}",
                    v.failures.len(),
                    v.failures[0]
                );
            }
            if let Some(png) = png {
                let rec = m3d_data_prep::inspect::find_volume(&ds, volume.as_deref(), sample)?;
                m3d_data_prep::inspect::render_png(&rec, &png)?;
                eprintln!("rendered {} to {}", rec.volume_id, png.display());
            } else if volume.is_some() || sample.is_some() {
                bail!("--volume and --sample choose what --png renders; give --png <file>");
            }
            if let Some(n) = show_samples {
                let t = match &templates {
                    Some(path) => m3d_instruct::Templates::from_json(path)?,
                    None => m3d_instruct::Templates::default(),
                };
                let family = if describe {
                    m3d_instruct::Family::Des
                } else {
                    m3d_instruct::Family::Cls
                };
                let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
                for s in ds.samples().iter().take(n) {
                    let i = m3d_instruct::instruction(s, &t, family, &mut rng)?;
                    println!(
                        "\n[{}] {} {} volume {}",
                        s.sample_id, s.task, s.split, s.volume_id
                    );
                    println!("  Q: {}", i.question);
                    println!("  A: {}", i.answer);
                }
            }
        }
    }
    Ok(())
}
