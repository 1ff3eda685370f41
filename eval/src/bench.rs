//! M3D-Bench for M3D-LaMed (`m3d eval bench`): the test split of each task, prompts built as the reference
//! builds them ([`m3d_instruct::bench`], the template drawn per sample from a seeded stream and recorded),
//! answered by greedy decoding in batches ([`m3d_infer`]), scored with [`m3d_scoring`].
//!
//! Work is split by rank: the work items in a fixed order (each task's samples: tasks as asked, datasets as
//! listed, samples in shard order, the `--limit` first of each task; then retrieval, one item), which ranks
//! lease from the coordinator's work queue a batch at a time, or, without a coordinator, one process takes in
//! order ([`Share`]; ranks and world come from the coordinator, see [`crate::job`]). Each finished batch is a
//! result file of its own, `parts/items-<start>-<end>.jsonl` (its items' results, each line naming its item),
//! written whole or not at all; [`merge`] reads them all, refuses a pass with an item no file covers (naming
//! the items), and writes `results.jsonl`, `bench.json` and `bench.md`. A rank of a restart round skips the
//! items a finished file already covers (a failed rank's finished batches included), so a round that breaks
//! late redoes only what no rank had finished. A result depends only on its sample, never on the
//! rank or the batch it ran in (left-padded batches decode as single prompts; the template draw is keyed by
//! the sample), so 1 and N workers give the same per-sample results. Each rank also leaves a summary of its
//! share in a round, `parts/rank-R-of-W.json` ([`RankSummary`]).
//!
//! Metrics per task, as the reference's `Bench/eval/eval_*.py` compute them (with its defects corrected unless
//! [`Convention::Reference`]): captions, open VQA and REG: BLEU-1, ROUGE-1 F, METEOR (with WordNet; skipped,
//! and said so in the report, when no WordNet is given); closed VQA: accuracy; REC: IoU and Acc@0.5; seg and
//! refseg: Dice of the `[SEG]` mask against the sample's mask; BERTScore F1 ([`crate::bertscore`]) for the free
//! text when an encoder is given.

use std::collections::BTreeMap;
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

/// The result file of the pass's work items `items` (zero-padded, so that names sort by the first item).
pub fn chunk_path(out: &Path, items: std::ops::Range<usize>) -> PathBuf {
    out.join("parts")
        .join(format!("items-{:08}-{:08}.jsonl", items.start, items.end))
}

/// The finished result files under `out/parts` with the items each covers, sorted by name.
pub fn finished_chunks(out: &Path) -> Result<Vec<(std::ops::Range<usize>, PathBuf)>, EvalError> {
    let dir = out.join("parts");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| io_err(&dir, e))?.path();
        let Some(range) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("items-")?.strip_suffix(".jsonl"))
            .and_then(|n| n.split_once('-'))
            .and_then(|(a, b)| Some(a.parse::<usize>().ok()?..b.parse::<usize>().ok()?))
        else {
            continue;
        };
        if range.start < range.end {
            found.push((range, path));
        }
    }
    found.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(found)
}

/// The summary file of `rank` of `world` (one per round a rank finished its share in).
pub fn summary_path(out: &Path, rank: usize, world: usize) -> PathBuf {
    out.join("parts")
        .join(format!("rank-{rank}-of-{world}.json"))
}

/// What one rank did in one round: written to [`summary_path`] when its share is done.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RankSummary {
    pub rank: usize,
    pub world: usize,
    /// Work items of the whole pass.
    pub pass_items: usize,
    /// Items this rank took (leased, or the whole pass without a coordinator).
    pub items: usize,
    /// Of those, the ones it evaluated, and the ones an earlier round's finished result file already covered.
    pub evaluated: usize,
    pub reused: usize,
    /// Prompts it answered.
    pub prompts: usize,
    pub seconds: f64,
}

/// A line of a result file: a prompt's result and the work item it belongs to.
#[derive(Serialize, Deserialize)]
struct ChunkLine {
    item: usize,
    #[serde(flatten)]
    result: SampleResult,
}

/// Writes `lines` as the result file of `items`: a temporary file renamed into place, so a result file is
/// either whole or absent.
fn write_chunk(out: &Path, items: std::ops::Range<usize>, lines: &str) -> Result<(), EvalError> {
    write_atomically(&chunk_path(out, items), lines.as_bytes())
}

/// Writes `value` as JSON to `path` through a temporary file.
fn write_json_atomically(path: &Path, value: &impl Serialize) -> Result<(), EvalError> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| io_err(path, e))?;
    write_atomically(path, &json)
}

/// Writes `bytes` to `<path>.tmp`, then renames it to `path`: readers see the whole file or none.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), EvalError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

/// Marks the items of `out`'s finished result files (those of a pass of `finished.len()` items).
fn mark_finished(out: &Path, finished: &mut [bool]) -> Result<(), EvalError> {
    let items = finished.len();
    for (range, _) in finished_chunks(out)? {
        if let Some(slots) = finished.get_mut(range.start..range.end.min(items)) {
            slots.fill(true);
        }
    }
    Ok(())
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
    /// The whole pass, in order, a batch at a time: a run without a coordinator.
    All,
    /// Items leased a batch at a time from a work queue (the coordinator's `LeaseWork`): called with the most
    /// items wanted, it answers the next range of the pass, empty when none is left. A rank that is faster,
    /// or started sooner, takes more, so no rank waits for a slower one at the end.
    Leased(&'a mut dyn FnMut(usize) -> Result<std::ops::Range<u64>, EvalError>),
}

/// Runs this rank's share of the benchmark with `model` over the shard datasets `data` (each opened with the
/// extra volume datasets `volumes`, e.g. M3D-Cap's for M3D-VQA), writing a result file per finished batch under
/// `out` and skipping the items that the result files already there cover (an earlier round's).
/// `progress(done, all)` is called after each batch, once its result file is in place: the pass's items
/// handed out so far, of all of them.
pub fn run_rank(
    model: &LamedModel,
    data: &[String],
    volumes: &[String],
    opts: &BenchOptions,
    out: &Path,
    mut share: Share<'_>,
    mut progress: impl FnMut(usize, usize) -> Result<(), EvalError>,
) -> Result<RankSummary, EvalError> {
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
    let scorer = TextScorer::new(opts)?;
    let bertscore = match &opts.bertscore {
        Some((dir, layers)) => Some(BertScorer::load(dir, *layers, model.device())?),
        None => None,
    };
    let image_tokens = model.config().num_image_tokens() as usize;
    let parts = out.join("parts");
    std::fs::create_dir_all(&parts).map_err(|e| io_err(&parts, e))?;
    // What earlier rounds finished, and then what this rank finishes: a coordinator that restarts mid-round
    // hands the pass out again from its start, and this rank's own batches are not evaluated twice.
    let mut finished = vec![false; items];
    mark_finished(out, &mut finished)?;
    let batch = opts.batch.max(1);
    let started = std::time::Instant::now();
    let mut summary = RankSummary {
        rank: opts.rank,
        world: opts.world,
        pass_items: items,
        items: 0,
        evaluated: 0,
        reused: 0,
        prompts: 0,
        seconds: 0.0,
    };
    let mut cursor = 0;
    // The end of the furthest range this rank has been handed.
    let mut high_water = 0;
    loop {
        let (start, end) = match &mut share {
            Share::All => {
                let r = (cursor, (cursor + batch).min(items));
                cursor = r.1;
                r
            }
            Share::Leased(lease) => {
                let r = lease(batch)?;
                let (start, end) = (r.start as usize, r.end as usize);
                if end > items || start > end {
                    return Err(EvalError::Control(format!(
                        "leased items {start}..{end} of a pass of {items}"
                    )));
                }
                (start, end)
            }
        };
        if start == end {
            break;
        }
        summary.items += end - start;
        if start < high_water {
            // The queue went back: a coordinator that restarted mid-round hands the pass out again. Other ranks'
            // batches finished since this round began are in the folder (a local or shared one) by now.
            mark_finished(out, &mut finished)?;
        }
        high_water = high_water.max(end);
        // Each run of items no finished file covers becomes a result file of its own.
        let mut s = start;
        while s < end {
            if finished[s] {
                summary.reused += 1;
                s += 1;
                continue;
            }
            let e = (s..end).find(|&i| finished[i]).unwrap_or(end);
            if retrieval_item.is_some_and(|i| (s..e).contains(&i)) {
                retrieval(model, data, &loaders, opts, out)?;
            }
            let chunk: Vec<(usize, WorkItem)> = (s..e)
                .filter_map(|i| work.get(i).map(|&w| (i, w)))
                .collect();
            let mut lines = String::new();
            if !chunk.is_empty() {
                summary.prompts += answer_chunk(
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
                    &mut lines,
                )?;
            }
            write_chunk(out, s..e, &lines)?;
            finished[s..e].fill(true);
            summary.evaluated += e - s;
            s = e;
        }
        progress(end, items)?;
        m3d_worker::failpoint::pause("eval-batch");
    }
    summary.seconds = started.elapsed().as_secs_f64();
    write_json_atomically(&summary_path(out, opts.rank, opts.world), &summary)?;
    tracing::info!(
        rank = opts.rank,
        world = opts.world,
        items = summary.items,
        evaluated = summary.evaluated,
        reused = summary.reused,
        seconds = summary.seconds,
        "share evaluated"
    );
    Ok(summary)
}

/// Answers and scores one batch of work items (each with its place in the pass), appending a result line per
/// prompt to `lines`; returns the number of prompts.
#[allow(clippy::too_many_arguments)]
fn answer_chunk(
    model: &LamedModel,
    data: &[String],
    loaders: &[ShardLoader],
    opts: &BenchOptions,
    out: &Path,
    chunk: &[(usize, WorkItem)],
    scorer: &TextScorer,
    bertscore: Option<&BertScorer>,
    drawn: &std::collections::HashSet<WorkItem>,
    image_tokens: usize,
    lines: &mut String,
) -> Result<usize, EvalError> {
    let mut requests = Vec::new();
    // Each prompt with its sample's reference mask and its work item.
    let mut asked: Vec<(BenchPrompt, Option<Vec<f32>>, WorkItem, usize)> = Vec::new();
    // One load per dataset for the whole chunk, so its volume reads are planned (and coalesced) together.
    let mut loaded = std::collections::HashMap::new();
    for (d, loader) in loaders.iter().enumerate() {
        let wanted: Vec<u64> = chunk
            .iter()
            .filter(|(_, w)| w.1 == d)
            .map(|(_, w)| w.2)
            .collect();
        if !wanted.is_empty() {
            for sample in loader.load(&wanted)? {
                loaded.insert((d, sample.index), sample);
            }
        }
    }
    for &(item, (task, d, i)) in chunk {
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
            asked.push((p, sample.mask.clone(), (task, d, i), item));
        }
    }
    let masks = asked
        .iter()
        .any(|(p, ..)| matches!(p.task, BenchTask::Seg | BenchTask::RefSeg));
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
                .filter(|((p, ..), _)| texts(p))
                .map(|((p, ..), a)| (a.text.as_str(), p.answer.as_str()))
                .collect();
            b.score(&pairs)?.into_iter()
        }
        None => Vec::new().into_iter(),
    };
    let prompts = asked.len();
    for ((p, mask, key, item), a) in asked.into_iter().zip(answers) {
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
        let line = serde_json::to_string(&ChunkLine { item, result: r })
            .map_err(|e| EvalError::Input(format!("the result of work item {item}: {e}")))?;
        lines.push_str(&line);
        lines.push('\n');
    }
    Ok(prompts)
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
    write_json_atomically(&retrieval_path(out), &r)
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

/// Reads the result files under `out` (together they must cover the pass's `items`; `world` ranks wrote them),
/// writes `results.jsonl`
/// (sorted by task and sample), `bench.json` and `bench.md`, and returns the report.
pub fn merge(
    out: &Path,
    items: usize,
    world: usize,
    model: &str,
    opts: &BenchOptions,
) -> Result<BenchReport, EvalError> {
    // Each item's results come from the first result file (by name) that covers it: a batch finished twice
    // (by a rank of a broken round and again after it) gives the same lines, so either copy serves.
    let chunks = finished_chunks(out)?;
    let mut owner: Vec<Option<usize>> = vec![None; items];
    for (c, (range, path)) in chunks.iter().enumerate() {
        if range.end > items {
            return Err(io_err(
                path,
                format!("covers items up to {}, the pass has {items}: a result file of another evaluation (use a fresh -o)", range.end),
            ));
        }
        for slot in &mut owner[range.clone()] {
            slot.get_or_insert(c);
        }
    }
    let mut missing = Vec::new();
    let mut i = 0;
    while i < items {
        if owner[i].is_none() {
            let e = (i..items).find(|&k| owner[k].is_some()).unwrap_or(items);
            missing.push(format!("{i}..{e}"));
            i = e;
        } else {
            i += 1;
        }
    }
    if !missing.is_empty() {
        return Err(EvalError::Input(format!(
            "{}: no result file covers work items {} of {items} (their rank has not finished)",
            out.join("parts").display(),
            missing.join(", ")
        )));
    }
    let mut results: Vec<SampleResult> = Vec::new();
    for (c, (range, path)) in chunks.iter().enumerate() {
        let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
        for (n, line) in text.lines().enumerate() {
            let l: ChunkLine = serde_json::from_str(line)
                .map_err(|e| io_err(path, format!("line {}: {e}", n + 1)))?;
            if !range.contains(&l.item) {
                return Err(io_err(
                    path,
                    format!(
                        "line {}: work item {} is outside the file's items {range:?}",
                        n + 1,
                        l.item
                    ),
                ));
            }
            if owner[l.item] == Some(c) {
                results.push(l.result);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> BenchOptions {
        BenchOptions {
            tasks: vec![BenchTask::VqaClosed],
            split: "test".into(),
            limit: None,
            batch: 2,
            max_new_tokens: 4,
            seed: 0,
            convention: Convention::Corrected,
            wordnet: None,
            bertscore: None,
            clip: None,
            overlays: 0,
            rank: 0,
            world: 1,
            planned_items: None,
        }
    }

    /// The result lines of `items`, one prompt each, the prediction naming the file they came from.
    fn lines(items: std::ops::Range<usize>, from: &str) -> String {
        items
            .map(|item| {
                let result = SampleResult {
                    task: "vqa-closed".into(),
                    sample_id: format!("s{item}"),
                    family: None,
                    question_type: "plane".into(),
                    template: None,
                    question: "q".into(),
                    answer: "A".into(),
                    prediction: from.into(),
                    overlays: Vec::new(),
                    scores: BTreeMap::from([("correct".to_string(), 1.0)]),
                };
                serde_json::to_string(&ChunkLine { item, result }).unwrap() + "\n"
            })
            .collect()
    }

    #[test]
    fn merge_takes_each_item_once_and_names_the_items_no_file_covers() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        std::fs::create_dir_all(out.join("parts")).unwrap();
        write_chunk(out, 0..2, &lines(0..2, "first")).unwrap();
        write_chunk(out, 4..6, &lines(4..6, "first")).unwrap();
        // Names that are not finished result files are not read.
        std::fs::write(out.join("parts/items-00000002-00000004.jsonl.tmp"), "junk").unwrap();
        let err = merge(out, 6, 1, "m", &opts()).unwrap_err().to_string();
        assert!(err.contains("work items 2..4 of 6"), "{err}");

        // A batch finished twice (a broken round, then its restart) and a file overlapping three others: each
        // item's lines come from the first file, by name, that covers it, so every item is there once.
        write_chunk(out, 2..4, &lines(2..4, "first")).unwrap();
        write_chunk(out, 1..5, &lines(1..5, "again")).unwrap();
        let report = merge(out, 6, 1, "m", &opts()).unwrap();
        assert_eq!(report.tasks["vqa-closed"].prompts, 6);
        let merged: Vec<SampleResult> = std::fs::read_to_string(out.join("results.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let from: Vec<(&str, &str)> = merged
            .iter()
            .map(|r| (r.sample_id.as_str(), r.prediction.as_str()))
            .collect();
        assert_eq!(
            from,
            [
                ("s0", "first"),
                ("s1", "first"),
                ("s2", "again"),
                ("s3", "again"),
                ("s4", "again"),
                ("s5", "first")
            ]
        );

        // A file of a longer pass (another evaluation's) and a line outside its file's items are refused.
        write_chunk(out, 6..8, &lines(6..8, "other")).unwrap();
        let err = merge(out, 6, 1, "m", &opts()).unwrap_err().to_string();
        assert!(
            err.contains("items-00000006-00000008.jsonl") && err.contains("fresh -o"),
            "{err}"
        );
        std::fs::remove_file(chunk_path(out, 6..8)).unwrap();
        write_chunk(out, 5..6, &lines(4..5, "first")).unwrap();
        let err = merge(out, 6, 1, "m", &opts()).unwrap_err().to_string();
        assert!(err.contains("work item 4 is outside"), "{err}");
    }
}
