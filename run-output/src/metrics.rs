//! Training metrics as JSON lines: one [`MetricsLine`] per logged step, appended to `metrics.jsonl`.
//!
//! Each line is serialised into one buffer and written with a single `write(2)` on a file opened with
//! `O_APPEND`, so lines of several writers (ranks, a restarted worker) never interleave, and a crash leaves
//! at most a partial last line — which [`read_metrics`] skips. A run in an object store keeps its lines in
//! parts instead (an object cannot be appended to): see [`crate::output`].

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Errors of the metrics files, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("metrics file {path}, line {line}: {source}")]
    Parse {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
}

/// One logged step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsLine {
    /// Optimizer step (1-based: the step just taken).
    pub step: u64,
    /// Training loss of the step (mean over the logged window is the caller's choice).
    pub loss: f64,
    /// Learning rate the step used.
    pub lr: f64,
    /// Total gradient 2-norm before clipping.
    #[serde(default)]
    pub grad_norm: Option<f64>,
    /// Samples per second over the window since the previous line (all ranks when the caller sums them).
    #[serde(default)]
    pub samples_per_s: f64,
    /// Scored tokens per second over the window (0 for CLIP).
    #[serde(default)]
    pub tokens_per_s: f64,
    /// Share of the window's wall time spent waiting for data, in [0, 1].
    #[serde(default)]
    pub data_wait_share: f64,
    /// Resident memory of the process, bytes.
    #[serde(default)]
    pub rss_bytes: u64,
    /// Seconds since the Unix epoch when the line was made.
    #[serde(default)]
    pub time: f64,
    /// Anything else (`eval_loss`, `r_at_1`, `rank`, ...).
    #[serde(flatten)]
    pub extra: BTreeMap<String, f64>,
}

impl MetricsLine {
    /// A line for `step` with the current time and resident memory; rates from a [`Meter`] or 0.
    pub fn new(step: u64, loss: f64, lr: f64) -> Self {
        MetricsLine {
            step,
            loss,
            lr,
            grad_norm: None,
            samples_per_s: 0.0,
            tokens_per_s: 0.0,
            data_wait_share: 0.0,
            rss_bytes: rss_bytes(),
            time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            extra: BTreeMap::new(),
        }
    }

    /// Sets the rates from the meter's window (and starts a new window).
    pub fn with_rates(mut self, meter: &mut Meter) -> Self {
        let r = meter.take();
        self.samples_per_s = r.samples_per_s;
        self.tokens_per_s = r.tokens_per_s;
        self.data_wait_share = r.data_wait_share;
        self
    }
}

/// Appends [`MetricsLine`]s to a JSONL file.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens `path` for appending (created with its folder if missing; existing lines are kept, so a
    /// restarted run continues the file).
    pub fn open(path: &Path) -> Result<Self, MetricsError> {
        let io = |source| MetricsError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line with a single write.
    pub fn write(&mut self, line: &MetricsLine) -> Result<(), MetricsError> {
        let mut buf = serde_json::to_vec(line).map_err(|source| MetricsError::Parse {
            path: self.path.clone(),
            line: 0,
            source,
        })?;
        buf.push(b'\n');
        self.file
            .write_all(&buf)
            .and_then(|_| self.file.flush())
            .map_err(|source| MetricsError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// Reads a metrics file. A malformed *last* line (a write cut short by a crash) is skipped; a malformed
/// line elsewhere is an error naming it.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsLine>, MetricsError> {
    let text = std::fs::read_to_string(path).map_err(|source| MetricsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_metrics(&text, path)
}

/// [`read_metrics`] of text read elsewhere (an object in a store); `path` names it in errors.
pub fn parse_metrics(text: &str, path: &Path) -> Result<Vec<MetricsLine>, MetricsError> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        match serde_json::from_str(l) {
            Ok(m) => out.push(m),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(source) => {
                return Err(MetricsError::Parse {
                    path: path.to_path_buf(),
                    line: i + 1,
                    source,
                })
            }
        }
    }
    Ok(out)
}

/// Throughput over a window of steps: samples, tokens, and time spent waiting for data.
#[derive(Debug)]
pub struct Meter {
    start: Instant,
    samples: u64,
    tokens: u64,
    wait: Duration,
}

/// The rates of one window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub samples_per_s: f64,
    pub tokens_per_s: f64,
    pub data_wait_share: f64,
}

impl Default for Meter {
    fn default() -> Self {
        Self::new()
    }
}

impl Meter {
    pub fn new() -> Self {
        Meter {
            start: Instant::now(),
            samples: 0,
            tokens: 0,
            wait: Duration::ZERO,
        }
    }

    /// Records a micro-batch: its samples, scored tokens and the time spent waiting for it.
    pub fn add(&mut self, samples: u64, tokens: u64, data_wait: Duration) {
        self.samples += samples;
        self.tokens += tokens;
        self.wait += data_wait;
    }

    /// The window's rates; starts a new window.
    pub fn take(&mut self) -> Rates {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let r = Rates {
            samples_per_s: self.samples as f64 / secs,
            tokens_per_s: self.tokens as f64 / secs,
            data_wait_share: (self.wait.as_secs_f64() / secs).clamp(0.0, 1.0),
        };
        *self = Meter::new();
        r
    }
}

/// Resident set size of this process in bytes (`VmRSS` of `/proc/self/status`; 0 where unavailable).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
