"""The shipped demo teacher: small enough to ship, a VAE that reconstructs shapes, a UNet that follows prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcm_plugin.demo import run, sampling, shapes


@pytest.fixture(scope="module")
def teacher():
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(0)
    return StableDiffusionXLPipeline.from_pretrained(str(run.TEACHER_DIR))


def _nearest_colour(pixels: np.ndarray) -> str:
    names = list(shapes.COLOURS)
    palette = np.array([shapes.COLOURS[n] for n in names], dtype=float)
    votes = np.argmin(((pixels[:, None, :].astype(float) - palette[None]) ** 2).sum(-1), axis=1)
    return names[np.bincount(votes, minlength=len(names)).argmax()]


def _foreground(image: np.ndarray) -> np.ndarray:
    return image[np.abs(image.astype(int) - np.array(shapes.BACKGROUND)).sum(-1) > 120]


def test_teacher_fits_the_ten_megabyte_budget():
    total = sum(path.stat().st_size for path in run.TEACHER_DIR.rglob("*") if path.is_file())
    assert total <= 10 * 2**20, total


def test_teacher_vae_reconstructs_shapes_and_a_random_vae_does_not(teacher, tmp_path):
    from lcm_plugin.tiny_sdxl import build_components

    images, _ = shapes.sample_images(8, seed=123)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1

    def rms(vae) -> float:
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        return float(np.sqrt(((sampling.decode(vae, latents).numpy().astype(float) - images) ** 2).mean()))

    random_vae = build_components(0, vocabulary=shapes.VOCABULARY, tokenizer_dir=tmp_path)["vae"]
    assert rms(teacher.vae) < 12.0 < 60.0 < rms(random_vae)


def test_teacher_draws_the_prompted_colour(teacher):
    prompts = list(shapes.PROMPTS)
    cond = sampling.encode(teacher, prompts, shapes.IMAGE_SIZE)
    noise = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = sampling.sample_ddim(teacher.unet, teacher.scheduler.config, noise, cond, steps=8, guidance_scale=3.0)
    images = sampling.decode(teacher.vae, latents).numpy()
    hits = sum(_nearest_colour(_foreground(image)) == prompt.split()[1] for image, prompt in zip(images, prompts))
    assert hits >= 11, hits
