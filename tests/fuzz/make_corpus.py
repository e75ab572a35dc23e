"""Writes the seed corpus for image_fuzz into OUTDIR: small real encodings of
every supported format and flavour (baseline and progressive JPEG, EXIF
rotation, grey, RGBA, 16-bit and palette PNG, lossy and lossless WebP, 8- and
24-bit BMP), each also cut short at several points, plus files whose headers
lie (huge declared sizes, zero sizes).

Usage: make_corpus.py OUTDIR
"""
import io
import os
import struct
import sys
import zlib

import numpy as np
from PIL import Image


def picture(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)),
                     ((x + y) * 127 // max(w + h - 2, 1))], -1)
    noise = rng.integers(0, 30, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def encoded(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png_declaring(w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    pic = picture(48, 32, 1)
    exif = pic.getexif()
    exif[0x0112] = 6
    seeds = {
        "baseline.jpg": encoded(pic, "JPEG", quality=80),
        "progressive.jpg": encoded(pic, "JPEG", quality=80, progressive=True),
        "exif6.jpg": encoded(pic, "JPEG", exif=exif.tobytes()),
        "grey.jpg": encoded(pic.convert("L"), "JPEG"),
        "cmyk.jpg": encoded(pic.convert("CMYK"), "JPEG"),
        "rgb.png": encoded(pic, "PNG"),
        "grey.png": encoded(pic.convert("L"), "PNG"),
        "rgba.png": encoded(pic.convert("RGBA"), "PNG"),
        "palette.png": encoded(pic.convert("P"), "PNG"),
        "deep.png": encoded(Image.fromarray(
            (np.asarray(pic.convert("L")).astype(np.uint16) * 257)), "PNG"),
        "optimized.png": encoded(pic, "PNG", optimize=True),
        "lossy.webp": encoded(pic, "WEBP", quality=70),
        "lossless.webp": encoded(pic, "WEBP", lossless=True),
        "rgba.webp": encoded(pic.convert("RGBA"), "WEBP", lossless=True),
        "rgb.bmp": encoded(pic, "BMP"),
        "palette.bmp": encoded(pic.convert("P"), "BMP"),
        "bomb.png": png_declaring(100000, 100000),
        "zero.png": png_declaring(0, 10),
        "tiny.png": encoded(picture(1, 1, 2), "PNG"),
    }
    for name, data in list(seeds.items()):
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        for frac in (0.1, 0.5, 0.9):
            cut = max(1, int(len(data) * frac))
            with open(os.path.join(out, f"{name}.cut{int(frac * 100)}"), "wb") as f:
                f.write(data[:cut])
    print(f"{len(os.listdir(out))} seed files in {out}")


if __name__ == "__main__":
    main()
