"""Coloured shapes on a plain background: the demo's dataset and the teacher's training data.

Each image shows one shape of one colour at a random position and size; its caption is the prompt
that names both ("a red circle"). Everything is deterministic in the seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (30, 30, 36)
# Shapes are drawn this many times larger, then box-downsampled: smooth edges without a renderer.
_SUPERSAMPLE = 4


def prompt(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


PROMPTS: tuple[str, ...] = tuple(prompt(c, s) for c in COLOURS for s in SHAPES)
# Words the demo tokenizer keeps whole (one token each), so prompts differ in one token, not in bytes.
VOCABULARY: tuple[str, ...] = ("a", *COLOURS, *SHAPES)


def render(colour: str, shape: str, *, centre: tuple[float, float], radius: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image, uint8 [size, size, 3]. `centre` (x, y) and `radius` are in pixels of the output.

    The circle has radius `radius`, the square half-side `radius`, the upward triangle is inscribed
    in the circle.
    """
    from PIL import Image, ImageDraw

    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cx, cy, r = (v * _SUPERSAMPLE for v in (*centre, radius))
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + 0.866 * r, cy + 0.5 * r), (cx - 0.866 * r, cy + 0.5 * r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def sample_layout(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[tuple[float, float], float]:
    """A random (centre, radius) that keeps the whole shape inside the image."""
    radius = rng.uniform(0.16, 0.3) * size
    low, high = radius + 2, size - radius - 2
    return (float(rng.uniform(low, high)), float(rng.uniform(low, high))), float(radius)


def sample_images(count: int, seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str]]:
    """`count` random images, uint8 [count, size, size, 3], and their prompts (colour and shape uniform)."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    prompts = []
    for i in range(count):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        centre, radius = sample_layout(rng, size)
        images[i] = render(colour, shape, centre=centre, radius=radius, size=size)
        prompts.append(prompt(colour, shape))
    return images, prompts


def write_dataset(folder: Path, count: int, seed: int) -> Path:
    """Write `count` PNGs with same-named .txt captions (SimpleTuner's `textfile` strategy) to `folder`."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, prompts = sample_images(count, seed)
    for i, (image, text) in enumerate(zip(images, prompts)):
        Image.fromarray(image).save(folder / f"shape_{i:05d}.png")
        (folder / f"shape_{i:05d}.txt").write_text(text + "\n")
    return folder
