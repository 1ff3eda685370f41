//! A run's outputs in a store (here `file://`; the end-to-end test runs the same code against S3): metrics
//! kept in parts, uploaded at the flush interval, cut back on a resume; `final/` uploaded with its commit
//! record last and checked when read; plots read from and written to store URLs.

use std::path::Path;
use std::time::Duration;

use m3d_runs::metrics::MetricsLine;
use m3d_runs::output::{
    get_final_file, part_key, read_run_metrics, upload_final, RunDir, StoreMetrics,
};
use m3d_runs::plot::{plot_inputs, PlotSize};
use m3d_store::Store;

const NEVER: Duration = Duration::from_secs(3600);

fn url_of(p: &Path) -> String {
    format!("file://{}", p.display())
}

fn line(step: u64) -> MetricsLine {
    MetricsLine::new(step, 10.0 / step as f64, 1e-3)
}

fn steps(url: &str) -> Vec<u64> {
    read_run_metrics(url)
        .unwrap()
        .1
        .iter()
        .map(|l| l.step)
        .collect()
}

fn parts(store: &Store) -> Vec<String> {
    store
        .list("metrics")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

#[test]
fn metrics_parts_flush_roll_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let url = url_of(&dir.path().join("run"));
    let store = Store::open(&url).unwrap();

    let mut w = StoreMetrics::open(store.clone(), 0, NEVER, 4).unwrap();
    for s in 1..=3 {
        w.write(&line(s)).unwrap();
    }
    assert!(
        parts(&store).is_empty(),
        "nothing uploaded before the interval"
    );
    w.flush().unwrap();
    assert_eq!(steps(&url), [1, 2, 3]);
    for s in 4..=9 {
        w.write(&line(s)).unwrap();
    }
    // Full parts are uploaded as they fill; the open part waits for the interval.
    assert_eq!(parts(&store), [part_key(0), part_key(1)]);
    assert_eq!(steps(&url), (1..=8).collect::<Vec<_>>());
    drop(w);
    assert_eq!(steps(&url), (1..=9).collect::<Vec<_>>(), "dropping flushes");
    let (label, _) = read_run_metrics(&url).unwrap();
    assert_eq!(label, "run");

    // A round resuming at step 5: part 1 is cut after step 5 and reopened, part 2 deleted.
    let mut w = StoreMetrics::open(store.clone(), 5, Duration::ZERO, 4).unwrap();
    assert_eq!(steps(&url), [1, 2, 3, 4, 5]);
    assert_eq!(parts(&store), [part_key(0), part_key(1)]);
    for s in 6..=7 {
        w.write(&line(s)).unwrap();
        // A zero interval uploads every line at once.
        assert_eq!(steps(&url).last(), Some(&s));
    }
    drop(w);

    // Resuming at a part boundary empties (deletes) the part after it; the next line starts it again.
    let mut w = StoreMetrics::open(store.clone(), 4, Duration::ZERO, 4).unwrap();
    assert_eq!(parts(&store), [part_key(0)]);
    w.write(&line(5)).unwrap();
    assert_eq!(parts(&store), [part_key(0), part_key(1)]);
    drop(w);

    // Resuming after every line keeps everything, reading only the last part; a full last part is not
    // reopened.
    let (logged, reads) = Store::open(&url).unwrap().with_io_log();
    let mut w = StoreMetrics::open(logged, 100, Duration::ZERO, 1).unwrap();
    assert_eq!(reads.totals(&part_key(0)).0, 0, "{:?}", reads.events());
    assert_eq!(reads.totals(&part_key(1)).0, 1, "{:?}", reads.events());
    assert_eq!(steps(&url), [1, 2, 3, 4, 5]);
    w.write(&line(6)).unwrap();
    assert_eq!(parts(&store), [part_key(0), part_key(1), part_key(2)]);
    assert_eq!(steps(&url), [1, 2, 3, 4, 5, 6]);
    drop(w);

    // The same through RunDir (as rank 0 opens it), and a local run folder keeps metrics.jsonl.
    let mut m = RunDir::of(&url).open_metrics(2, NEVER).unwrap();
    m.write(&line(3)).unwrap();
    m.flush().unwrap();
    assert_eq!(steps(&url), [1, 2, 3]);
    let local = dir.path().join("local");
    let mut m = RunDir::of(local.to_str().unwrap())
        .open_metrics(0, NEVER)
        .unwrap();
    m.write(&line(1)).unwrap();
    assert!(local.join("metrics.jsonl").is_file());
    assert_eq!(steps(local.to_str().unwrap()), [1]);
}

#[test]
fn final_folder_is_complete_only_with_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("final");
    std::fs::create_dir_all(src.join("adapter")).unwrap();
    std::fs::write(src.join("tokenizer.json"), b"{}").unwrap();
    std::fs::write(src.join("adapter/adapter_config.json"), b"{\"r\":4}").unwrap();
    let run = url_of(&dir.path().join("run"));
    let store = Store::open(&run).unwrap();
    // A leftover of an earlier final/ is not part of the new one.
    store.put("final/stale.bin", "old".into()).unwrap();
    // The weights come from memory in several buffers, the rest from the folder.
    let weights = vec![(
        "model.safetensors".to_string(),
        vec!["wei".into(), "ghts".into()],
    )];
    let record = upload_final(&run, &src, weights, 12).unwrap();
    assert_eq!(record.files["model.safetensors"].bytes, 7);
    assert_eq!(record.step, 12);
    assert_eq!(
        record.files.keys().collect::<Vec<_>>(),
        [
            "adapter/adapter_config.json",
            "model.safetensors",
            "tokenizer.json"
        ]
    );
    assert_eq!(store.get_opt("final/stale.bin").unwrap(), None);

    let fin = Store::open(&format!("{run}/final")).unwrap();
    assert_eq!(
        get_final_file(&fin, "model.safetensors")
            .unwrap()
            .as_deref(),
        Some(&b"weights"[..])
    );
    assert_eq!(get_final_file(&fin, "config.json").unwrap(), None);
    // A file that does not match the record is named.
    fin.put("tokenizer.json", "{ }".into()).unwrap();
    let e = get_final_file(&fin, "tokenizer.json").unwrap_err();
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
    assert!(e.to_string().contains("COMMIT says 2 bytes"), "{e}");
    // Without its record a run's final/ is incomplete; another folder of weights is read as it is.
    fin.delete("COMMIT").unwrap();
    let e = get_final_file(&fin, "model.safetensors").unwrap_err();
    assert!(e.to_string().contains("incomplete"), "{e}");
    let other = Store::open(&url_of(&dir.path().join("weights"))).unwrap();
    other.put("model.safetensors", "w".into()).unwrap();
    assert!(get_final_file(&other, "model.safetensors")
        .unwrap()
        .is_some());
}

#[test]
fn plots_read_and_write_store_urls() {
    let dir = tempfile::tempdir().unwrap();
    let run = url_of(&dir.path().join("runs/clip"));
    let mut w = StoreMetrics::open(Store::open(&run).unwrap(), 0, Duration::ZERO, 3).unwrap();
    for s in 1..=7 {
        w.write(&line(s)).unwrap();
    }
    drop(w);
    let out = url_of(&dir.path().join("plots/loss.png"));
    plot_inputs(std::slice::from_ref(&run), &out, PlotSize::default()).unwrap();
    let img = image::open(dir.path().join("plots/loss.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(img.dimensions(), (1000, 700));
    // A local run folder written through file:// (metrics parts, no metrics.jsonl) reads the same.
    let local_out = dir.path().join("local.png");
    plot_inputs(
        &[dir.path().join("runs/clip").display().to_string()],
        local_out.to_str().unwrap(),
        PlotSize::default(),
    )
    .unwrap();
    assert!(local_out.is_file());
    // A run without metrics is an error naming it.
    std::fs::create_dir_all(dir.path().join("runs/empty")).unwrap();
    let empty = url_of(&dir.path().join("runs/empty"));
    let e = plot_inputs(std::slice::from_ref(&empty), &out, PlotSize::default()).unwrap_err();
    assert!(e.to_string().contains("no metrics lines"), "{e}");
    // A run folder that does not exist is named, not created.
    let missing = url_of(&dir.path().join("runs/missing"));
    let e = plot_inputs(std::slice::from_ref(&missing), &out, PlotSize::default()).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert!(!dir.path().join("runs/missing").exists());
}
