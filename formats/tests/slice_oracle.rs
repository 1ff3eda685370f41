//! Slice decoding against `np.array(PIL.Image.open(p).convert("L"))`.

mod common;

use m3d_formats::slice::decode_slice;

/// JPEG is not bit-exact: `image` decodes with zune-jpeg, whose IDCT rounds differently from libjpeg-turbo's
/// in Pillow. Measured over the 16 JPEGs of this test (grey and colour, 4:4:4/4:2:2/4:2:0, baseline and
/// progressive, sizes not multiple of 8): the max abs difference is 1 grey level in every file, grey
/// included (so it comes from the IDCT, not the colour conversion), and 0.3% to 1.3% of the pixels of a file
/// differ. The bounds asserted are those observed: 1 grey level, and at most 2% of the pixels.
const JPEG_MAX_ABS_DIFF: u8 = 1;
const JPEG_MAX_DIFF_FRACTION: f64 = 0.02;

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
