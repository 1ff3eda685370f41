//! Positioning targets from masks: the box `[d1, h1, w1, d2, h2, w2]` of a binary mask, each the min/max nonzero
//! index along an axis divided by that axis' size, rounded to 3 decimals (Python's `round`). Its text form is
//! `m3d_instruct::box_text`.

/// The box of a `D x H x W` mask, or None when it is empty.
pub fn mask_box(mask: &[u8], dims: [usize; 3]) -> Option<[f32; 6]> {
    let [d, h, w] = dims;
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    for z in 0..d {
        for y in 0..h {
            let row = &mask[(z * h + y) * w..(z * h + y + 1) * w];
            let (Some(first), Some(last)) = (
                row.iter().position(|&v| v != 0),
                row.iter().rposition(|&v| v != 0),
            ) else {
                continue;
            };
            lo = [lo[0].min(z), lo[1].min(y), lo[2].min(first)];
            hi = [hi[0].max(z), hi[1].max(y), hi[2].max(last)];
        }
    }
    if lo[0] == usize::MAX {
        return None;
    }
    let r = |i: usize, n: usize| round3(i as f64 / n as f64) as f32;
    Some([
        r(lo[0], d),
        r(lo[1], h),
        r(lo[2], w),
        r(hi[0], d),
        r(hi[1], h),
        r(hi[2], w),
    ])
}

/// Python's `round(x, 3)`: correctly rounded, ties to even on the exact binary value. Rust's formatting rounds
/// the exact value the same way, so going through the decimal string reproduces it.
pub fn round3(x: f64) -> f64 {
    format!("{x:.3}").parse().unwrap_or(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_of_a_block() {
        let dims = [4, 8, 10];
        let mut m = vec![0u8; 4 * 8 * 10];
        for z in 1..3 {
            for y in 2..5 {
                for x in 3..10 {
                    m[(z * 8 + y) * 10 + x] = 1;
                }
            }
        }
        let b = mask_box(&m, dims).unwrap();
        assert_eq!(b, [0.25, 0.25, 0.3, 0.5, 0.5, 0.9]);
        assert_eq!(mask_box(&vec![0u8; 4 * 8 * 10], dims), None);
    }

    #[test]
    fn rounds_like_python() {
        // Values checked with CPython: round(0.0625, 3) == 0.062 and round(0.5625, 3) == 0.562 (exact ties go to
        // even), round(7/32, 3) == 0.219, round(5/32, 3) == 0.156.
        assert_eq!(round3(1.0 / 16.0), 0.062);
        assert_eq!(round3(9.0 / 16.0), 0.562);
        assert_eq!(round3(7.0 / 32.0), 0.219);
        assert_eq!(round3(5.0 / 32.0), 0.156);
    }
}
