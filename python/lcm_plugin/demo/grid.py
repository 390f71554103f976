"""The demo's PNG: one labelled row per sampler, one column per prompt, same noise down each column."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SCALE = 2  # 64x64 samples are shown at 128x128 (nearest) so shapes are easy to judge
LABEL_WIDTH = 190
HEADER_HEIGHT = 28


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def write_grid(path: Path, rows: list[tuple[str, np.ndarray]], column_titles: list[str]) -> Path:
    """rows: (label, uint8 images [C, H, W, 3]) with C == len(column_titles); writes and returns `path`."""
    from PIL import Image, ImageDraw

    columns = len(column_titles)
    height, width = rows[0][1].shape[1:3]
    cell_h, cell_w = height * SCALE, width * SCALE
    canvas = Image.new("RGB", (LABEL_WIDTH + columns * cell_w, HEADER_HEIGHT + len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    for column, title in enumerate(column_titles):
        draw.text((LABEL_WIDTH + column * cell_w + 4, 6), title, fill="black", font=font)
    for row, (label, images) in enumerate(rows):
        if len(images) != columns:
            raise ValueError(f"row {label!r} has {len(images)} images for {columns} columns")
        top = HEADER_HEIGHT + row * cell_h
        draw.text((8, top + cell_h // 2 - 8), label, fill="black", font=font)
        for column, image in enumerate(images):
            tile = Image.fromarray(image).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + column * cell_w, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
