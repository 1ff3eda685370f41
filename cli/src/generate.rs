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
    /// lamed_llama / lamed_phi3, tokenizer, weights); local, or a store URL (`s3://bucket/run/final`), which is
    /// copied to a temporary local folder first.
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
    let model_dir = m3d_eval::model_dir::ModelDir::open(&a.model)?;
    let model = LamedModel::load(model_dir.path(), device, Precision::default_for(device))
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
    /// Ranks sharing the work items (each answers every N-th; rank 0 merges the results). Alone, this
    /// command starts a coordinator and N rank processes on this machine (1: no coordinator); with --serve,
    /// the job's world size.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Serve the coordinator of this evaluation on ADDR (e.g. 0.0.0.0:7070; port 0: any, printed on stdout)
    /// instead of evaluating; ranks join with --coordinator. Exits when the job has ended.
    #[arg(long, value_name = "ADDR", conflicts_with = "coordinator")]
    serve: Option<std::net::SocketAddr>,
    /// Run as one rank of the evaluation job whose coordinator is at URL (http://host:port): every rank and
    /// the coordinator are started with the same flags and see the same `-o` folder.
    #[arg(long, value_name = "URL")]
    coordinator: Option<String>,
    /// This rank's id, stable across its restarts (default: host name and process id).
    #[arg(long, requires = "coordinator")]
    worker_id: Option<String>,
    /// With --serve: the round starts with at least this many ranks once the rendezvous timeout has passed
    /// [default: --workers].
    #[arg(long, requires = "serve")]
    min_workers: Option<usize>,
    /// With --serve: restart rounds allowed after a rank fails (the survivors re-evaluate their new slices).
    #[arg(long, default_value_t = 0, requires = "serve")]
    restarts: u32,
    /// With --serve: where the job state lives [default: `-o`/coordinator].
    #[arg(long, requires = "serve")]
    state: Option<String>,
    #[arg(long, default_value = "120s", value_parser = m3d_coordinator::cli::parse_duration)]
    rendezvous_timeout: std::time::Duration,
    /// A rank silent for this long has failed.
    #[arg(long, default_value = "10s", value_parser = m3d_coordinator::cli::parse_duration)]
    heartbeat_timeout: std::time::Duration,
    /// File holding the bearer token of the coordinator (else the M3D_TOKEN environment variable).
    #[arg(long)]
    token_file: Option<PathBuf>,
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
    /// Output folder (a path, or a store URL: file://, s3://): parts/, overlays/, results.jsonl, bench.json,
    /// bench.md.
    #[arg(short = 'o', long)]
    out: String,
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
        rank: 0,
        world: 1,
        planned_items: None,
    };
    let label = a.model.display().to_string();
    if let Some(listen) = a.serve {
        return serve_eval(&a, &opts, listen);
    }
    if a.coordinator.is_none() && a.workers > 1 {
        return eval_job_here(&a, &opts);
    }
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
    let model_dir = m3d_eval::model_dir::ModelDir::open(&a.model)?;
    let model = LamedModel::load(model_dir.path(), device, Precision::default_for(device))
        .with_context(|| format!("loading {}", a.model.display()))?;
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut progress = |label: &str, done: usize, all: usize| {
        bar.get_or_insert_with(|| {
            m3d_data_prep::progress::bar_of(all as u64, label, "samples", true)
        })
        .set_position(done as u64);
    };
    let out = m3d_eval::output::BenchOut::open(&a.out)?;
    let report = match &a.coordinator {
        None => {
            // A job of its own: an earlier evaluation's result files in this output are not this one's.
            out.clear_parts()?;
            let summary = m3d_eval::bench::run_rank(
                &model,
                &a.data,
                &a.volumes,
                &opts,
                out.dir(),
                m3d_eval::bench::Share::All,
                |d, n| {
                    progress("rank 0", d, n);
                    Ok(())
                },
            )?;
            let report = m3d_eval::bench::merge(out.dir(), summary.pass_items, 1, &label, &opts)?;
            out.upload_all()?;
            Some(report)
        }
        Some(url) => {
            let plan = m3d_eval::job::EvalPlan::of(&label, &a.data, &a.volumes, &opts)?;
            let host = crate::train::host_name();
            let rank = m3d_eval::job::RankOptions {
                coordinator: url.clone(),
                token: m3d_coordinator::cli::load_token(a.token_file.as_ref())?,
                worker_id: a
                    .worker_id
                    .clone()
                    .unwrap_or_else(|| format!("{host}-{}", std::process::id())),
                host,
            };
            let bar_label = rank.worker_id.clone();
            m3d_eval::job::run_rank_of_job(
                &model,
                &label,
                &a.data,
                &a.volumes,
                &opts,
                &plan,
                &out,
                &rank,
                |d, n| progress(&bar_label, d, n),
            )?
        }
    };
    if let Some(b) = bar {
        b.finish();
    }
    if let Some(report) = report {
        print!("{}", m3d_eval::bench::markdown(&report));
    }
    Ok(())
}

/// The coordinator of an evaluation job: the plan from the datasets' manifests, ranks from `--workers`.
fn eval_job_config(
    a: &EvalBenchArgs,
    opts: &m3d_eval::bench::BenchOptions,
    min_workers: usize,
) -> Result<m3d_coordinator::JobConfig> {
    let plan =
        m3d_eval::job::EvalPlan::of(&a.model.display().to_string(), &a.data, &a.volumes, opts)?;
    Ok(m3d_coordinator::JobConfig {
        min_workers: u32::try_from(min_workers).context("--min-workers")?,
        max_workers: u32::try_from(a.workers).context("--workers")?,
        rendezvous_timeout: a.rendezvous_timeout,
        heartbeat_timeout: a.heartbeat_timeout,
        max_restarts: a.restarts,
        plan: plan.plan,
        data_fingerprint: Some(plan.settings),
        initial_checkpoint: None,
    })
}

/// `m3d eval bench --serve ADDR`: the job's coordinator alone (a pod of its own on a cluster).
fn serve_eval(
    a: &EvalBenchArgs,
    opts: &m3d_eval::bench::BenchOptions,
    listen: std::net::SocketAddr,
) -> Result<()> {
    let min = a.min_workers.unwrap_or(a.workers);
    let cfg = eval_job_config(a, opts, min)?;
    let out = m3d_eval::output::BenchOut::open(&a.out)?;
    let state = match &a.state {
        Some(s) => s.clone(),
        None => out.child("coordinator"),
    };
    // A job that starts afresh owns the output's result files: an earlier job's must be neither reused by a
    // restart round nor merged. A coordinator that continues its saved job keeps them (its ranks reuse them).
    if !m3d_coordinator::has_saved_job(&state)? {
        out.clear_parts()?;
    }
    m3d_coordinator::cli::serve_job(
        cfg,
        m3d_coordinator::cli::ServeOptions {
            listen,
            state,
            token: m3d_coordinator::cli::load_token(a.token_file.as_ref())?,
            exit_on_finish: true,
            drain_timeout: std::time::Duration::from_secs(10),
        },
        None,
    )
}

/// `--workers N` on this machine: a coordinator in this process and N rank processes, as on a cluster.
fn eval_job_here(a: &EvalBenchArgs, opts: &m3d_eval::bench::BenchOptions) -> Result<()> {
    let cfg = eval_job_config(a, opts, a.workers)?;
    // A coordinator without saved state: a new job, which owns the output's result files.
    m3d_eval::output::BenchOut::open(&a.out)?.clear_parts()?;
    let mut secret = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
    let token_text: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let rt = m3d_coordinator::cli::runtime()?;
    let coord = rt
        .block_on(m3d_coordinator::Coordinator::open(cfg, None))
        .context("starting the coordinator")?;
    let (listener, addr) = rt
        .block_on(m3d_coordinator::grpc::bind("127.0.0.1:0".parse()?))
        .context("binding the coordinator")?;
    let url = format!("http://{addr}");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let token = m3d_coordinator::Token::new(&token_text);
    let server = rt.spawn(m3d_coordinator::serve(coord, listener, token, async {
        let _ = stop_rx.await;
    }));
    let exe = std::env::current_exe().context("locating the m3d binary")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let children: Vec<_> = (0..a.workers)
        .map(|r| {
            std::process::Command::new(&exe)
                .args(&args)
                .args(["--coordinator", &url, "--worker-id", &format!("rank{r}")])
                // The token goes through the environment, never the command line (`ps` shows that).
                .env("M3D_TOKEN", &token_text)
                .stdout(std::process::Stdio::null())
                .spawn()
                .with_context(|| format!("starting rank process {r}"))
        })
        .collect::<Result<_>>()?;
    let mut failed = None;
    for (r, mut c) in children.into_iter().enumerate() {
        let status = c
            .wait()
            .with_context(|| format!("waiting for rank process {r}"))?;
        if !status.success() && failed.is_none() {
            failed = Some(format!(
                "rank process {r} of {} failed ({status})",
                a.workers
            ));
        }
    }
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
    if let Some(f) = failed {
        bail!(f);
    }
    let md = m3d_eval::output::BenchOut::open(&a.out)?.read("bench.md")?;
    print!("{}", String::from_utf8_lossy(&md));
    Ok(())
}
