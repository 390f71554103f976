"""lcm_plugin.demo.shapes: the generated dataset is what its captions say, deterministic, in SimpleTuner's layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lcm_plugin.demo import shapes


def _mask(image: np.ndarray) -> np.ndarray:
    return np.abs(image.astype(int) - np.array(shapes.BACKGROUND)).sum(axis=-1) > 60


@pytest.mark.parametrize("colour", list(shapes.COLOURS))
def test_render_paints_the_named_colour_on_the_background(colour):
    image = shapes.render(colour, "square", centre=(32, 32), radius=12)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[32, 32], shapes.COLOURS[colour])
    np.testing.assert_array_equal(image[2, 2], shapes.BACKGROUND)


def test_render_areas_match_geometry():
    # Circle pi r^2, square (2r)^2, triangle inscribed in the circle 3*sqrt(3)/4 r^2 (hand formulas).
    r = 14.0
    expected = {"circle": np.pi * r**2, "square": (2 * r) ** 2, "triangle": 3 * np.sqrt(3) / 4 * r**2}
    for shape, area in expected.items():
        painted = _mask(shapes.render("red", shape, centre=(32, 32), radius=r)).sum()
        assert abs(painted - area) / area < 0.06, (shape, painted, area)


def test_render_rejects_an_unknown_shape_naming_the_valid_ones():
    with pytest.raises(ValueError, match="circle, square, triangle"):
        shapes.render("red", "hexagon", centre=(32, 32), radius=10)


def test_sampled_layouts_keep_the_shape_inside_the_image():
    rng = np.random.default_rng(0)
    for _ in range(200):
        (x, y), r = shapes.sample_layout(rng)
        assert r < x < 64 - r and r < y < 64 - r


def test_sample_images_is_deterministic_and_covers_every_prompt():
    images, prompts = shapes.sample_images(240, seed=3)
    again, prompts_again = shapes.sample_images(240, seed=3)
    np.testing.assert_array_equal(images, again)
    assert prompts == prompts_again
    assert set(prompts) == set(shapes.PROMPTS)
    # The image agrees with its caption: the painted pixels have the named colour.
    for image, prompt in zip(images[:24], prompts[:24]):
        colour = prompt.split()[1]
        painted = image[_mask(image)]
        nearest = [min(shapes.COLOURS, key=lambda c: np.abs(np.array(shapes.COLOURS[c]) - p).sum()) for p in painted]
        assert max(set(nearest), key=nearest.count) == colour


def test_write_dataset_writes_png_with_textfile_captions(tmp_path):
    shapes.write_dataset(tmp_path, count=5, seed=0)
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 5
    _, prompts = shapes.sample_images(5, seed=0)
    for png, prompt in zip(pngs, prompts):
        assert Image.open(png).size == (64, 64)
        assert png.with_suffix(".txt").read_text().strip() == prompt


def test_vocabulary_makes_every_prompt_word_a_single_token(tmp_path):
    from transformers import CLIPTokenizer

    from lcm_plugin.tiny_sdxl import write_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path, shapes.VOCABULARY)))
    for prompt in shapes.PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert len(ids) == len(prompt.split()), (prompt, ids)
