//! Slice decoding alone, to measure its share of `m3d data-prep cap`: decodes every `.png` / `.jpeg` slice of
//! the given series folders to 8-bit grey on one thread, as the converter does (each series into one stack
//! buffer, reusing the file and row buffers), and reports the time.
//! Used by bench/data_prep.py (the reference side times Pillow's `convert("L")` over the same files).
//!
//! Usage: decode_bench <series dir>... ; prints one JSON line: {"slices": .., "seconds": .., "pixels": ..}.

use std::path::PathBuf;
use std::time::Instant;

use m3d_formats::slice::{decode_slice_append, SliceScratch};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut series: Vec<Vec<PathBuf>> = Vec::new();
    for dir in std::env::args().skip(1) {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
            let path = entry?.path();
            let name = path.to_string_lossy();
            if name.ends_with(".png") || name.ends_with(".jpeg") {
                files.push(path);
            }
        }
        series.push(files);
    }
    let start = Instant::now();
    let (mut pixels, mut slices) = (0usize, 0usize);
    let mut scratch = SliceScratch::default();
    for files in &series {
        let mut stack = Vec::new();
        for path in files {
            decode_slice_append(path, &mut scratch, &mut stack)?;
        }
        pixels += std::hint::black_box(&stack).len();
        slices += files.len();
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{{\"slices\": {}, \"seconds\": {seconds}, \"pixels\": {pixels}}}",
        slices
    );
    Ok(())
}
