//! Slice decoding against `np.array(PIL.Image.open(p).convert("L"))`.

mod common;

use m3d_formats::slice::decode_slice;

/// Both formats must be bit-exact: PNG by construction, JPEG because we decode with libjpeg-turbo's algorithms as
/// Pillow does. (With the pure-Rust zune-jpeg it was off by one grey level on 0.3-1.3 % of pixels.)
#[test]
fn slices_match_pillow() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::run_oracle("images_oracle.py", &["gen", d.to_str().unwrap()]);
    let rows = common::manifest(d);
    assert!(rows.len() >= 30);
    for row in rows {
        let (name, kind) = (&row[0], &row[1]);
        let (h, w): (usize, usize) = (row[2].parse().unwrap(), row[3].parse().unwrap());
        let want = std::fs::read(d.join(format!("{name}.bin"))).unwrap();
        let got = decode_slice(&d.join(name)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((got.height, got.width), (h, w), "{name}");
        assert!(kind == "png" || kind == "jpeg", "unknown kind {kind}");
        if let Some(i) = (0..want.len()).find(|&i| got.pixels[i] != want[i]) {
            panic!(
                "{name} ({kind}, PIL mode {}): pixel {i} ours {} Pillow {}",
                row[4], got.pixels[i], want[i]
            );
        }
    }
}
