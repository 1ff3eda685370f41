//! `m3d generate`: ask a trained M3D-LaMed about volumes (see `m3d_infer`), print the answers, and write the
//! masks of `[SEG]` answers (NIfTI on the input's grid, PNG overlay) into `--out`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use m3d_data_prep::single::{self, ImageSource, PreparedImage};
use m3d_infer::{LamedModel, Request};
use m3d_models::generate::Sampling;
use m3d_models::precision::Precision;
use m3d_volume::Volume;
use tch::Tensor;

#[derive(Args)]
pub struct GenerateArgs {
    /// A LaMed: a run's `final/` folder, or a released checkpoint folder (config.json with `model_type`
    /// lamed_llama / lamed_phi3, tokenizer, weights).
    #[arg(long)]
    model: PathBuf,
    /// The volume(s): a `.nii`/`.nii.gz` or a raw `.npy` (preprocessed as `m3d data-prep seg` does), a
    /// model-shaped `.npy` (used as is), or `<shard dataset url>#<volume id>`. Repeat for several.
    #[arg(long, required = true)]
    image: Vec<String>,
    /// The question(s). One image and several prompts: each asked about it; several images and one prompt: asked
    /// about each; otherwise pairwise.
    #[arg(long, conflicts_with = "task")]
    prompt: Vec<String>,
    /// Ask the task's first M3D-Bench question template instead of `--prompt`; `seg` and `rec` need `--target`.
    #[arg(long, value_parser = ["cap", "seg", "rec"])]
    task: Option<String>,
    /// The organ or structure `--task seg|rec` asks about (e.g. `liver`).
    #[arg(long)]
    target: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sample instead of greedy decoding (greedy is the reference's evaluation setting).
    #[arg(long)]
    sample: bool,
    #[arg(long, default_value_t = 1.0, requires = "sample")]
    temperature: f64,
    #[arg(long, default_value_t = 0.9, requires = "sample")]
    top_p: f64,
    /// 0 keeps every token (HF's default is 50).
    #[arg(long, default_value_t = 50, requires = "sample")]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N [default: cuda when a GPU is visible, else cpu].
    #[arg(long)]
    device: Option<String>,
    /// Print one JSON object per answer.
    #[arg(long)]
    json: bool,
    /// Where masks of `[SEG]` answers go (`answer-N.nii.gz`, `answer-N.png`, `answers.json`).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The question `--task` asks: the first of the task's M3D-Bench question templates (`m3d_instruct::bench`),
/// with `target` as the class name.
fn task_question(task: &str, target: Option<&str>) -> Result<String> {
    let t = m3d_instruct::bench::bench_templates()?;
    let first = |list: &[String]| list.first().cloned().context("an empty template list");
    let with_target = |list: &[String]| -> Result<String> {
        let target =
            target.context("--task seg and --task rec need --target (e.g. --target liver)")?;
        Ok(first(list)?.replacen("{}", target, 1))
    };
    match task {
        "cap" => first(&t.caption),
        "seg" => with_target(&t.seg.cls_questions),
        "rec" => with_target(&t.rec.cls_questions),
        other => bail!("unknown task `{other}`"),
    }
}

/// Pairs images and questions (see `--prompt`).
fn pairs(images: usize, questions: usize) -> Result<Vec<(usize, usize)>> {
    Ok(match (images, questions) {
        (1, q) => (0..q).map(|i| (0, i)).collect(),
        (n, 1) => (0..n).map(|i| (i, 0)).collect(),
        (n, q) if n == q => (0..n).map(|i| (i, i)).collect(),
        (n, q) => bail!("{n} images and {q} prompts: give one of either, or as many of each"),
    })
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let device = match a.device.as_deref() {
        Some(d) => m3d_eval::parse_device(d).map_err(anyhow::Error::msg)?,
        None => m3d_eval::default_device(),
    };
    let questions = match (&a.task, a.prompt.is_empty()) {
        (Some(task), _) => vec![task_question(task, a.target.as_deref())?],
        (None, false) => a.prompt.clone(),
        (None, true) => bail!("give --prompt TEXT or --task cap|seg|rec"),
    };
    let model = LamedModel::load(&a.model, device, Precision::default_for(device))
        .with_context(|| format!("loading {}", a.model.display()))?;
    let shape = model.image_size();
    let prepared: Vec<PreparedImage> = a
        .image
        .iter()
        .map(|arg| {
            let source = ImageSource::parse(arg)?;
            single::prepare(&source, shape).with_context(|| format!("preparing {}", source.name()))
        })
        .collect::<Result<_>>()?;
    let pairs = pairs(prepared.len(), questions.len())?;
    let requests: Vec<Request> = pairs
        .iter()
        .map(|&(i, q)| Request {
            image: volume_tensor(&prepared[i].volume),
            question: questions[q].clone(),
            prompt: model.prompt_text(&questions[q]),
        })
        .collect();
    let mut opts = model.options(a.max_new_tokens);
    if a.sample {
        opts.sampling = Some(Sampling {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        });
    }
    let masks = model.config().seg.is_some();
    let answers = model.answer(&requests, &opts, masks)?;

    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    }
    let mut records = Vec::with_capacity(answers.len());
    for (n, (answer, &(i, _))) in answers.iter().zip(&pairs).enumerate() {
        let mut record = serde_json::to_value(answer)?;
        record["image"] = a.image[i].clone().into();
        if let (Some(logits), Some(out)) = (&answer.seg_logits, &a.out) {
            let (nifti, png) = write_mask(logits, &prepared[i], out, n)?;
            record["mask"] = nifti.display().to_string().into();
            record["overlay"] = png.display().to_string().into();
        }
        if a.json {
            println!("{}", serde_json::to_string(&record)?);
        } else {
            println!("[{n}] {}\n{}", answer.question, answer.text);
            if let Some(b) = answer.bbox {
                println!("box: {b:?}");
            }
            if let Some(m) = record.get("mask") {
                println!("mask: {}", m.as_str().unwrap_or_default());
            }
        }
        records.push(record);
    }
    if let Some(out) = &a.out {
        let path = out.join("answers.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&records)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// (1, D, H, W) volume -> (C=1, D, H, W) tensor.
fn volume_tensor(v: &Volume<f32>) -> Tensor {
    let s = v.shape().map(|d| d as i64);
    Tensor::from_slice(v.data()).view(s)
}

/// Thresholds `logits` (1, 1, D, H, W) at 0 (sigmoid 0.5, as the reference's demo) and writes the mask on the
/// input's grid and the overlay.
fn write_mask(
    logits: &Tensor,
    image: &PreparedImage,
    out: &std::path::Path,
    n: usize,
) -> Result<(PathBuf, PathBuf)> {
    let [_, d, h, w] = image.volume.shape();
    let bits = Vec::<u8>::try_from(logits.gt(0.0).to_kind(tch::Kind::Uint8).view([-1]))?;
    let mask = Volume::new([1, d, h, w], bits)?;
    let on_input = single::mask_to_input(&mask, &image.geometry)?;
    let nifti = out.join(format!("answer-{n}.nii.gz"));
    single::write_mask_nifti(&on_input, &image.geometry, &nifti)?;
    let png = out.join(format!("answer-{n}.png"));
    single::write_overlay_png(&image.volume, &mask, &png)?;
    Ok((nifti, png))
}

#[derive(Args)]
pub struct EvalBenchArgs {
    /// The LaMed to evaluate (see `m3d generate --model`).
    #[arg(long)]
    model: PathBuf,
    /// Shard datasets holding the test samples (M3D-Cap, M3D-VQA, M3D-Seg, M3D-RefSeg conversions). Repeat.
    #[arg(long, required = true)]
    data: Vec<String>,
    /// Shard datasets whose volumes other datasets' samples name (M3D-Cap's, for M3D-VQA). Repeat.
    #[arg(long)]
    volumes: Vec<String>,
    /// Comma-separated: cap, vqa-closed, vqa-open, rec, reg, seg, refseg.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cap,vqa-closed,vqa-open,rec,reg,seg,refseg"
    )]
    tasks: Vec<m3d_instruct::bench::BenchTask>,
    #[arg(long, default_value = "test")]
    split: String,
    /// At most K samples of each task.
    #[arg(long)]
    limit: Option<usize>,
    /// Processes sharing the samples (each answers every N-th; the parent merges their results).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Run as rank R of `--workers` and write only this rank's part (what `--workers` starts itself; on a
    /// cluster, one per pod over a shared `-o`, then `--merge`).
    #[arg(long, conflicts_with = "merge")]
    rank: Option<usize>,
    /// Only merge the `--workers` ranks' parts already in `-o` into the report.
    #[arg(long)]
    merge: bool,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Keys the per-sample template draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Score as the reference does, its defects included (see docs/evaluation.md).
    #[arg(long)]
    reference_scoring: bool,
    /// WordNet 3.0 dict folder for METEOR.
    #[arg(long, default_value = "/usr/share/wordnet")]
    wordnet: PathBuf,
    /// BERTScore encoder: an HF folder (roberta-large, as M3D-Bench scores; nothing is downloaded). Without it
    /// the report has no BERTScore.
    #[arg(long)]
    bertscore: Option<PathBuf>,
    /// The encoder layer BERTScore reads [default: 17 for roberta-large; required for any other encoder].
    #[arg(long, requires = "bertscore")]
    bertscore_layer: Option<i64>,
    /// The M3D-CLIP folder the `retrieval` task scores (a run's `final/`).
    #[arg(long)]
    clip: Option<PathBuf>,
    /// CPU threads of each rank [default: this machine's cores / --workers].
    #[arg(long)]
    threads: Option<usize>,
    /// PNG overlays (predicted and reference mask) of this many samples of each segmentation task.
    #[arg(long, default_value_t = 4)]
    overlays: usize,
    /// cpu, cuda or cuda:N [default: cuda when a GPU is visible, else cpu].
    #[arg(long)]
    device: Option<String>,
    /// Output folder: parts/, results.jsonl, bench.json, bench.md.
    #[arg(short = 'o', long)]
    out: PathBuf,
}

pub fn eval_bench(a: EvalBenchArgs) -> Result<()> {
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let opts = m3d_eval::bench::BenchOptions {
        tasks: a.tasks.clone(),
        split: a.split.clone(),
        limit: a.limit,
        batch: a.batch,
        max_new_tokens: a.max_new_tokens,
        seed: a.seed,
        convention: if a.reference_scoring {
            m3d_scoring::Convention::Reference
        } else {
            m3d_scoring::Convention::Corrected
        },
        wordnet: a.wordnet.is_dir().then(|| a.wordnet.clone()),
        bertscore: a.bertscore.clone().map(|d| (d, a.bertscore_layer)),
        clip: a.clip.clone(),
        overlays: a.overlays,
        rank: a.rank.unwrap_or(0),
        world: a.workers,
    };
    let run_rank = |opts: &m3d_eval::bench::BenchOptions| -> Result<()> {
        if let Some(t) = a.threads {
            tch::set_num_threads(t.max(1) as i32);
        } else if a.workers > 1 {
            // The ranks share this machine's cores: each takes its share instead of all of them.
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            tch::set_num_threads((cores / a.workers).max(1) as i32);
        }
        let device = match a.device.as_deref() {
            Some(d) => m3d_eval::parse_device(d).map_err(anyhow::Error::msg)?,
            None => m3d_eval::default_device(),
        };
        let model = LamedModel::load(&a.model, device, Precision::default_for(device))
            .with_context(|| format!("loading {}", a.model.display()))?;
        let label = format!("rank {}", opts.rank);
        let mut bar: Option<indicatif::ProgressBar> = None;
        m3d_eval::bench::run_rank(&model, &a.data, &a.volumes, opts, &a.out, |done, all| {
            bar.get_or_insert_with(|| {
                m3d_data_prep::progress::bar_of(all as u64, &label, "samples", true)
            })
            .set_position(done as u64);
        })?;
        if let Some(b) = bar {
            b.finish();
        }
        Ok(())
    };
    if a.rank.is_some() {
        return run_rank(&opts);
    }
    if a.merge {
        // The parts were written by ranks started elsewhere.
    } else if a.workers == 1 {
        run_rank(&opts)?;
    } else {
        // Each rank a process of its own, as on a cluster; their results meet in the part files.
        let exe = std::env::current_exe().context("locating the m3d binary")?;
        let args: Vec<String> = std::env::args().skip(1).collect();
        let children: Vec<_> = (0..a.workers)
            .map(|r| {
                std::process::Command::new(&exe)
                    .args(&args)
                    .args(["--rank", &r.to_string()])
                    .spawn()
                    .with_context(|| format!("starting rank {r}"))
            })
            .collect::<Result<_>>()?;
        for (r, mut c) in children.into_iter().enumerate() {
            let status = c.wait().with_context(|| format!("waiting for rank {r}"))?;
            if !status.success() {
                bail!("rank {r} of {} failed ({status})", a.workers);
            }
        }
    }
    let report = m3d_eval::bench::merge(&a.out, a.workers, &a.model.display().to_string(), &opts)?;
    print!("{}", m3d_eval::bench::markdown(&report));
    Ok(())
}
