"""Photo-like JPEG datasets generated in code: what a resize filter sees in real photos, at test sizes.

Each image has a smooth sky-like gradient, a band of fine texture (where aliasing of a resize without
antialiasing shows), hard-edged shapes and mild sensor noise, saved as JPEG quality 90 with a textfile caption.
The same arguments always give the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (200, 50, 40), "blue": (40, 70, 200), "green": (50, 150, 60), "yellow": (220, 200, 60)}
SHAPES = ("circle", "square")
VOCABULARY = (*COLOURS, *SHAPES, "photo")


def photo(width: int, height: int, seed: int) -> tuple[Image.Image, str]:
    """One photo-like RGB image and its caption ("<colour> <shape> photo")."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    # Sky: a smooth vertical gradient with a soft horizontal tint.
    top, bottom = rng.uniform(60, 220, 3), rng.uniform(20, 160, 3)
    rgb = top * (1 - v[..., None]) + bottom * v[..., None] + 20 * np.sin(np.pi * u)[..., None]
    # Ground: fine texture (periods of 2-6 px) below a horizon line.
    horizon = height * rng.uniform(0.45, 0.7)
    frequency = rng.uniform(1.0, 3.0, 2)
    texture = 35 * np.sin(x * frequency[0] + 0.7 * y) * np.sin(y * frequency[1] - 0.3 * x)
    ground = rng.uniform(60, 140, 3) + texture[..., None]
    rgb = np.where((y > horizon)[..., None], ground, rgb)
    rgb += rng.normal(0, 3, rgb.shape)  # sensor noise
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    # Hard edges: the captioned shape, plus a dark pole across the horizon.
    colour = list(COLOURS)[seed % len(COLOURS)]
    shape = SHAPES[(seed // len(COLOURS)) % len(SHAPES)]
    draw = ImageDraw.Draw(image)
    r = min(width, height) * rng.uniform(0.15, 0.3)
    cx, cy = width * rng.uniform(0.3, 0.7), height * rng.uniform(0.3, 0.7)
    (draw.ellipse if shape == "circle" else draw.rectangle)((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    pole = width * rng.uniform(0.05, 0.95)
    draw.rectangle((pole, height * 0.2, pole + max(2, width // 60), height), fill=(30, 25, 20))
    return image, f"{colour} {shape} photo"


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_photo_dataset(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    """`photo<i>.jpg` + `photo<i>.txt` for each (width, height) in `sizes`; returns the image paths."""
    folder.mkdir(parents=True)
    paths = []
    for index, (width, height) in enumerate(sizes):
        image, caption = photo(width, height, seed + index)
        path = folder / f"photo{index:02d}.jpg"
        path.write_bytes(jpeg_bytes(image))
        path.with_suffix(".txt").write_text(caption)
        paths.append(path)
    return paths
