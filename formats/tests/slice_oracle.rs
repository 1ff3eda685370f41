//! Slice decoding against `np.array(PIL.Image.open(p).convert("L"))`.

mod common;

use m3d_formats::slice::decode_slice;

/// JPEG must be bit-exact too: we decode with libjpeg-turbo's algorithms, as Pillow does. (With zune-jpeg it was
/// off by one grey level on 0.3-1.3 % of pixels.)
const JPEG_MAX_ABS_DIFF: u8 = 0;
const JPEG_MAX_DIFF_FRACTION: f64 = 0.0;

#[test]
fn slices_match_pillow() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::run_oracle("images_oracle.py", &["gen", d.to_str().unwrap()]);
    let rows = common::manifest(d);
    assert!(rows.len() >= 30);
    let mut worst_jpeg = 0u8;
    for row in rows {
        let (name, kind) = (&row[0], &row[1]);
        let (h, w): (usize, usize) = (row[2].parse().unwrap(), row[3].parse().unwrap());
        let want = std::fs::read(d.join(format!("{name}.bin"))).unwrap();
        let got = decode_slice(&d.join(name)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((got.height, got.width), (h, w), "{name}");
        match kind.as_str() {
            "png" => {
                if let Some(i) = (0..want.len()).find(|&i| got.pixels[i] != want[i]) {
                    panic!(
                        "{name} (PIL mode {}): pixel {i} ours {} Pillow {}",
                        row[4], got.pixels[i], want[i]
                    );
                }
            }
            "jpeg" => {
                let diff = got
                    .pixels
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| a.abs_diff(*b))
                    .max()
                    .unwrap();
                let n_diff = got.pixels.iter().zip(&want).filter(|(a, b)| a != b).count();
                eprintln!(
                    "{name}: max abs diff {diff}, {n_diff}/{} pixels differ",
                    want.len()
                );
                worst_jpeg = worst_jpeg.max(diff);
                assert!(
                    n_diff as f64 <= JPEG_MAX_DIFF_FRACTION * want.len() as f64,
                    "{name}: {n_diff} pixels differ from Pillow"
                );
            }
            other => panic!("unknown kind {other}"),
        }
    }
    eprintln!("JPEG worst max abs diff {worst_jpeg}");
    assert!(
        worst_jpeg <= JPEG_MAX_ABS_DIFF,
        "JPEG max abs diff {worst_jpeg}"
    );
}
