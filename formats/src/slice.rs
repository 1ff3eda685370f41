//! Decoding of M3D-Cap slice images (PNG/JPEG) to 8-bit grey exactly as
//! `np.array(PIL.Image.open(p).convert("L"))` does. The format is detected from the content, not the file
//! name (the dataset has JPEGs named `.png` and vice versa, which Pillow handles the same way).
//!
//! Pillow's rules, reproduced here (and checked against Pillow by the oracle tests):
//! * colour to grey: `L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16` (ITU-R 601-2 in 16-bit fixed point);
//!   alpha and `tRNS` transparency are ignored; palette images go through their palette;
//! * 16-bit grey PNG opens as mode `I;16` and converts to `L` by clipping at 255 (not scaling);
//! * 16-bit RGB/RGBA/LA PNG open as 8-bit modes keeping the most significant byte of each sample;
//! * 1/2/4-bit grey PNG are scaled to 0..255 (`v * 255 / (2^bits - 1)`).
//!
//! PNG is decoded with the `png` crate without transformations so that these rules see the stored samples.
//! JPEG is decoded with libjpeg-turbo's algorithms (the `mozjpeg` crate builds that code base from source, with
//! its SIMD kernels where `nasm` was found at build time), the same integer IDCT and fancy upsampling as Pillow's
//! libjpeg-turbo: the result is bit-exact (pure-Rust decoders round their IDCT differently and were off by one
//! grey level on about 1 % of pixels).
//!
//! [`decode_slice_append`] decodes into the caller's series stack (8-bit grey PNG and JPEG rows are decoded in
//! place) with buffers reused across slices; [`decode_slice`] is its allocating form.

use std::io::Cursor;
use std::path::Path;

use crate::error::FormatError;

/// An 8-bit grey image, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GreySlice {
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<u8>,
}

fn ierr(path: &Path, reason: impl Into<String>) -> FormatError {
    FormatError::Image {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Pillow's RGB -> L rule (`L24` in Pillow's `Convert.c`).
#[inline]
pub fn luma_pil(r: u8, g: u8, b: u8) -> u8 {
    ((u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16) as u8
}

/// Reads and decodes a slice file.
pub fn decode_slice(path: &Path) -> Result<GreySlice, FormatError> {
    let mut pixels = Vec::new();
    let (height, width) = decode_slice_append(path, &mut SliceScratch::default(), &mut pixels)?;
    Ok(GreySlice {
        height,
        width,
        pixels,
    })
}

/// Decodes a PNG or JPEG held in memory; `name` is used only in error messages.
pub fn decode_slice_bytes(bytes: &[u8], name: &Path) -> Result<GreySlice, FormatError> {
    let mut pixels = Vec::new();
    let (height, width) = decode_slice_bytes_append(bytes, name, &mut Vec::new(), &mut pixels)?;
    Ok(GreySlice {
        height,
        width,
        pixels,
    })
}

/// Buffers [`decode_slice_append`] reuses from one slice to the next (the file's bytes and the decoder's
/// colour rows), so that decoding a series allocates (and page-faults) nothing per slice.
#[derive(Debug, Default)]
pub struct SliceScratch {
    file: Vec<u8>,
    rows: Vec<u8>,
}

/// Reads and decodes the slice at `path`, appending its `height * width` grey pixels to `out` (a series'
/// stack, decoded in place); returns `(height, width)`. On error `out` is left as it was.
pub fn decode_slice_append(
    path: &Path,
    scratch: &mut SliceScratch,
    out: &mut Vec<u8>,
) -> Result<(usize, usize), FormatError> {
    use std::io::Read;
    scratch.file.clear();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut scratch.file))
        .map_err(|e| FormatError::io(path, e))?;
    decode_slice_bytes_append(&scratch.file, path, &mut scratch.rows, out)
}

/// [`decode_slice_append`] for a PNG or JPEG held in memory (`rows`: a reusable buffer); `name` is used only
/// in error messages.
pub fn decode_slice_bytes_append(
    bytes: &[u8],
    name: &Path,
    rows: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<(usize, usize), FormatError> {
    let start = out.len();
    let decoded = if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        decode_png(bytes, name, rows, out)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        decode_jpeg(bytes, name, rows, out)
    } else {
        Err(ierr(
            name,
            "neither a PNG nor a JPEG (unrecognised signature)",
        ))
    };
    match decoded {
        Ok((h, w)) if out.len() - start == h * w => Ok((h, w)),
        Ok(_) => {
            out.truncate(start);
            Err(ierr(name, "decoded data does not match the image size"))
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

fn decode_png(
    bytes: &[u8],
    name: &Path,
    buf: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<(usize, usize), FormatError> {
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder
        .read_info()
        .map_err(|e| ierr(name, format!("PNG: {e}")))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| ierr(name, "PNG: image too large"))?;
    let (w, h) = {
        let info = reader.info();
        (info.width as usize, info.height as usize)
    };
    use png::ColorType as C;
    // 8-bit grey rows are the pixels: decode them straight into the stack.
    if reader.output_color_type() == (C::Grayscale, png::BitDepth::Eight) && size == w * h {
        let start = out.len();
        out.resize(start + size, 0);
        reader
            .next_frame(&mut out[start..])
            .map_err(|e| ierr(name, format!("PNG: {e}")))?;
        return Ok((h, w));
    }
    buf.clear();
    buf.resize(size, 0);
    let info = reader
        .next_frame(buf)
        .map_err(|e| ierr(name, format!("PNG: {e}")))?;
    let bits = info.bit_depth as u8;
    let line = info.line_size;
    let palette = reader.info().palette.as_deref();
    out.reserve(w * h);
    for row in buf.chunks_exact(line).take(h) {
        match (info.color_type, bits) {
            (C::Grayscale, 16) => {
                out.extend(
                    row.chunks_exact(2)
                        .take(w)
                        .map(|s| if s[0] != 0 { 255 } else { s[1] }),
                )
            }
            (C::Grayscale, 8) => out.extend_from_slice(&row[..w]),
            (C::Grayscale, b) => {
                let max = (1u16 << b) - 1;
                out.extend(unpack_bits(row, b, w).map(|v| (u16::from(v) * 255 / max) as u8));
            }
            (C::Indexed, b) => {
                let pal = palette.ok_or_else(|| ierr(name, "PNG: palette image without PLTE"))?;
                for idx in unpack_bits(row, b, w) {
                    let i = usize::from(idx) * 3;
                    // Pillow pads a short palette with black.
                    let px = pal.get(i..i + 3).map_or(0, |p| luma_pil(p[0], p[1], p[2]));
                    out.push(px);
                }
            }
            (ct, b) => {
                let channels = match ct {
                    C::Rgb => 3,
                    C::Rgba => 4,
                    C::GrayscaleAlpha => 2,
                    _ => return Err(ierr(name, format!("PNG: unsupported colour type {ct:?}"))),
                };
                let bytes_per_sample = usize::from(b / 8);
                // For 16-bit samples (big-endian) the first byte is the most significant one.
                let step = channels * bytes_per_sample;
                if channels == 3 && bytes_per_sample == 1 {
                    out.extend(
                        row.chunks_exact(3)
                            .take(w)
                            .map(|p| luma_pil(p[0], p[1], p[2])),
                    );
                    continue;
                }
                for px in row.chunks_exact(step).take(w) {
                    let s = |k: usize| px[k * bytes_per_sample];
                    out.push(if channels == 2 {
                        s(0)
                    } else {
                        luma_pil(s(0), s(1), s(2))
                    });
                }
            }
        }
    }
    Ok((h, w))
}

/// Samples of a row packed at `bits` (1, 2, 4 or 8) per sample, most significant bits first.
fn unpack_bits(row: &[u8], bits: u8, width: usize) -> impl Iterator<Item = u8> + '_ {
    let per_byte = 8 / usize::from(bits.max(1));
    let mask = ((1u16 << bits) - 1) as u8;
    (0..width).map(move |x| {
        let byte = row[x / per_byte];
        let shift = 8 - usize::from(bits) * (x % per_byte + 1);
        (byte >> shift) & mask
    })
}

/// True when an end-of-image marker follows the last start-of-scan marker. Entropy-coded data stuffs every
/// 0xFF with 0x00, so a literal FF D9 after the last FF DA is the real end marker. zune-jpeg pads a
/// truncated scan with grey where Pillow raises "image file is truncated"; this check restores the error.
fn jpeg_has_eoi(bytes: &[u8]) -> bool {
    let last_sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_sos {
        Some(p) => bytes[p..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => false,
    }
}

fn decode_jpeg(
    bytes: &[u8],
    name: &Path,
    rgb: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<(usize, usize), FormatError> {
    if !jpeg_has_eoi(bytes) {
        return Err(ierr(
            name,
            "JPEG: truncated (no end-of-image marker after the last scan)",
        ));
    }
    // libjpeg reports fatal errors by unwinding through the mozjpeg wrapper; catch it and name the file.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
        || -> std::io::Result<(usize, usize)> {
            let d = mozjpeg::Decompress::new_mem(bytes)?;
            let grey = d.color_space() == mozjpeg::ColorSpace::JCS_GRAYSCALE;
            let supported = grey
                || matches!(
                    d.color_space(),
                    mozjpeg::ColorSpace::JCS_YCbCr | mozjpeg::ColorSpace::JCS_RGB
                );
            if !supported {
                return Err(std::io::Error::other(format!(
                    "unsupported colour space {:?}",
                    d.color_space()
                )));
            }
            // Pillow opens YCbCr/RGB JPEGs as RGB and then applies its own luma rule; grey ones stay grey.
            let mut started = if grey { d.grayscale()? } else { d.rgb()? };
            let (w, h) = (started.width(), started.height());
            if grey {
                // Grey scanlines are the pixels: decode them straight into the stack.
                let start = out.len();
                out.resize(start + w * h, 0);
                started.read_scanlines_into(&mut out[start..])?;
            } else {
                rgb.clear();
                rgb.resize(w * h * 3, 0);
                started.read_scanlines_into(&mut rgb[..])?;
                out.extend(rgb.chunks_exact(3).map(|p| luma_pil(p[0], p[1], p[2])));
            }
            started.finish()?;
            Ok((h, w))
        },
    ));
    match decoded {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ierr(name, format!("JPEG: {e}"))),
        Err(_) => Err(ierr(name, "JPEG: corrupt data (libjpeg error)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luma_matches_pillow_formula_extremes() {
        assert_eq!(luma_pil(255, 255, 255), 255);
        assert_eq!(luma_pil(0, 0, 0), 0);
        // Grey stays grey: the weights sum to 65536.
        for g in 0..=255u8 {
            assert_eq!(luma_pil(g, g, g), g);
        }
    }

    fn png_bytes(w: u32, h: u32, colour: png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(colour);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().unwrap();
        writer.write_image_data(data).unwrap();
        writer.finish().unwrap();
        out
    }

    #[test]
    fn slices_append_to_the_stack_and_a_bad_one_leaves_it_unchanged() {
        let name = Path::new("s.png");
        let grey = png_bytes(3, 2, png::ColorType::Grayscale, &[0, 1, 2, 3, 4, 255]);
        let rgb_px = [10u8, 20, 30, 200, 100, 50];
        let rgb = png_bytes(2, 1, png::ColorType::Rgb, &rgb_px);
        let (mut rows, mut stack) = (Vec::new(), vec![7u8]);
        assert_eq!(
            decode_slice_bytes_append(&grey, name, &mut rows, &mut stack).unwrap(),
            (2, 3)
        );
        assert_eq!(
            decode_slice_bytes_append(&rgb, name, &mut rows, &mut stack).unwrap(),
            (1, 2)
        );
        let want = [
            7,
            0,
            1,
            2,
            3,
            4,
            255,
            luma_pil(10, 20, 30),
            luma_pil(200, 100, 50),
        ];
        assert_eq!(stack, want);
        // The allocating form gives the same pixels.
        assert_eq!(decode_slice_bytes(&rgb, name).unwrap().pixels, want[7..]);
        // A truncated PNG and an unknown format fail, naming the file, and leave the stack as it was.
        for bad in [&grey[..grey.len() - 20], b"GIF89a".as_slice()] {
            let err = decode_slice_bytes_append(bad, name, &mut rows, &mut stack).unwrap_err();
            assert!(err.to_string().contains("s.png"), "{err}");
            assert_eq!(stack, want);
        }
    }

    #[test]
    fn unpacks_low_bit_rows() {
        let v: Vec<u8> = unpack_bits(&[0b1011_0001], 2, 4).collect();
        assert_eq!(v, vec![2, 3, 0, 1]);
        let v: Vec<u8> = unpack_bits(&[0b1000_0000, 0b0100_0000], 1, 10).collect();
        assert_eq!(v, vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    }
}
