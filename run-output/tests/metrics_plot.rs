//! Metrics JSONL (append, read back, a cut-short last line skipped, a bad middle line named) and the loss
//! plot (a PNG of the requested size with the curves' colours, through the library and the binary).

use std::io::Write;
use std::path::Path;
use std::process::Command;

use m3d_runs::metrics::{read_metrics, Meter, MetricsError, MetricsLine, MetricsWriter};
use m3d_runs::plot::{render, PlotSize, Series};

/// Equal up to the last bit of float parsing (serde_json's default parser may differ in one ulp).
fn same(a: &[MetricsLine], b: &[MetricsLine]) -> bool {
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * x.abs().max(y.abs());
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.step == y.step
                && close(x.loss, y.loss)
                && close(x.lr, y.lr)
                && x.grad_norm == y.grad_norm
                && close(x.samples_per_s, y.samples_per_s)
                && close(x.tokens_per_s, y.tokens_per_s)
                && close(x.time, y.time)
                && x.rss_bytes == y.rss_bytes
                && x.extra == y.extra
        })
}

fn write_run(path: &Path, steps: u64, scale: f64) -> Vec<MetricsLine> {
    let mut w = MetricsWriter::open(path).unwrap();
    let mut meter = Meter::new();
    let mut lines = Vec::new();
    for s in 1..=steps {
        meter.add(4, 100, std::time::Duration::ZERO);
        let mut l = MetricsLine::new(
            s,
            scale * (2.0 / s as f64 + 0.1),
            1e-3 * s as f64 / steps as f64,
        )
        .with_rates(&mut meter);
        l.grad_norm = Some(1.5);
        l.extra.insert("rank".into(), 0.0);
        w.write(&l).unwrap();
        lines.push(l);
    }
    lines
}

#[test]
fn metrics_round_trip_and_survive_a_cut_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/metrics.jsonl");
    let lines = write_run(&path, 5, 1.0);
    assert!(same(&read_metrics(&path).unwrap(), &lines));
    assert!(lines[0].rss_bytes > 0, "resident memory is measured");
    assert!(lines[0].samples_per_s > 0.0);
    assert!((0.0..=1.0).contains(&lines[0].data_wait_share));
    let raw = std::fs::read_to_string(&path).unwrap();
    assert_eq!(raw.lines().count(), 5);
    assert!(
        raw.lines().all(|l| l.contains("\"rank\":0")),
        "extra fields are flattened"
    );

    // A reopened writer appends; a line cut short by a crash is skipped.
    let more = write_run(&path, 2, 1.0);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"{\"step\":3,\"lo")
        .unwrap();
    let back = read_metrics(&path).unwrap();
    assert_eq!(back.len(), 7);
    assert!(same(&back[5..], &more));

    // A malformed line in the middle is an error naming the file and line.
    std::fs::write(
        &path,
        "{\"step\":1,\"loss\":1,\"lr\":0}\nnot json\n{\"step\":2,\"loss\":1,\"lr\":0}\n",
    )
    .unwrap();
    let e = read_metrics(&path).unwrap_err();
    assert!(matches!(e, MetricsError::Parse { line: 2, .. }), "{e}");
    assert!(e.to_string().contains("metrics.jsonl, line 2"), "{e}");
}

/// Distinct non-grey colours in the image (curves and legend are coloured, text and axes are grey).
fn coloured(img: &image::RgbImage) -> usize {
    let mut set = std::collections::HashSet::new();
    for p in img.pixels() {
        let [r, g, b] = p.0;
        let (mx, mn) = (r.max(g).max(b) as i32, r.min(g).min(b) as i32);
        if mx - mn > 60 {
            set.insert((r / 32, g / 32, b / 32));
        }
    }
    set.len()
}

#[test]
fn plot_renders_curves_to_png() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_run(&dir.path().join("a.jsonl"), 30, 1.0);
    let b = write_run(&dir.path().join("b.jsonl"), 30, 1.3);
    let out = dir.path().join("loss.png");
    let series = vec![
        Series {
            label: "1 worker".into(),
            lines: a,
        },
        Series {
            label: "2 workers".into(),
            lines: b,
        },
    ];
    render(
        &series,
        &out,
        PlotSize {
            width: 640,
            height: 480,
        },
    )
    .unwrap();
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (640, 480));
    assert!(coloured(&img) >= 2, "two coloured curves expected");
    // Text is drawn (dark anti-aliased glyph pixels inside the caption band at the top).
    let dark = (0..640)
        .flat_map(|x| (0..40).map(move |y| (x, y)))
        .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
        .count();
    assert!(dark > 50, "caption text missing ({dark} dark pixels)");

    // The binary: one file per series; an empty file is an error naming it.
    let bin = env!("CARGO_BIN_EXE_m3d-plot");
    let out2 = dir.path().join("cli.png");
    let st = Command::new(bin)
        .arg(&out2)
        .arg(dir.path().join("a.jsonl"))
        .arg(dir.path().join("b.jsonl"))
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        image::open(&out2).unwrap().to_rgb8().dimensions(),
        (1000, 700)
    );
    std::fs::write(dir.path().join("empty.jsonl"), "").unwrap();
    let o = Command::new(bin)
        .arg(dir.path().join("x.png"))
        .arg(dir.path().join("empty.jsonl"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("empty.jsonl: no metrics lines"));
}
