//! Loss curves from metrics JSONL files to a PNG (`m3d plot`, `m3d train` at the end, and the `m3d-plot`
//! binary): loss against step on top, learning rate below, one coloured line per file with a legend.
//!
//! Drawn with `plotters`' bitmap backend into a buffer, text through `ab_glyph` from an embedded DejaVu
//! Sans (no system fonts), PNG encoded by `image` and written under a temporary name, then renamed — or,
//! for a store URL ([`plot_inputs`]), put as one object. Inputs may be store URLs too (a run's metrics
//! parts, read while it trains: see [`crate::output`]).

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::register_font;

use crate::metrics::{read_metrics, MetricsError, MetricsLine};
use crate::output::{read_run_metrics, write_output, OutputError};

/// Errors of plotting, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("{0}: no metrics lines to plot")]
    Empty(PathBuf),
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("writing {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// One curve: a label and its metrics lines.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub lines: Vec<MetricsLine>,
}

/// Image size in pixels.
#[derive(Debug, Clone, Copy)]
pub struct PlotSize {
    pub width: u32,
    pub height: u32,
}

impl Default for PlotSize {
    fn default() -> Self {
        PlotSize {
            width: 1000,
            height: 700,
        }
    }
}

static FONT: Once = Once::new();

fn register_fonts() {
    FONT.call_once(|| {
        // DejaVu Sans is a valid font: registration cannot fail; if it did, text would be missing, not
        // the curves.
        let _ = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// Reads each metrics file as one series (labelled by its file name, or its parent folder when the file
/// is `metrics.jsonl`) and renders them to `out`.
pub fn plot_files(files: &[PathBuf], out: &Path, size: PlotSize) -> Result<(), PlotError> {
    let mut series = Vec::new();
    for f in files {
        let lines = read_metrics(f)?;
        if lines.is_empty() {
            return Err(PlotError::Empty(f.clone()));
        }
        let label = match f.file_name().and_then(|n| n.to_str()) {
            Some("metrics.jsonl") | None => f
                .parent()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str())
                .unwrap_or("run")
                .to_string(),
            Some(n) => n.trim_end_matches(".jsonl").to_string(),
        };
        series.push(Series { label, lines });
    }
    render(&series, out, size)
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

/// Reads each input as one series — a metrics file, a run folder, or a store URL of either (see
/// [`read_run_metrics`]) — and renders them to `out`, a local path or a store URL of the PNG object.
pub fn plot_inputs(inputs: &[String], out: &str, size: PlotSize) -> Result<(), PlotError> {
    let mut series = Vec::new();
    for input in inputs {
        let (label, lines) = read_run_metrics(input)?;
        if lines.is_empty() {
            return Err(PlotError::Empty(PathBuf::from(input)));
        }
        series.push(Series { label, lines });
    }
    if !crate::output::is_store_url(out) {
        return render(&series, Path::new(out), size);
    }
    let png = render_png(&series, Path::new(out), size)?;
    Ok(write_output(out, png)?)
}

/// Renders the series to PNG bytes (`out` names the image in errors).
pub fn render_png(series: &[Series], out: &Path, size: PlotSize) -> Result<Vec<u8>, PlotError> {
    let img = draw(series, out, size)?;
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| PlotError::Write {
            path: out.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok(png.into_inner())
}

/// Renders the series to a PNG at `out`.
pub fn render(series: &[Series], out: &Path, size: PlotSize) -> Result<(), PlotError> {
    let img = draw(series, out, size)?;
    let write_err = |e: String| PlotError::Write {
        path: out.to_path_buf(),
        message: e,
    };
    let tmp = out.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| write_err(e.to_string()))?;
    std::fs::rename(&tmp, out).map_err(|e| write_err(e.to_string()))
}

fn draw(series: &[Series], out: &Path, size: PlotSize) -> Result<image::RgbImage, PlotError> {
    register_fonts();
    let draw_err = |e: String| PlotError::Draw {
        path: out.to_path_buf(),
        message: e,
    };
    let (w, h) = (size.width.max(200), size.height.max(200));
    let mut buf = vec![0u8; w as usize * h as usize * 3];
    let all = || series.iter().flat_map(|s| s.lines.iter());
    let (x0, x1) = range(all().map(|l| l.step as f64));
    let (l0, l1) = range(all().map(|l| l.loss));
    let (r0, r1) = range(all().map(|l| l.lr));
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(e.to_string()))?;
        let (upper, lower) = root.split_vertically(h * 2 / 3);
        let mut chart = ChartBuilder::on(&upper)
            .caption("training loss", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, l0..l1)
            .map_err(|e| draw_err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_desc("loss")
            .draw()
            .map_err(|e| draw_err(e.to_string()))?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).mix(1.0);
            chart
                .draw_series(LineSeries::new(
                    s.lines.iter().map(|l| (l.step as f64, l.loss)),
                    color.stroke_width(2),
                ))
                .map_err(|e| draw_err(e.to_string()))?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(|e| draw_err(e.to_string()))?;

        let mut lr_chart = ChartBuilder::on(&lower)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, r0..r1)
            .map_err(|e| draw_err(e.to_string()))?;
        lr_chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_desc("learning rate")
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .draw()
            .map_err(|e| draw_err(e.to_string()))?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).mix(1.0);
            lr_chart
                .draw_series(LineSeries::new(
                    s.lines.iter().map(|l| (l.step as f64, l.lr)),
                    color.stroke_width(2),
                ))
                .map_err(|e| draw_err(e.to_string()))?;
        }
        root.present().map_err(|e| draw_err(e.to_string()))?;
    }
    image::RgbImage::from_raw(w, h, buf).ok_or_else(|| draw_err("buffer size".into()))
}
