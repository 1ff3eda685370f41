//! M3D-Bench evaluation prompts: the question (with the image tokens in front) and the expected answer for a test
//! sample, built exactly as the reference's evaluation scripts build them.
//!
//! This module owns the mapping from a converted [`SampleRecord`] to the reference's evaluation prompt for the
//! eight M3D-Bench tasks ([`BenchTask`]). It does not own the training prompts (the crate root, our own wording),
//! the parsing of predictions, or the metrics (crate `m3d-scoring`).
//!
//! The templates are the reference's, verbatim: `templates/bench.json` is a `json.dump` of the module-level
//! objects of `Bench/dataset/prompt_templates.py` (`Caption_templates`, `PosREC_templates`, `PosREG_templates`,
//! `Seg_templates`), `Bench/dataset/term_dictionary.py` (`term_dict`) and `Bench/dataset/dataset_info.py`
//! (`dataset_info`) of BAAI-DCAI/M3D at commit 63e72005a2304eda74579870239bfc7b04b0edae; its `provenance` field
//! names the files, lines and blobs. The constructions follow `Bench/dataset/multi_dataset.py` at that commit, as
//! called by `Bench/eval/eval_{caption,vqa,pos,seg}.py` (line numbers on each function below).
//!
//! Random choices: the reference draws each template with Python's `random.choice` inside DataLoader workers, so
//! its picks depend on torch's worker seeding and the worker count and cannot be reproduced. Here every prompt
//! draws from its own ChaCha8 stream seeded with `SHA-256("m3d-bench-prompt" 0 seed_le 0 task 0 family 0
//! sample_id)` ([`prompt_rng`]), each draw uniform over the list as `random.choice` is (duplicated templates keep
//! their double weight). A prompt therefore depends only on `(seed, task, family, sample)`: evaluations are
//! reproducible and independent of how samples are split across workers, and [`BenchPrompt::draws`] records the
//! indices so a report can name the template and [`prompt_from_draws`] can rebuild the prompt.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use m3d_shards::schema::{SampleRecord, Task};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{box_text, Family, InstructError};

/// The reference's image placeholder token (`LaMed` adds it to the tokenizer; the model swaps it for features).
pub const REFERENCE_IMAGE_TOKEN: &str = "<im_patch>";
/// The reference's `--proj_out_num` default (every eval script): image tokens in front of each question.
pub const REFERENCE_IMAGE_TOKENS: usize = 256;

const BENCH_JSON: &str = include_str!("../templates/bench.json");
const BENCH_JSON_PATH: &str = "instruct/templates/bench.json (built in)";

/// One M3D-Bench evaluation task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BenchTask {
    /// Report generation on M3D-Cap (`eval_caption.py`).
    #[serde(rename = "cap")]
    Cap,
    /// Multiple-choice VQA on M3D-VQA (`eval_vqa.py --close_ended True`).
    #[serde(rename = "vqa-closed")]
    VqaClosed,
    /// Free-text VQA on M3D-VQA (`eval_vqa.py --close_ended False`).
    #[serde(rename = "vqa-open")]
    VqaOpen,
    /// Referring expression comprehension: the answer is a box (`eval_pos.py --rec True`).
    #[serde(rename = "rec")]
    Rec,
    /// Referring expression generation: given a box, name the region (`eval_pos.py --rec False`).
    #[serde(rename = "reg")]
    Reg,
    /// Semantic segmentation: the class is named (`eval_seg.py --res False`).
    #[serde(rename = "seg")]
    Seg,
    /// Referring segmentation: the class is described (`eval_seg.py --res True`), or an M3D-RefSeg row.
    #[serde(rename = "refseg")]
    RefSeg,
    /// Image-text retrieval with M3D-CLIP (`eval_itr.py`): no prompt.
    #[serde(rename = "retrieval")]
    Retrieval,
}

impl BenchTask {
    /// Every task, in declaration order.
    pub const ALL: [BenchTask; 8] = [
        BenchTask::Cap,
        BenchTask::VqaClosed,
        BenchTask::VqaOpen,
        BenchTask::Rec,
        BenchTask::Reg,
        BenchTask::Seg,
        BenchTask::RefSeg,
        BenchTask::Retrieval,
    ];

    /// The task's name on the command line and in reports (`cap`, `vqa-closed`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            BenchTask::Cap => "cap",
            BenchTask::VqaClosed => "vqa-closed",
            BenchTask::VqaOpen => "vqa-open",
            BenchTask::Rec => "rec",
            BenchTask::Reg => "reg",
            BenchTask::Seg => "seg",
            BenchTask::RefSeg => "refseg",
            BenchTask::Retrieval => "retrieval",
        }
    }
}

impl fmt::Display for BenchTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task name that is not one of [`BenchTask::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown bench task `{0}` (expected one of cap, vqa-closed, vqa-open, rec, reg, seg, refseg, retrieval)")]
pub struct UnknownBenchTask(pub String);

impl FromStr for BenchTask {
    type Err = UnknownBenchTask;
    fn from_str(s: &str) -> Result<Self, UnknownBenchTask> {
        BenchTask::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownBenchTask(s.to_string()))
    }
}

/// Where `bench.json` came from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    pub repository: String,
    pub commit: String,
    pub extracted: String,
    /// Template list -> `path:lines (blob)` in the reference repository.
    pub files: BTreeMap<String, String>,
    /// Bench task -> the reference lines that build its prompt.
    pub prompt_construction: BTreeMap<String, String>,
}

/// One template family of `prompt_templates.py` (`PosREC_templates`, `PosREG_templates`, `Seg_templates`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QaLists {
    pub cls_questions: Vec<String>,
    pub des_questions: Vec<String>,
    pub cls_answers: Vec<String>,
    pub des_answers: Vec<String>,
    /// Answers for an empty mask (a negative sample).
    pub cls_no_answers: Vec<String>,
    pub des_no_answers: Vec<String>,
}

/// Which reference test data a task evaluates on (from the eval scripts' defaults).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalDataset {
    /// Data file relative to the reference's `Data/data` (M3D-Cap, M3D-VQA).
    pub file: Option<String>,
    /// M3D-Seg dataset codes (REC/REG/seg/refseg).
    pub tags: Option<Vec<String>>,
    /// The code `eval_seg.py` uses unless `--dataset_id` says otherwise.
    pub default_tag: Option<String>,
    pub split: String,
}

/// The contents of `templates/bench.json`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchTemplates {
    pub provenance: Provenance,
    #[serde(rename = "Caption_templates")]
    pub caption: Vec<String>,
    #[serde(rename = "PosREC_templates")]
    pub rec: QaLists,
    #[serde(rename = "PosREG_templates")]
    pub reg: QaLists,
    #[serde(rename = "Seg_templates")]
    pub seg: QaLists,
    /// Bench task name -> its reference test data.
    pub eval_datasets: BTreeMap<String, EvalDataset>,
    /// M3D-Seg dataset code -> class names by mask channel (the names the reference prompts use).
    pub dataset_info: BTreeMap<String, Vec<String>>,
    /// Class name -> descriptive phrases (description prompts).
    pub term_dict: BTreeMap<String, Vec<String>>,
}

impl BenchTemplates {
    /// Parses and checks a `bench.json` text.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let t: BenchTemplates = serde_json::from_str(text).map_err(|e| e.to_string())?;
        t.validate()?;
        Ok(t)
    }

    /// Every list is non-empty and every template has exactly the `{}` placeholders its construction fills
    /// (Python's `str.format` would raise on too few arguments and silently drop extra ones).
    pub fn validate(&self) -> Result<(), String> {
        check_list("Caption_templates", &self.caption, 0)?;
        for (family, qa) in [
            ("PosREC_templates", &self.rec),
            ("PosREG_templates", &self.reg),
            ("Seg_templates", &self.seg),
        ] {
            // Seg's class-name answers are used without `.format` (multi_dataset.py:803).
            let cls_answer_slots = usize::from(family != "Seg_templates");
            // REC/REG description answers take (class, box) or (class, phrase); Seg's take the class only.
            let des_answer_slots = if family == "Seg_templates" { 1 } else { 2 };
            for (name, list, slots) in [
                ("cls_questions", &qa.cls_questions, 1),
                ("des_questions", &qa.des_questions, 1),
                ("cls_answers", &qa.cls_answers, cls_answer_slots),
                ("des_answers", &qa.des_answers, des_answer_slots),
                ("cls_no_answers", &qa.cls_no_answers, 1),
                ("des_no_answers", &qa.des_no_answers, 1),
            ] {
                check_list(&format!("{family}.{name}"), list, slots)?;
            }
        }
        if let Some((class, _)) = self.term_dict.iter().find(|(_, v)| v.is_empty()) {
            return Err(format!("term_dict[{class:?}] is empty"));
        }
        Ok(())
    }
}

fn check_list(name: &str, list: &[String], slots: usize) -> Result<(), String> {
    if list.is_empty() {
        return Err(format!("{name}: no templates"));
    }
    for t in list {
        let found = t.matches("{}").count();
        let stray = t.replace("{}", "").contains(['{', '}']);
        if found != slots || stray {
            return Err(format!(
                "{name}: {t:?} must have exactly {slots} `{{}}` placeholder(s) and no other braces"
            ));
        }
    }
    Ok(())
}

/// The built-in reference templates (parsed once).
pub fn bench_templates() -> Result<&'static BenchTemplates, InstructError> {
    static PARSED: OnceLock<Result<BenchTemplates, String>> = OnceLock::new();
    PARSED
        .get_or_init(|| BenchTemplates::from_json(BENCH_JSON))
        .as_ref()
        .map_err(|reason| InstructError::Templates {
            path: BENCH_JSON_PATH.to_string(),
            reason: reason.clone(),
        })
}

/// The indices of the reference's `random.choice` calls for one prompt, into the lists its construction uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draws {
    /// Question template (`Caption_templates`, `PosREC_templates.cls_questions`, ...).
    pub question: Option<usize>,
    /// Phrase of `term_dict[class]` (description prompts).
    pub term: Option<usize>,
    /// Answer template.
    pub answer: Option<usize>,
}

/// One evaluation prompt and what the reference's eval compares the model's output with.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchPrompt {
    pub task: BenchTask,
    pub sample_id: String,
    /// The reference dataset construction reproduced, e.g. `PosRECDataset(description=True)`.
    pub construction: &'static str,
    /// Class-name or description phrasing, where the reference has both.
    pub family: Option<Family>,
    /// The model's text input: the image tokens, then the question, joined as the reference joins them.
    pub prompt: String,
    /// The question alone (the reference's prompt minus its image tokens and their separator).
    pub question: String,
    /// The reference's `answer` for this sample: the report (cap), `"X. text"` (closed VQA), the answer text
    /// (open VQA), a worded box (REC), a worded class (REG), a worded `[SEG]` answer (seg, refseg).
    pub answer: String,
    /// Closed VQA: the letter; the reference scores a prediction correct when it contains `"{letter}."`.
    pub answer_choice: Option<String>,
    /// The reference's `question_type`: `1`..`5` for VQA (per-type tables), else `Caption`, `REC`, `REG`,
    /// `seg` or `refseg`.
    pub question_type: String,
    /// The class the prompt and answer name (M3D-Seg tasks): the reference's `dataset_info[tag][channel]`.
    pub class_name: Option<String>,
    /// REC: the ground-truth box; REG: the box shown in the question.
    pub bbox: Option<[f32; 6]>,
    /// The template draws made.
    pub draws: Draws,
}

impl BenchPrompt {
    /// The question template's index in its list (what a report records), if the construction draws one.
    pub fn template_index(&self) -> Option<usize> {
        self.draws.question
    }
}

/// A reference dataset's prompt construction (`Bench/dataset/multi_dataset.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Construction {
    /// `CapDataset` (lines 194-196).
    Caption,
    /// `VQADataset(close_ended=...)` (lines 301-311).
    Vqa { closed: bool },
    /// `PosRECDataset(description=...)` (lines 452-468).
    PosRec(Family),
    /// `PosREGDataset(description=...)` (lines 627-643).
    PosReg(Family),
    /// `SegDataset(description=...)` (lines 796-808).
    Seg(Family),
    /// `RefSegDataset` (lines 933-936).
    RefSegRow,
}

impl Construction {
    fn name(self) -> &'static str {
        match self {
            Construction::Caption => "CapDataset",
            Construction::Vqa { closed: true } => "VQADataset(close_ended=True)",
            Construction::Vqa { closed: false } => "VQADataset(close_ended=False)",
            Construction::PosRec(Family::Cls) => "PosRECDataset(description=False)",
            Construction::PosRec(Family::Des) => "PosRECDataset(description=True)",
            Construction::PosReg(Family::Cls) => "PosREGDataset(description=False)",
            Construction::PosReg(Family::Des) => "PosREGDataset(description=True)",
            Construction::Seg(Family::Cls) => "SegDataset(description=False)",
            Construction::Seg(Family::Des) => "SegDataset(description=True)",
            Construction::RefSegRow => "RefSegDataset",
        }
    }

    fn family(self) -> Option<Family> {
        match self {
            Construction::PosRec(f) | Construction::PosReg(f) | Construction::Seg(f) => Some(f),
            _ => None,
        }
    }

    /// The reference's `question_type` constant; `None` for VQA, whose type is the CSV row's.
    fn question_type(self) -> Option<&'static str> {
        match self {
            Construction::Caption => Some("Caption"),
            Construction::PosRec(_) => Some("REC"),
            Construction::PosReg(_) => Some("REG"),
            Construction::Seg(_) => Some("seg"),
            Construction::RefSegRow => Some("refseg"),
            Construction::Vqa { .. } => None,
        }
    }
}

fn sample_error(sample: &SampleRecord, reason: String) -> InstructError {
    InstructError::Sample {
        sample: sample.sample_id.clone(),
        reason,
    }
}

fn require<'s, T: ?Sized>(
    sample: &SampleRecord,
    task: BenchTask,
    field: &str,
    value: Option<&'s T>,
) -> Result<&'s T, InstructError> {
    value.ok_or_else(|| {
        sample_error(
            sample,
            format!("bench task {task} needs `{field}`, which the sample lacks"),
        )
    })
}

/// The constructions the reference evaluation applies to a sample of `sample.task` under `task`, in the order its
/// test set lists them.
fn constructions(
    task: BenchTask,
    sample: &SampleRecord,
) -> Result<Vec<Construction>, InstructError> {
    use Construction as C;
    let both = |make: fn(Family) -> Construction| vec![make(Family::Cls), make(Family::Des)];
    Ok(match (task, sample.task) {
        (BenchTask::Cap, Task::Caption) => vec![C::Caption],
        (BenchTask::VqaClosed, Task::VqaClosed) => vec![C::Vqa { closed: true }],
        (BenchTask::VqaOpen, Task::VqaOpen) => vec![C::Vqa { closed: false }],
        // PosRECTestDataset / PosREGTestDataset (multi_dataset.py:1007-1033) concatenate a class-name and a
        // description dataset over the same masks: each test mask is evaluated twice.
        (BenchTask::Rec, Task::Rec) => both(C::PosRec),
        (BenchTask::Reg, Task::Reg) => both(C::PosReg),
        (BenchTask::Seg, Task::Seg) => vec![C::Seg(Family::Cls)],
        // eval_seg.py's "RES" (--res True) is SegDataset(description=True) over M3D-Seg masks.
        (BenchTask::RefSeg, Task::Seg) => vec![C::Seg(Family::Des)],
        (BenchTask::RefSeg, Task::RefSeg) => vec![C::RefSegRow],
        (BenchTask::Retrieval, _) => {
            return Err(sample_error(
                sample,
                "bench task retrieval has no prompt: M3D-CLIP encodes the report text itself"
                    .to_string(),
            ))
        }
        (_, stored) => {
            return Err(sample_error(
                sample,
                format!("a {stored} sample is not a sample of bench task {task}"),
            ))
        }
    })
}

/// The random stream of one prompt: ChaCha8 seeded with `SHA-256("m3d-bench-prompt" 0 seed_le 0 task 0 family 0
/// sample_id)`, where `family` is `cls`, `des` or empty. Hashing the id (rather than using a position) keeps the
/// draws independent of sample order and worker split; hashing task and family keeps the two phrasings of a REC
/// mask, and the seg and refseg prompts of one mask, independent.
pub fn prompt_rng(
    seed: u64,
    task: BenchTask,
    family: Option<Family>,
    sample_id: &str,
) -> ChaCha8Rng {
    let family = match family {
        Some(Family::Cls) => "cls",
        Some(Family::Des) => "des",
        None => "",
    };
    let mut h = Sha256::new();
    h.update(b"m3d-bench-prompt\0");
    h.update(seed.to_le_bytes());
    for part in [task.as_str(), family, sample_id] {
        h.update([0u8]);
        h.update(part.as_bytes());
    }
    ChaCha8Rng::from_seed(h.finalize().into())
}

/// A uniform index into a list of `len` items (`len > 0`, guaranteed by validation), as `random.choice`.
fn pick(rng: &mut ChaCha8Rng, len: usize) -> usize {
    // Sampling u64 keeps the stream identical on 32- and 64-bit targets.
    rng.random_range(0..len as u64) as usize
}

/// Python's `template.format(*args)` for templates whose only fields are `{}` (checked when loading).
fn format_positional(template: &str, args: &[&str]) -> String {
    let mut pieces = template.split("{}");
    let mut out = String::from(pieces.next().unwrap_or_default());
    for (i, piece) in pieces.enumerate() {
        out.push_str(args.get(i).copied().unwrap_or_default());
        out.push_str(piece);
    }
    out
}

/// The lists a construction draws from. They are drawn in the fixed order question, term, answer (the reference's
/// order differs for REG descriptions, answer before term, which does not matter: its stream is not reproduced).
struct Lists<'t> {
    questions: Option<&'t [String]>,
    terms: Option<&'t [String]>,
    answers: Option<&'t [String]>,
}

/// The class a Seg-family prompt names: the reference's `dataset_info[tag][cls_id]` (multi_dataset.py:452,627,796),
/// with `tag` the first component of the volume id (`0011/s0864`) and `cls_id` the mask channel. Volumes of a code
/// the reference does not know fall back to the sample's own class name.
fn reference_class(
    t: &BenchTemplates,
    task: BenchTask,
    sample: &SampleRecord,
) -> Result<String, InstructError> {
    let tag = sample.volume_id.split('/').next().unwrap_or_default();
    let Some(classes) = t.dataset_info.get(tag) else {
        return require(sample, task, "class_name", sample.class_name.as_deref())
            .map(str::to_string);
    };
    let channel = *require(sample, task, "mask_index", sample.mask_index.as_ref())?;
    // A channel the reference's list lacks means the data is not the reference's M3D-Seg (synthetic data
    // reuses its codes): the sample's own class name is then the only right one.
    if let (None, Some(name)) = (classes.get(channel as usize), sample.class_name.as_deref()) {
        return Ok(name.to_string());
    }
    classes.get(channel as usize).cloned().ok_or_else(|| {
        sample_error(
            sample,
            format!(
                "mask_index {channel} is out of range for M3D-Seg dataset {tag}, whose reference class list has {} classes",
                classes.len()
            ),
        )
    })
}

fn terms<'t>(
    t: &'t BenchTemplates,
    sample: &SampleRecord,
    class: &str,
) -> Result<&'t [String], InstructError> {
    t.term_dict.get(class).map(Vec::as_slice).ok_or_else(|| {
        // The reference raises KeyError here and its retry loop silently evaluates a random other sample.
        sample_error(
            sample,
            format!("class {class:?} has no entry in the reference term_dict"),
        )
    })
}

fn lists<'t>(
    t: &'t BenchTemplates,
    construction: Construction,
    term_list: Option<&'t [String]>,
) -> Lists<'t> {
    let qa = |qa: &'t QaLists, f: Family| match f {
        Family::Cls => Lists {
            questions: Some(&qa.cls_questions),
            terms: None,
            answers: Some(&qa.cls_answers),
        },
        Family::Des => Lists {
            questions: Some(&qa.des_questions),
            terms: term_list,
            answers: Some(&qa.des_answers),
        },
    };
    match construction {
        Construction::Caption => Lists {
            questions: Some(&t.caption),
            terms: None,
            answers: None,
        },
        Construction::Vqa { .. } | Construction::RefSegRow => Lists {
            questions: None,
            terms: None,
            answers: None,
        },
        Construction::PosRec(f) => qa(&t.rec, f),
        Construction::PosReg(f) => qa(&t.reg, f),
        Construction::Seg(f) => qa(&t.seg, f),
    }
}

fn draw(lists: &Lists<'_>, rng: &mut ChaCha8Rng) -> Draws {
    let mut one = |l: Option<&[String]>| l.map(|l| pick(rng, l.len()));
    let question = one(lists.questions);
    let term = one(lists.terms);
    let answer = one(lists.answers);
    Draws {
        question,
        term,
        answer,
    }
}

/// `list[index]`, with an error naming the sample when a recorded draw is absent, unexpected or out of range.
fn chosen<'t>(
    sample: &SampleRecord,
    what: &str,
    list: Option<&'t [String]>,
    index: Option<usize>,
) -> Result<Option<&'t str>, InstructError> {
    match (list, index) {
        (None, None) => Ok(None),
        (Some(l), Some(i)) => l.get(i).map(|s| Some(s.as_str())).ok_or_else(|| {
            sample_error(
                sample,
                format!("{what} draw {i} is out of range (the list has {})", l.len()),
            )
        }),
        (Some(_), None) => Err(sample_error(
            sample,
            format!("the construction draws a {what}, but none was given"),
        )),
        (None, Some(i)) => Err(sample_error(
            sample,
            format!("{what} draw {i} given, but the construction draws no {what}"),
        )),
    }
}

/// The image tokens, then the question: glued for captions (multi_dataset.py:196), separated by one space
/// elsewhere (lines 311, 460, 636, 802, 934).
fn with_image_tokens(
    construction: Construction,
    image_tokens: usize,
    image_token: &str,
    question: &str,
) -> String {
    let sep = if construction == Construction::Caption {
        ""
    } else {
        " "
    };
    format!("{}{sep}{question}", image_token.repeat(image_tokens))
}

/// Question and answer text of one construction with its draws resolved.
struct Worded {
    question: String,
    answer: String,
    class_name: Option<String>,
    bbox: Option<[f32; 6]>,
}

/// Closed VQA as stored by m3d-data-prep (`vqa::closed_prompt`, the reference's lines 302-305): the question
/// already ends with `" Choices: A. .. B. .. C. .. D. .."` and the answer is `"{letter}. {text}"`.
fn vqa_closed(task: BenchTask, sample: &SampleRecord) -> Result<Worded, InstructError> {
    let question = require(sample, task, "question", sample.question.as_deref())?;
    let answer = require(sample, task, "answer", sample.answer.as_deref())?;
    let letter = require(
        sample,
        task,
        "answer_choice",
        sample.answer_choice.as_deref(),
    )?;
    if !question.contains(" Choices: A. ") {
        return Err(sample_error(
            sample,
            "closed VQA question lacks the reference's \" Choices: A. ... D. ...\" list"
                .to_string(),
        ));
    }
    if !answer.starts_with(&format!("{letter}. ")) {
        return Err(sample_error(
            sample,
            format!(
                "closed VQA answer {answer:?} does not start with its answer_choice `{letter}. `"
            ),
        ));
    }
    Ok(Worded {
        question: question.to_string(),
        answer: answer.to_string(),
        class_name: None,
        bbox: None,
    })
}

fn text_pair(task: BenchTask, sample: &SampleRecord) -> Result<Worded, InstructError> {
    Ok(Worded {
        question: require(sample, task, "question", sample.question.as_deref())?.to_string(),
        answer: require(sample, task, "answer", sample.answer.as_deref())?.to_string(),
        class_name: None,
        bbox: None,
    })
}

/// The picked strings of one prompt: question template, term phrase, answer template.
struct Picked<'t> {
    question: &'t str,
    term: &'t str,
    answer: &'t str,
}

/// The M3D-Seg constructions, positive masks (the converter derives samples only from non-empty masks):
/// PosRECDataset lines 458-468, PosREGDataset lines 633-643, SegDataset lines 800-808.
fn word_mask(
    construction: Construction,
    p: &Picked<'_>,
    class: &str,
    bbox: Option<&[f32; 6]>,
) -> (String, String) {
    let boxed = bbox.map(box_text).unwrap_or_default();
    let boxed = boxed.as_str();
    let (q_args, a_args): (&[&str], &[&str]) = match construction {
        Construction::PosRec(Family::Cls) => (&[class], &[boxed]),
        Construction::PosRec(Family::Des) => (&[p.term], &[class, boxed]),
        Construction::PosReg(Family::Cls) => (&[boxed], &[class]),
        Construction::PosReg(Family::Des) => (&[boxed], &[class, p.term]),
        // Seg class-name answers are not formatted (line 803); they hold no field, so no argument is a no-op.
        Construction::Seg(Family::Cls) => (&[class], &[]),
        Construction::Seg(Family::Des) => (&[p.term], &[class]),
        _ => (&[], &[]),
    };
    (
        format_positional(p.question, q_args),
        format_positional(p.answer, a_args),
    )
}

/// Resolves `draws` against the construction's lists and words the question and answer.
fn word(
    t: &BenchTemplates,
    task: BenchTask,
    construction: Construction,
    sample: &SampleRecord,
    draws: Draws,
) -> Result<Worded, InstructError> {
    let mask_task = matches!(
        construction,
        Construction::PosRec(_) | Construction::PosReg(_) | Construction::Seg(_)
    );
    let class = if mask_task {
        Some(reference_class(t, task, sample)?)
    } else {
        None
    };
    let term_list = match (&class, construction.family()) {
        (Some(c), Some(Family::Des)) => Some(terms(t, sample, c)?),
        _ => None,
    };
    let l = lists(t, construction, term_list);
    let question = chosen(sample, "question template", l.questions, draws.question)?;
    let term = chosen(sample, "term_dict phrase", l.terms, draws.term)?;
    let answer = chosen(sample, "answer template", l.answers, draws.answer)?;
    match construction {
        Construction::Caption => Ok(Worded {
            question: question.unwrap_or_default().to_string(),
            answer: require(sample, task, "report", sample.report.as_deref())?.to_string(),
            class_name: None,
            bbox: None,
        }),
        Construction::Vqa { closed: true } => vqa_closed(task, sample),
        Construction::Vqa { closed: false } | Construction::RefSegRow => text_pair(task, sample),
        _ => {
            let bbox = match construction {
                Construction::Seg(_) => None,
                _ => Some(require(sample, task, "bbox", sample.bbox.as_ref())?),
            };
            let class = class.unwrap_or_default();
            let picked = Picked {
                question: question.unwrap_or_default(),
                term: term.unwrap_or_default(),
                answer: answer.unwrap_or_default(),
            };
            let (question, answer) = word_mask(construction, &picked, &class, bbox);
            Ok(Worded {
                question,
                answer,
                class_name: Some(class),
                bbox: bbox.copied(),
            })
        }
    }
}

fn question_type(
    task: BenchTask,
    construction: Construction,
    sample: &SampleRecord,
) -> Result<String, InstructError> {
    match construction.question_type() {
        Some(constant) => Ok(constant.to_string()),
        None => require(
            sample,
            task,
            "question_type",
            sample.question_type.as_deref(),
        )
        .map(str::to_string),
    }
}

fn build(
    task: BenchTask,
    construction: Construction,
    sample: &SampleRecord,
    image_tokens: usize,
    image_token: &str,
    draws: Draws,
) -> Result<BenchPrompt, InstructError> {
    let t = bench_templates()?;
    let worded = word(t, task, construction, sample, draws)?;
    Ok(BenchPrompt {
        task,
        sample_id: sample.sample_id.clone(),
        construction: construction.name(),
        family: construction.family(),
        prompt: with_image_tokens(construction, image_tokens, image_token, &worded.question),
        question: worded.question,
        answer: worded.answer,
        answer_choice: match construction {
            Construction::Vqa { closed: true } => sample.answer_choice.clone(),
            _ => None,
        },
        question_type: question_type(task, construction, sample)?,
        class_name: worded.class_name,
        bbox: worded.bbox,
        draws,
    })
}

/// Every prompt the reference evaluation of `task` builds from `sample`: one for most tasks, two for REC and REG
/// (class-name phrasing, then description phrasing: the reference's test sets hold each mask once per phrasing).
///
/// Accepted samples: `cap` takes caption samples; `vqa-closed` / `vqa-open` the matching VQA samples; `rec`,
/// `reg` and `seg` the M3D-Seg samples of that task; `refseg` M3D-Seg `seg` samples (worded with a description of
/// the class, as `eval_seg.py --res True`) or M3D-RefSeg rows (their stored question and answer). `retrieval` has
/// no prompt and is an error. `image_tokens` copies of `image_token` go in front of each question (reference:
/// [`REFERENCE_IMAGE_TOKENS`] of [`REFERENCE_IMAGE_TOKEN`]); templates are drawn from [`prompt_rng`]`(seed, ..)`.
pub fn bench_prompts(
    task: BenchTask,
    sample: &SampleRecord,
    image_tokens: usize,
    image_token: &str,
    seed: u64,
) -> Result<Vec<BenchPrompt>, InstructError> {
    let t = bench_templates()?;
    constructions(task, sample)?
        .into_iter()
        .map(|c| {
            let term_list = term_list_for(t, task, c, sample)?;
            let mut rng = prompt_rng(seed, task, c.family(), &sample.sample_id);
            let draws = draw(&lists(t, c, term_list), &mut rng);
            build(task, c, sample, image_tokens, image_token, draws)
        })
        .collect()
}

/// The term list a description construction draws from (its length decides the draw).
fn term_list_for<'t>(
    t: &'t BenchTemplates,
    task: BenchTask,
    construction: Construction,
    sample: &SampleRecord,
) -> Result<Option<&'t [String]>, InstructError> {
    match construction {
        Construction::PosRec(Family::Des)
        | Construction::PosReg(Family::Des)
        | Construction::Seg(Family::Des) => {
            let class = reference_class(t, task, sample)?;
            terms(t, sample, &class).map(Some)
        }
        _ => Ok(None),
    }
}

/// Rebuilds one prompt from recorded draws (e.g. from a report's [`BenchPrompt::draws`]): `family` selects the
/// phrasing where [`bench_prompts`] gives two (REC, REG) and must match the task's otherwise (`Some(Cls)` for
/// `seg`, `Some(Des)` for `refseg` on M3D-Seg, `None` elsewhere). Every draw must be in range and present exactly
/// when the construction draws it.
pub fn prompt_from_draws(
    task: BenchTask,
    family: Option<Family>,
    sample: &SampleRecord,
    image_tokens: usize,
    image_token: &str,
    draws: Draws,
) -> Result<BenchPrompt, InstructError> {
    let all = constructions(task, sample)?;
    let construction = all
        .iter()
        .copied()
        .find(|c| c.family() == family)
        .ok_or_else(|| {
            let offered: Vec<String> = all.iter().map(|c| format!("{:?}", c.family())).collect();
            sample_error(
                sample,
                format!(
                    "bench task {task} has no {family:?} phrasing for a {} sample (it has {})",
                    sample.task,
                    offered.join(", ")
                ),
            )
        })?;
    build(task, construction, sample, image_tokens, image_token, draws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_positional_is_python_format() {
        assert_eq!(format_positional("a {} b {}.", &["x", "y"]), "a x b y.");
        assert_eq!(format_positional("{}", &["{}"]), "{}");
        assert_eq!(format_positional("It is [SEG].", &[]), "It is [SEG].");
        assert_eq!(format_positional("{}, {}", &["a", "b"]), "a, b");
    }

    #[test]
    fn validation_rejects_a_wrong_placeholder_count() {
        let mut v: serde_json::Value = serde_json::from_str(BENCH_JSON).unwrap();
        v["PosREC_templates"]["des_answers"][0] = "only {} one".into();
        let e = BenchTemplates::from_json(&v.to_string()).unwrap_err();
        assert!(e.contains("PosREC_templates.des_answers"), "{e}");
        let mut v: serde_json::Value = serde_json::from_str(BENCH_JSON).unwrap();
        v["Caption_templates"][3] = "a {0}".into();
        assert!(BenchTemplates::from_json(&v.to_string()).is_err());
        let mut v: serde_json::Value = serde_json::from_str(BENCH_JSON).unwrap();
        v["surprise"] = 1.into();
        assert!(BenchTemplates::from_json(&v.to_string())
            .unwrap_err()
            .contains("surprise"));
    }
}
