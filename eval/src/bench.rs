//! M3D-Bench for M3D-LaMed (`m3d eval bench`): the test split of each task, prompts built as the reference
//! builds them ([`m3d_instruct::bench`], the template drawn per sample from a seeded stream and recorded),
//! answered by greedy decoding in batches ([`m3d_infer`]), scored with [`m3d_scoring`].
//!
//! Work is split by rank: the work items in a fixed order (each task's samples: tasks as asked, datasets as
//! listed, samples in shard order, the `--limit` first of each task; then retrieval, one item), which ranks
//! lease from the coordinator's work queue a batch at a time, or, without a coordinator, rank `r` of `W` taking
//! every `W`-th ([`Share`]; ranks and world come from the coordinator, see [`crate::job`]). Each rank writes its
//! per-sample results to `parts/rank-R-of-W.jsonl`; [`merge`] reads every part (refusing a missing one) and
//! writes `results.jsonl`, `bench.json` and `bench.md`. A result depends only on its sample, never on the
//! rank or the batch it ran in (left-padded batches decode as single prompts; the template draw is keyed by
//! the sample), so 1 and N workers give the same per-sample results.
//!
//! Metrics per task, as the reference's `Bench/eval/eval_*.py` compute them (with its defects corrected unless
//! [`Convention::Reference`]): captions, open VQA and REG: BLEU-1, ROUGE-1 F, METEOR (with WordNet; skipped,
//! and said so in the report, when no WordNet is given); closed VQA: accuracy; REC: IoU and Acc@0.5; seg and
//! refseg: Dice of the `[SEG]` mask against the sample's mask; BERTScore F1 ([`crate::bertscore`]) for the free
//! text when an encoder is given.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use m3d_data::loader::{LoaderOptions, ShardLoader};
use m3d_data_prep::single::write_overlay_png;
use m3d_infer::{LamedModel, Request};
use m3d_instruct::bench::{bench_prompts, BenchPrompt, BenchTask};
use m3d_scoring::bleu::{bleu, BleuParams};
use m3d_scoring::boxes::{rec_outcome, rec_summary, RecOutcome};
use m3d_scoring::meteor::{Meteor, MeteorParams};
use m3d_scoring::rouge::rouge1;
use m3d_scoring::seg::dice;
use m3d_scoring::tokenize::WordTokenizer;
use m3d_scoring::vqa::closed_vqa_correct;
use m3d_scoring::wordnet::WordNet;
use m3d_scoring::Convention;
use m3d_shards::schema::Task;
use m3d_volume::Volume;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::bertscore::BertScorer;
use crate::{EvalError, Retrieval};

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub tasks: Vec<BenchTask>,
    /// The split evaluated (M3D-Bench: `test`).
    pub split: String,
    /// At most this many samples of each task (the first, in the fixed order).
    pub limit: Option<usize>,
    /// Prompts answered per batch.
    pub batch: usize,
    pub max_new_tokens: usize,
    /// Keys the template draws.
    pub seed: u64,
    pub convention: Convention,
    /// WordNet 3.0 dict folder for METEOR (`/usr/share/wordnet` with Debian's `wordnet-base`).
    pub wordnet: Option<PathBuf>,
    /// BERTScore's encoder folder (roberta-large for M3D-Bench's numbers) and the layer it reads (`None`: 17,
    /// roberta-large's); without one the report has no BERTScore.
    pub bertscore: Option<(PathBuf, Option<i64>)>,
    /// The M3D-CLIP folder that the `retrieval` task scores (LaMed does not retrieve).
    pub clip: Option<PathBuf>,
    /// PNG overlays (`overlays/`) of this many segmentation samples of each segmentation task, the first ones
    /// in the fixed order (whichever rank evaluates them).
    pub overlays: usize,
    pub rank: usize,
    pub world: usize,
    /// The work items the coordinator planned ([`crate::job::EvalPlan`], from the manifests): the sample
    /// tables must give as many.
    pub planned_items: Option<u64>,
}

impl BenchOptions {
    /// What can be refused before any data is read.
    pub fn check(&self) -> Result<(), EvalError> {
        if self.tasks.contains(&BenchTask::Retrieval) && self.clip.is_none() {
            return Err(EvalError::Input(
                "the retrieval task scores an M3D-CLIP: name it with --clip <folder>".into(),
            ));
        }
        Ok(())
    }
}

/// One evaluated prompt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SampleResult {
    pub task: String,
    pub sample_id: String,
    /// Class-name (`cls`) or description (`des`) phrasing, where the reference has both.
    pub family: Option<String>,
    pub question_type: String,
    /// Index of the question template drawn.
    pub template: Option<usize>,
    pub question: String,
    pub answer: String,
    pub prediction: String,
    /// The overlay PNGs of a segmentation answer (predicted mask, then the reference mask), relative to the
    /// output folder.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlays: Vec<String>,
    /// The metrics of this prompt (`bleu1`, `rouge1`, `meteor`, `bertscore_f1`, `correct`, `iou`, `dice`).
    pub scores: BTreeMap<String, f64>,
}

/// Samples a bench task takes from a shard dataset.
pub(crate) fn accepts(task: BenchTask, stored: Task) -> bool {
    match task {
        BenchTask::Cap => stored == Task::Caption,
        BenchTask::VqaClosed => stored == Task::VqaClosed,
        BenchTask::VqaOpen => matches!(stored, Task::VqaOpen | Task::VqaYesNo),
        BenchTask::Rec => stored == Task::Rec,
        BenchTask::Reg => stored == Task::Reg,
        BenchTask::Seg => stored == Task::Seg,
        BenchTask::RefSeg => matches!(stored, Task::RefSeg | Task::Seg),
        BenchTask::Retrieval => false,
    }
}

/// A sample of a task: (task, dataset index, sample index).
type WorkItem = (BenchTask, usize, u64);

/// The part file of `rank` of `world`.
pub fn part_path(out: &Path, rank: usize, world: usize) -> PathBuf {
    out.join("parts")
        .join(format!("rank-{rank}-of-{world}.jsonl"))
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> EvalError {
    EvalError::Input(format!("{}: {e}", path.display()))
}

/// The text metrics of one prediction against its reference answer.
struct TextScorer {
    meteor: Option<Meteor>,
    bleu: BleuParams,
}

impl TextScorer {
    fn new(opts: &BenchOptions) -> Result<TextScorer, EvalError> {
        let meteor = match &opts.wordnet {
            Some(dir) => Some(Meteor::new(
                WordNet::open(dir).map_err(|e| io_err(dir, e))?,
                WordTokenizer::preserve_line(),
                MeteorParams::default(),
            )),
            None => None,
        };
        Ok(TextScorer {
            meteor,
            bleu: BleuParams {
                convention: opts.convention,
                ..BleuParams::m3d()
            },
        })
    }

    fn score(&self, prediction: &str, answer: &str, scores: &mut BTreeMap<String, f64>) {
        // Under the reference's convention an empty side has no BLEU (its run would stop there): the sample is
        // reported without one.
        if let Ok(b) = bleu(prediction, &[answer], &self.bleu) {
            scores.insert("bleu1".into(), b.bleu);
        }
        if let Some(r) = rouge1(prediction, &[answer]) {
            scores.insert("rouge1".into(), r.fmeasure);
        }
        if let Some(m) = &self.meteor {
            if let Ok(v) = m.score(prediction, &[answer]) {
                scores.insert("meteor".into(), v);
            }
        }
    }
}

/// How a rank learns which work items (places in the pass's fixed order) are its own.
pub enum Share<'a> {
    /// Rank `opts.rank` of `opts.world` takes items `rank`, `rank + world`, ...: a fixed slice, for a run
    /// without a coordinator.
    Stride,
    /// Items leased a batch at a time from a work queue (the coordinator's `LeaseWork`): called with the most
    /// items wanted, it answers the next range of the pass, empty when none is left. A rank that is faster,
    /// or started sooner, takes more, so no rank waits for a slower one at the end.
    Leased(&'a mut dyn FnMut(usize) -> Result<std::ops::Range<u64>, EvalError>),
}

/// Runs this rank's share of the benchmark with `model` over the shard datasets `data` (each opened with the
/// extra volume datasets `volumes`, e.g. M3D-Cap's for M3D-VQA), writing its part file under `out`.
/// `progress(done, all)` is called after each batch: this rank's items under [`Share::Stride`], the pass's
/// items handed out so far under [`Share::Leased`].
pub fn run_rank(
    model: &LamedModel,
    data: &[String],
    volumes: &[String],
    opts: &BenchOptions,
    out: &Path,
    mut share: Share<'_>,
    mut progress: impl FnMut(usize, usize) -> Result<(), EvalError>,
) -> Result<PathBuf, EvalError> {
    if opts.world == 0 || opts.rank >= opts.world {
        return Err(EvalError::Input(format!(
            "rank {} of world {}",
            opts.rank, opts.world
        )));
    }
    opts.check()?;
    let loaders: Vec<ShardLoader> = data
        .iter()
        .map(|url| {
            ShardLoader::open_with_volumes(
                url,
                volumes,
                LoaderOptions {
                    prefetch_depth: 0,
                    ..LoaderOptions::default()
                },
            )
        })
        .collect::<Result<_, _>>()?;
    // (task, dataset, sample) in the fixed order, then this rank's share.
    let mut work: Vec<WorkItem> = Vec::new();
    for &task in &opts.tasks {
        if task == BenchTask::Retrieval {
            continue;
        }
        let before = work.len();
        for (d, loader) in loaders.iter().enumerate() {
            let table = loader.samples();
            for i in 0..table.len() {
                if table.split(i) == Some(opts.split.as_str())
                    && table.task(i).is_some_and(|t| accepts(task, t))
                {
                    work.push((task, d, i as u64));
                }
            }
        }
        if let Some(limit) = opts.limit {
            work.truncate(before + limit.min(work.len() - before));
        }
        if work.len() == before {
            return Err(EvalError::Input(format!(
                "task `{task}`: no `{}` sample in {data:?}",
                opts.split
            )));
        }
    }
    // Retrieval is the last item, after every task's samples.
    let retrieval_item = opts
        .tasks
        .contains(&BenchTask::Retrieval)
        .then_some(work.len());
    let items = work.len() + usize::from(retrieval_item.is_some());
    if let Some(planned) = opts.planned_items {
        if planned != items as u64 {
            return Err(EvalError::Input(format!(
                "the datasets' manifests count {planned} work items, their sample tables {items}: {data:?}"
            )));
        }
    }
    // The first `overlays` samples of each segmentation task, by their place in the fixed order.
    let mut drawn = std::collections::HashSet::new();
    for task in [BenchTask::Seg, BenchTask::RefSeg] {
        drawn.extend(
            work.iter()
                .filter(|w| w.0 == task)
                .take(opts.overlays)
                .copied(),
        );
    }
    let mut strided = (opts.rank..items).step_by(opts.world);
    let strided_len = strided.len();

    let scorer = TextScorer::new(opts)?;
    let bertscore = match &opts.bertscore {
        Some((dir, layers)) => Some(BertScorer::load(dir, *layers, model.device())?),
        None => None,
    };
    let image_tokens = model.config().num_image_tokens() as usize;
    let path = part_path(out, opts.rank, opts.world);
    let dir = path.parent().unwrap_or(out);
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let tmp = path.with_extension("jsonl.tmp");
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?);
    let batch = opts.batch.max(1);
    let started = std::time::Instant::now();
    // This rank's items so far (under `Share::Stride` also what its progress bar counts).
    let mut done = 0;
    loop {
        let (next, shown) = match &mut share {
            Share::Stride => {
                let next: Vec<usize> = strided.by_ref().take(batch).collect();
                let shown = (done + next.len(), strided_len);
                (next, shown)
            }
            Share::Leased(lease) => {
                let r = lease(batch)?;
                let (start, end) = (r.start as usize, r.end as usize);
                if end > items {
                    return Err(EvalError::Control(format!(
                        "leased items {start}..{end} of a pass of {items}"
                    )));
                }
                ((start..end).collect(), (end, items))
            }
        };
        if next.is_empty() {
            break;
        }
        done += next.len();
        if retrieval_item.is_some_and(|i| next.contains(&i)) {
            retrieval(model, data, &loaders, opts, out)?;
        }
        let chunk: Vec<WorkItem> = next.iter().filter_map(|&i| work.get(i).copied()).collect();
        if !chunk.is_empty() {
            answer_chunk(
                model,
                data,
                &loaders,
                opts,
                out,
                &chunk,
                &scorer,
                bertscore.as_ref(),
                &drawn,
                image_tokens,
                &tmp,
                &mut file,
            )?;
        }
        progress(shown.0, shown.1)?;
        m3d_worker::failpoint::pause("eval-batch");
    }
    file.flush().map_err(|e| io_err(&tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
    tracing::info!(
        rank = opts.rank,
        world = opts.world,
        items = done,
        seconds = started.elapsed().as_secs_f64(),
        "slice evaluated"
    );
    Ok(path)
}

/// Answers and scores one batch of work items, appending a result line per prompt to `file` (at `tmp`).
#[allow(clippy::too_many_arguments)]
fn answer_chunk(
    model: &LamedModel,
    data: &[String],
    loaders: &[ShardLoader],
    opts: &BenchOptions,
    out: &Path,
    chunk: &[WorkItem],
    scorer: &TextScorer,
    bertscore: Option<&BertScorer>,
    drawn: &std::collections::HashSet<WorkItem>,
    image_tokens: usize,
    tmp: &Path,
    file: &mut impl Write,
) -> Result<(), EvalError> {
    let mut requests = Vec::new();
    // Each prompt with its sample's reference mask and its work item.
    let mut asked: Vec<(BenchPrompt, Option<Vec<f32>>, WorkItem)> = Vec::new();
    // One load per dataset for the whole chunk, so its volume reads are planned (and coalesced) together.
    let mut loaded = std::collections::HashMap::new();
    for (d, loader) in loaders.iter().enumerate() {
        let wanted: Vec<u64> = chunk.iter().filter(|w| w.1 == d).map(|w| w.2).collect();
        if !wanted.is_empty() {
            for sample in loader.load(&wanted)? {
                loaded.insert((d, sample.index), sample);
            }
        }
    }
    for &(task, d, i) in chunk {
        let sample = loaded
            .get(&(d, i))
            .ok_or_else(|| EvalError::Input(format!("sample {i} of {} did not load", data[d])))?;
        let image = Tensor::from_slice(&sample.image).view(sample.shape.map(|s| s as i64));
        let prompts = bench_prompts(task, &sample.sample, image_tokens, "<im_patch>", opts.seed)
            .map_err(|e| EvalError::Input(format!("{}: {e}", data[d])))?;
        for p in prompts {
            requests.push(Request {
                image: image.shallow_clone(),
                question: p.question.clone(),
                prompt: p.prompt.clone(),
            });
            asked.push((p, sample.mask.clone(), (task, d, i)));
        }
    }
    let masks = asked
        .iter()
        .any(|(p, _, _)| matches!(p.task, BenchTask::Seg | BenchTask::RefSeg));
    let answers = model
        .answer(&requests, &model.options(opts.max_new_tokens), masks)
        .map_err(|e| EvalError::Input(e.to_string()))?;
    let texts =
        |p: &BenchPrompt| matches!(p.task, BenchTask::Cap | BenchTask::VqaOpen | BenchTask::Reg);
    // One BERTScore call for the chunk's free-text answers (each pair still scored alone).
    let mut bert = match bertscore {
        Some(b) => {
            let pairs: Vec<(&str, &str)> = asked
                .iter()
                .zip(&answers)
                .filter(|((p, _, _), _)| texts(p))
                .map(|((p, _, _), a)| (a.text.as_str(), p.answer.as_str()))
                .collect();
            b.score(&pairs)?.into_iter()
        }
        None => Vec::new().into_iter(),
    };
    for ((p, mask, key), a) in asked.into_iter().zip(answers) {
        let mut scores = BTreeMap::new();
        let mut overlays = Vec::new();
        if texts(&p) {
            if let Some(b) = bert.next() {
                scores.insert("bertscore_f1".into(), b.f1);
            }
        }
        match p.task {
            BenchTask::Cap | BenchTask::VqaOpen | BenchTask::Reg => {
                scorer.score(&a.text, &p.answer, &mut scores)
            }
            BenchTask::VqaClosed => {
                let choice = p.answer_choice.as_deref().unwrap_or_default();
                let ok = closed_vqa_correct(&a.text, choice, opts.convention);
                scores.insert("correct".into(), f64::from(u8::from(ok)));
            }
            BenchTask::Rec => {
                let (key, value) = match rec_outcome(&a.text, &p.answer, opts.convention) {
                    RecOutcome::Scored(iou) => ("iou", iou),
                    RecOutcome::Unparsable => ("rec_unparsable", 1.0),
                    RecOutcome::Negative { predicted_box } => {
                        ("rec_negative_box", f64::from(u8::from(predicted_box)))
                    }
                };
                scores.insert(key.into(), value);
            }
            BenchTask::Seg | BenchTask::RefSeg => {
                let target = mask.unwrap_or_default();
                // No [SEG] in the answer: an empty mask predicted.
                let logits = match &a.seg_logits {
                    Some(l) => Vec::<f32>::try_from(l.view([-1]))?,
                    None => vec![-1e4; target.len()],
                };
                let d = dice(&logits, &target, opts.convention)
                    .map_err(|e| EvalError::Input(format!("{}: {e}", p.sample_id)))?;
                scores.insert("dice".into(), d);
                if drawn.contains(&key) {
                    let sample = loaded.get(&(key.1, key.2)).ok_or_else(|| {
                        EvalError::Input(format!("sample {} did not load", p.sample_id))
                    })?;
                    overlays =
                        draw_overlays(out, &p, sample.shape, &sample.image, &logits, &target)?;
                }
            }
            BenchTask::Retrieval => {}
        }
        let r = SampleResult {
            task: p.task.to_string(),
            sample_id: p.sample_id.clone(),
            family: p.family.map(|f| format!("{f:?}").to_lowercase()),
            question_type: p.question_type.clone(),
            template: p.template_index(),
            question: p.question,
            answer: p.answer,
            prediction: a.text,
            overlays,
            scores,
        };
        let line = serde_json::to_string(&r).map_err(|e| io_err(tmp, e))?;
        writeln!(file, "{line}").map_err(|e| io_err(tmp, e))?;
    }
    Ok(())
}

/// Where the rank of the retrieval item leaves its scores for [`merge`].
fn retrieval_path(out: &Path) -> PathBuf {
    out.join("parts").join("retrieval.json")
}

/// Image-text retrieval by the `--clip` model over the caption pairs of the split in the first dataset that has
/// them (the `--limit` first; the reference's M3D-Bench retrieval set is 2,000 pairs), written for [`merge`].
/// It is one work item, the last: one rank ranks every image against every text.
fn retrieval(
    model: &LamedModel,
    data: &[String],
    loaders: &[ShardLoader],
    opts: &BenchOptions,
    out: &Path,
) -> Result<(), EvalError> {
    let clip = opts.clip.as_ref().ok_or_else(|| {
        EvalError::Input(
            "the retrieval task scores an M3D-CLIP: name it with --clip <folder>".into(),
        )
    })?;
    let url = data
        .iter()
        .zip(loaders)
        .find(|(_, l)| !crate::caption_pairs(l, &opts.split).is_empty())
        .map(|(u, _)| u)
        .ok_or_else(|| {
            EvalError::Input(format!(
                "task `retrieval`: no caption pair of split `{}` in {data:?}",
                opts.split
            ))
        })?;
    let r = crate::clip_retrieval_on(clip, url, &opts.split, opts.limit, 16, model.device())?;
    let path = retrieval_path(out);
    let dir = path.parent().unwrap_or(out);
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let json = serde_json::to_vec_pretty(&r).map_err(|e| io_err(&path, e))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))
}

/// Writes `overlays/<task>-<sample>-<family><template>-{pred,truth}.png`: the volume's axial slices with the predicted
/// mask (logits above 0, i.e. probability above 0.5, as the reference thresholds) and with the reference mask.
fn draw_overlays(
    out: &Path,
    p: &BenchPrompt,
    shape: [usize; 4],
    image: &[f32],
    logits: &[f32],
    target: &[f32],
) -> Result<Vec<String>, EvalError> {
    let dir = out.join("overlays");
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let safe: String = p
        .sample_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let family = p
        .family
        .map_or("q".to_string(), |f| format!("{f:?}").to_lowercase());
    let stem = format!(
        "{}-{safe}-{family}{}",
        p.task,
        p.template_index().unwrap_or(0)
    );
    let volume = |v: Vec<u8>| {
        Volume::new(shape, v).map_err(|e| EvalError::Input(format!("{}: {e}", p.sample_id)))
    };
    let image = Volume::new(shape, image.to_vec())
        .map_err(|e| EvalError::Input(format!("{}: {e}", p.sample_id)))?;
    let mut written = Vec::new();
    for (kind, mask) in [
        ("pred", logits.iter().map(|&l| u8::from(l > 0.0)).collect()),
        ("truth", target.iter().map(|&t| u8::from(t > 0.5)).collect()),
    ] {
        let name = format!("overlays/{stem}-{kind}.png");
        write_overlay_png(&image, &volume(mask)?, &out.join(&name))
            .map_err(|e| EvalError::Input(e.to_string()))?;
        written.push(name);
    }
    Ok(written)
}

/// The published M3D-LaMed-Llama-2-7B numbers (M3D paper), beside which the report puts ours.
const PUBLISHED: &[(&str, &str, f64)] = &[
    ("cap", "bleu1", 15.15),
    ("cap", "rouge1", 19.55),
    ("cap", "meteor", 14.38),
    ("cap", "bertscore_f1", 88.46),
    ("vqa-open", "bleu1", 49.38),
    ("vqa-open", "rouge1", 52.39),
    ("vqa-open", "meteor", 33.58),
    ("vqa-open", "bertscore_f1", 91.53),
    ("vqa-closed", "accuracy", 75.78),
    ("retrieval", "ir_r1", 19.10),
];

/// Aggregates of one task (or one question type of it): sample count and mean of each metric, in percent.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Aggregate {
    pub prompts: usize,
    pub metrics: BTreeMap<String, f64>,
}

fn aggregate<'a>(
    results: impl Iterator<Item = &'a SampleResult>,
    convention: Convention,
) -> Aggregate {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let mut prompts = 0;
    let mut rec = Vec::new();
    for r in results {
        prompts += 1;
        if r.task == "rec" {
            // REC's figures depend on how unparsable answers and negatives count: `rec_summary` decides.
            rec.push(
                match (r.scores.get("iou"), r.scores.get("rec_negative_box")) {
                    (Some(&iou), _) => RecOutcome::Scored(iou),
                    (None, Some(&b)) => RecOutcome::Negative {
                        predicted_box: b > 0.0,
                    },
                    (None, None) => RecOutcome::Unparsable,
                },
            );
            continue;
        }
        for (k, v) in &r.scores {
            let e = sums.entry(k.clone()).or_default();
            e.0 += v;
            e.1 += 1;
        }
    }
    let mut metrics: BTreeMap<String, f64> = sums
        .into_iter()
        .map(|(k, (s, n))| {
            let name = if k == "correct" {
                "accuracy".to_string()
            } else {
                k
            };
            (name, 100.0 * s / n as f64)
        })
        .collect();
    if !rec.is_empty() {
        let s = rec_summary(&rec, convention);
        metrics.insert("iou".into(), 100.0 * s.mean_iou);
        metrics.insert("acc@0.5".into(), 100.0 * s.acc_at_05);
    }
    Aggregate { prompts, metrics }
}

/// The merged report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub world: usize,
    pub tasks: BTreeMap<String, Aggregate>,
    /// Task -> question type -> aggregate (VQA's five types; one entry elsewhere).
    pub by_question_type: BTreeMap<String, BTreeMap<String, Aggregate>>,
    /// Task -> metric -> the published M3D-LaMed-Llama-2-7B value.
    pub published: BTreeMap<String, BTreeMap<String, f64>>,
    /// (task, sample, Dice in percent, overlay PNGs) of the segmentation samples drawn.
    pub overlays: Vec<(String, String, f64, Vec<String>)>,
    pub notes: Vec<String>,
}

/// Reads the `world` part files under `out` (all must be there), writes `results.jsonl` (sorted by task and
/// sample), `bench.json` and `bench.md`, and returns the report.
pub fn merge(
    out: &Path,
    world: usize,
    model: &str,
    opts: &BenchOptions,
) -> Result<BenchReport, EvalError> {
    let mut results: Vec<SampleResult> = Vec::new();
    for rank in 0..world {
        let path = part_path(out, rank, world);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            io_err(
                &path,
                format!("{e} (rank {rank} of {world} has not finished)"),
            )
        })?;
        for (n, line) in text.lines().enumerate() {
            results.push(
                serde_json::from_str(line)
                    .map_err(|e| io_err(&path, format!("line {}: {e}", n + 1)))?,
            );
        }
    }
    let order: BTreeMap<String, usize> = opts
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i))
        .collect();
    results.sort_by(|a, b| {
        (order.get(&a.task), &a.sample_id, &a.family).cmp(&(
            order.get(&b.task),
            &b.sample_id,
            &b.family,
        ))
    });
    let path = out.join("results.jsonl");
    let mut lines = String::new();
    for r in &results {
        lines.push_str(&serde_json::to_string(r).map_err(|e| io_err(&path, e))?);
        lines.push('\n');
    }
    std::fs::write(&path, lines).map_err(|e| io_err(&path, e))?;

    let mut tasks = BTreeMap::new();
    let mut by_question_type = BTreeMap::new();
    for task in order.keys() {
        let of_task = || results.iter().filter(move |r| &r.task == task);
        tasks.insert(task.clone(), aggregate(of_task(), opts.convention));
        let mut types: BTreeMap<String, Vec<&SampleResult>> = BTreeMap::new();
        for r in of_task() {
            types.entry(r.question_type.clone()).or_default().push(r);
        }
        by_question_type.insert(
            task.clone(),
            types
                .into_iter()
                .map(|(t, rs)| (t, aggregate(rs.into_iter(), opts.convention)))
                .collect(),
        );
    }
    if opts.tasks.contains(&BenchTask::Retrieval) {
        let path = retrieval_path(out);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            io_err(
                &path,
                format!("{e} (the retrieval item's rank has not scored it)"),
            )
        })?;
        let r: Retrieval = serde_json::from_str(&text).map_err(|e| io_err(&path, e))?;
        // The reference's names (eval_itr.py): IR ranks the texts for each image, TR the images for each text.
        let metrics = [
            ("ir_r1", r.image_to_text_r1),
            ("ir_r5", r.image_to_text_r5),
            ("ir_r10", r.image_to_text_r10),
            ("tr_r1", r.text_to_image_r1),
            ("tr_r5", r.text_to_image_r5),
            ("tr_r10", r.text_to_image_r10),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), 100.0 * v))
        .collect();
        tasks.insert(
            "retrieval".into(),
            Aggregate {
                prompts: r.pairs,
                metrics,
            },
        );
    }
    let mut published: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for &(task, metric, value) in PUBLISHED {
        if order.contains_key(task) {
            published
                .entry(task.into())
                .or_default()
                .insert(metric.into(), value);
        }
    }
    let mut notes = vec![
        match &opts.bertscore {
            Some((dir, layer)) => format!(
                "BERTScore F1: bert_score 0.3.13's recipe (no idf, no baseline rescaling) on {}, layer {}.",
                dir.display(),
                layer.map_or("17 (roberta-large's)".to_string(), |l| l.to_string())
            ),
            None => "BERTScore skipped: no encoder given (--bertscore <roberta-large folder>).".into(),
        },
        "METEOR tokenises each text as one line (nltk word_tokenize with preserve_line=True)."
            .to_string(),
    ];
    if opts.wordnet.is_none() {
        notes.push("METEOR skipped: no WordNet folder given (--wordnet).".into());
    }
    if opts.convention == Convention::Reference {
        notes.push(
            "Scored with the reference's conventions, defects included (--reference-scoring)."
                .into(),
        );
    }
    let overlays = results
        .iter()
        .filter(|r| !r.overlays.is_empty())
        .map(|r| {
            let dice = r.scores.get("dice").copied().unwrap_or(0.0);
            (
                r.task.clone(),
                r.sample_id.clone(),
                100.0 * dice,
                r.overlays.clone(),
            )
        })
        .collect();
    let report = BenchReport {
        model: model.to_string(),
        world,
        tasks,
        by_question_type,
        published,
        overlays,
        notes,
    };
    let json = out.join("bench.json");
    std::fs::write(
        &json,
        serde_json::to_vec_pretty(&report).map_err(|e| io_err(&json, e))?,
    )
    .map_err(|e| io_err(&json, e))?;
    let md = out.join("bench.md");
    std::fs::write(&md, markdown(&report)).map_err(|e| io_err(&md, e))?;
    Ok(report)
}

/// `bench.md`: one table of every task's metrics (published values beside ours), then the question types.
pub fn markdown(r: &BenchReport) -> String {
    let mut s = format!(
        "# M3D-Bench: {}\n\n| task | prompts | metric | m3d | published (M3D-LaMed-Llama-2-7B) |\n|---|---:|---|---:|---:|\n",
        r.model
    );
    for (task, agg) in &r.tasks {
        for (metric, value) in &agg.metrics {
            let published = r
                .published
                .get(task)
                .and_then(|p| p.get(metric))
                .map_or(String::new(), |v| format!("{v:.2}"));
            s.push_str(&format!(
                "| {task} | {} | {metric} | {value:.2} | {published} |\n",
                agg.prompts
            ));
        }
    }
    s.push_str("\n## By question type\n\n| task | type | prompts | metric | m3d |\n|---|---|---:|---|---:|\n");
    for (task, types) in &r.by_question_type {
        for (t, agg) in types {
            for (metric, value) in &agg.metrics {
                s.push_str(&format!(
                    "| {task} | {t} | {} | {metric} | {value:.2} |\n",
                    agg.prompts
                ));
            }
        }
    }
    if !r.overlays.is_empty() {
        s.push_str("\n## Segmentation overlays (predicted mask, reference mask)\n\n");
        for (task, sample, dice, files) in &r.overlays {
            s.push_str(&format!("**{task}** `{sample}`, Dice {dice:.2}\n\n"));
            for f in files {
                s.push_str(&format!("![{f}]({f}) "));
            }
            s.push_str("\n\n");
        }
    }
    if !r.notes.is_empty() {
        s.push_str("\n## Notes\n\n");
        for n in &r.notes {
            s.push_str(&format!("- {n}\n"));
        }
    }
    s
}
