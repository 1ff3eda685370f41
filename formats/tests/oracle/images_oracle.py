"""Oracle for slice decoding: `gen DIR` writes PNG/JPEG files and, for each, the bytes of
np.array(PIL.Image.open(p).convert("L")) in `<name>.bin`. Manifest lines (tab separated): file name, kind
(png|jpeg), height, width, PIL mode on open.

PNG variants Pillow cannot write (16-bit RGB/RGBA/LA, 2/4-bit grey and palette, interlaced) are encoded
by a minimal PNG writer below, so each colour type / bit depth combination is covered."""
import io
import os
import struct
import sys
import zlib

import numpy as np
from PIL import Image


def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def pack_rows(samples, bit_depth):
    """samples: (H, W*channels) integer array -> list of packed row bytes (filter type 0)."""
    rows = []
    for r in samples:
        if bit_depth == 16:
            b = r.astype(">u2").tobytes()
        elif bit_depth == 8:
            b = r.astype(np.uint8).tobytes()
        else:
            per = 8 // bit_depth
            pad = (-len(r)) % per
            rr = np.concatenate([r, np.zeros(pad, dtype=r.dtype)]).reshape(-1, per)
            b = bytes(int(sum(int(v) << (8 - bit_depth * (i + 1)) for i, v in enumerate(g))) for g in rr)
        rows.append(b)
    return rows


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def write_png(path, samples, bit_depth, color_type, channels, palette=None, trns=None, interlace=False):
    h, wc = samples.shape
    w = wc // channels
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 1 if interlace else 0)
    raw = b""
    if not interlace:
        for row in pack_rows(samples, bit_depth):
            raw += b"\x00" + row
    else:
        px = samples.reshape(h, w, channels)
        for x0, y0, dx, dy in ADAM7:
            sub = px[y0::dy, x0::dx]
            if sub.size == 0:
                continue
            for row in pack_rows(sub.reshape(sub.shape[0], -1), bit_depth):
                raw += b"\x00" + row
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    if palette is not None:
        data += chunk(b"PLTE", bytes(palette))
    if trns is not None:
        data += chunk(b"tRNS", trns)
    data += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(data)


def smooth_rgb(rng, h, w):
    """A photo-like image (gradients plus noise) so JPEG differences are representative."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 7.0), 128 + 100 * np.cos(yy / 5.0), (xx + yy) * 255.0 / (h + w)], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def gen(d):
    rng = np.random.default_rng(99)
    lines = []
    files = []
    h, w = 13, 17
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    grey = rng.integers(0, 256, (h, w), dtype=np.uint8)
    la = rng.integers(0, 256, (h, w, 2), dtype=np.uint8)

    # Pillow-written PNGs.
    Image.fromarray(grey, "L").save(os.path.join(d, "l.png")); files.append(("l.png", "png"))
    Image.fromarray(rgb, "RGB").save(os.path.join(d, "rgb.png")); files.append(("rgb.png", "png"))
    Image.fromarray(rgba, "RGBA").save(os.path.join(d, "rgba.png")); files.append(("rgba.png", "png"))
    Image.fromarray(la, "LA").save(os.path.join(d, "la.png")); files.append(("la.png", "png"))
    Image.fromarray(rgb, "RGB").quantize(colors=50).save(os.path.join(d, "p.png")); files.append(("p.png", "png"))
    pt = Image.fromarray(rgb, "RGB").quantize(colors=20)
    pt.save(os.path.join(d, "p_trns.png"), transparency=3); files.append(("p_trns.png", "png"))
    g16 = rng.integers(0, 65536, (h, w)).astype(np.uint16)
    g16[:3] = rng.integers(0, 300, (3, w))  # values around the 255 clipping point
    Image.fromarray(g16).save(os.path.join(d, "i16.png")); files.append(("i16.png", "png"))
    Image.fromarray(grey > 127).save(os.path.join(d, "bw1.png")); files.append(("bw1.png", "png"))

    # Hand-encoded PNGs.
    s16 = lambda c: rng.integers(0, 65536, (h, w * c))
    write_png(os.path.join(d, "rgb16.png"), s16(3), 16, 2, 3); files.append(("rgb16.png", "png"))
    write_png(os.path.join(d, "rgba16.png"), s16(4), 16, 6, 4); files.append(("rgba16.png", "png"))
    write_png(os.path.join(d, "la16.png"), s16(2), 16, 4, 2); files.append(("la16.png", "png"))
    write_png(os.path.join(d, "g16_trns.png"), g16.astype(np.int64), 16, 0, 1, trns=struct.pack(">H", 5))
    files.append(("g16_trns.png", "png"))
    write_png(os.path.join(d, "rgb_trns.png"), rgb.reshape(h, -1), 8, 2, 3, trns=struct.pack(">HHH", 1, 2, 3))
    files.append(("rgb_trns.png", "png"))
    for bd in (1, 2, 4):
        write_png(os.path.join(d, f"g{bd}.png"), rng.integers(0, 2**bd, (h, w)), bd, 0, 1)
        files.append((f"g{bd}.png", "png"))
        pal = rng.integers(0, 256, 3 * 2**bd).tolist()
        write_png(os.path.join(d, f"p{bd}.png"), rng.integers(0, 2**bd, (h, w)), bd, 3, 1, palette=pal)
        files.append((f"p{bd}.png", "png"))
    write_png(os.path.join(d, "rgb_interlaced.png"), rgb.reshape(h, -1), 8, 2, 3, interlace=True)
    files.append(("rgb_interlaced.png", "png"))
    write_png(os.path.join(d, "g4_interlaced.png"), rng.integers(0, 16, (h, w)), 4, 0, 1, interlace=True)
    files.append(("g4_interlaced.png", "png"))

    # JPEGs: grey and colour, several sizes and chroma subsamplings, baseline and progressive.
    for (jh, jw) in [(64, 64), (37, 53), (256, 200)]:
        photo = smooth_rgb(rng, jh, jw)
        tag = f"{jh}x{jw}"
        Image.fromarray(photo).convert("L").save(os.path.join(d, f"grey_{tag}.jpg"), quality=90)
        files.append((f"grey_{tag}.jpg", "jpeg"))
        for sub in (0, 1, 2):
            name = f"rgb_{tag}_sub{sub}.jpg"
            Image.fromarray(photo).save(os.path.join(d, name), quality=85, subsampling=sub)
            files.append((name, "jpeg"))
        name = f"rgb_{tag}_prog.jpg"
        Image.fromarray(photo).save(os.path.join(d, name), quality=75, progressive=True)
        files.append((name, "jpeg"))
    # A JPEG with a .png name: Pillow (and we) go by content.
    Image.fromarray(smooth_rgb(rng, 32, 32)).save(os.path.join(d, "really_jpeg.png"), format="JPEG")
    files.append(("really_jpeg.png", "jpeg"))

    for name, kind in files:
        im = Image.open(os.path.join(d, name))
        mode = im.mode
        arr = np.array(im.convert("L"))
        assert arr.dtype == np.uint8 and arr.ndim == 2
        arr.tofile(os.path.join(d, name + ".bin"))
        lines.append("\t".join([name, kind, str(arr.shape[0]), str(arr.shape[1]), mode]))
    with open(os.path.join(d, "manifest.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    {"gen": gen}[sys.argv[1]](sys.argv[2])
