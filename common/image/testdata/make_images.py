"""Writes the images the image pipeline tests read, and torchvision's tensors
for them, into OUTDIR.

Usage: make_images.py OUTDIR

For every image: <name>.<ext> (the encoded file) and, for each preprocessing,
<name>.<spec>.f32 (3x224x224 little-endian float32, CHW, RGB) computed the way
a Python training or serving script does it: PIL decode, convert("RGB"),
torchvision Resize / CenterCrop / ToTensor / Normalize. manifest.tsv lists
name, file, and whether the reference applied the EXIF orientation.

The pictures are made here at test time: real photographs of clothing from
Debian's Fashion-MNIST (when installed) tiled into a mosaic, screenshots
Debian ships in its documentation (when present), and synthetic photo-like
scenes (smooth gradients, shapes, sensor-like noise) at camera sizes.
"""
import gzip
import io
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps
import torch
from torchvision import transforms

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
SPECS = {
    "crop": transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD)]),
    "stretch": transforms.Compose([
        transforms.Resize((224, 224)),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD)]),
}
FASHION = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
DEBIAN_PNGS = [
    "/usr/share/doc/libjs-rickshaw/examples/screenshots/colors.png",
    "/usr/share/doc/valgrind/html/images/dh-tree.png",
    "/usr/share/info/gnupg-module-overview.png",
]


def scene(rng, width, height):
    """A photo-like RGB scene: low-frequency colour fields, a few shapes with
    soft edges, and per-pixel noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        for _ in range(4):
            fx, fy = rng.uniform(0.5, 4.0, 2) * 2 * np.pi
            phase = rng.uniform(0, 2 * np.pi)
            img[..., c] += np.sin(fx * x / width + fy * y / height + phase)
    img = (img - img.min()) / (img.max() - img.min() + 1e-6) * 200 + 20
    pil = Image.fromarray(img.astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(12):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
    pil = pil.filter(ImageFilter.GaussianBlur(radius=1.2))
    arr = np.asarray(pil).astype(np.float32)
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def fashion_mosaic(cols, rows):
    with gzip.open(FASHION, "rb") as f:
        data = f.read()
    count = int.from_bytes(data[4:8], "big")
    images = np.frombuffer(data, np.uint8, offset=16).reshape(count, 28, 28)
    tiles = images[: cols * rows].reshape(rows, cols, 28, 28)
    mosaic = tiles.transpose(0, 2, 1, 3).reshape(rows * 28, cols * 28)
    return Image.fromarray(mosaic, "L")


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(20240601)
    entries = []  # (name, filename, exif_applied)

    def save(name, image, ext, exif_applied=False, **kw):
        path = os.path.join(out, f"{name}.{ext}")
        image.save(path, **kw)
        entries.append((name, f"{name}.{ext}", exif_applied))

    # Camera-sized and odd-sized photo-like scenes.
    for name, (w, h) in {
        "scene_1024x768": (1024, 768),
        "scene_2048x1536": (2048, 1536),
        "scene_500x375": (500, 375),
        "scene_333x500": (333, 500),
        "scene_257x301": (257, 301),
        "scene_180x120": (180, 120),
    }.items():
        save(name, scene(rng, w, h), "jpg", quality=92)
    save("scene_png_640x480", scene(rng, 640, 480), "png")
    save("scene_bmp_300x200", scene(rng, 300, 200), "bmp")
    save("scene_webp_400x300", scene(rng, 400, 300), "webp", lossless=True)

    # EXIF orientation 6 (rotate 90 clockwise to display).
    rotated = scene(rng, 800, 600)
    exif = rotated.getexif()
    exif[0x0112] = 6
    save("exif6_800x600", rotated, "jpg", exif_applied=True, quality=92,
         exif=exif.tobytes())

    # Grey and RGBA.
    grey = scene(rng, 400, 300).convert("L")
    save("grey_png_400x300", grey, "png")
    save("grey_jpg_400x300", grey, "jpg", quality=92)
    rgba = scene(rng, 300, 400).convert("RGBA")
    alpha = Image.fromarray(rng.integers(0, 256, (400, 300), dtype=np.uint8))
    rgba.putalpha(alpha)
    save("rgba_png_300x400", rgba, "png")

    # Real photographs: Fashion-MNIST, 24 x 18 tiles (672 x 504).
    if os.path.exists(FASHION):
        mosaic = fashion_mosaic(24, 18)
        save("fashion_png_672x504", mosaic, "png")
        save("fashion_jpg_672x504", mosaic, "jpg", quality=90)
    # Real screenshots Debian ships.
    for i, path in enumerate(p for p in DEBIAN_PNGS if os.path.exists(p)):
        with Image.open(path) as im:
            save(f"debian_png_{i}", im.convert("RGB"), "png")

    with open(os.path.join(out, "manifest.tsv"), "w") as manifest:
        for name, filename, exif_applied in entries:
            with Image.open(os.path.join(out, filename)) as im:
                im.load()
                if exif_applied:
                    im = ImageOps.exif_transpose(im)
                rgb = im.convert("RGB")
            for spec, transform in SPECS.items():
                tensor = transform(rgb).contiguous()
                assert tensor.shape == (3, 224, 224), tensor.shape
                tensor.numpy().astype("<f4").tofile(
                    os.path.join(out, f"{name}.{spec}.f32"))
            manifest.write(f"{name}\t{filename}\t{int(exif_applied)}\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
