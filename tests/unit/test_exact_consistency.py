"""sampling.sample_exact_consistency, the perfect student of bench/quality.py, judged by diffusers' DDIMScheduler
walking the same trailing 50-step grid with the demo teacher."""

from __future__ import annotations

import pytest
import torch

from lcm_plugin.demo import run, sampling, shapes

GUIDANCE_SCALE = 6.5


@pytest.fixture(scope="module")
def teacher():
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(run.TEACHER_DIR))
    prompts = [shapes.prompt("red", "circle"), shapes.prompt("blue", "square")]
    cond = sampling.encode(pipeline, prompts, shapes.IMAGE_SIZE)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return pipeline, cond, noise


@torch.no_grad()
def ddim_clean_estimate(pipeline, latents, cond, *, start: int) -> torch.Tensor:
    """diffusers' DDIM (trailing, 50 steps) from timestep `start` on: its last step's pred_original_sample."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, timestep_spacing="trailing")
    scheduler.set_timesteps(50)
    for t in [t for t in scheduler.timesteps if t <= start]:
        eps = sampling.guided_eps(pipeline.unet, latents, t, cond, GUIDANCE_SCALE)
        output = scheduler.step(eps, t, latents)
        latents = output.prev_sample
    return output.pred_original_sample


def exact(pipeline, noise, cond, *, steps, gamma):
    return sampling.sample_exact_consistency(
        pipeline.unet, pipeline.scheduler.config, noise, cond, steps=steps, gamma=gamma,
        guidance_scale=GUIDANCE_SCALE, num_ddim_timesteps=50, generator=torch.Generator().manual_seed(7),
    )


def test_deterministic_sampler_is_the_teachers_ddim(teacher):
    pipeline, cond, noise = teacher
    expected = ddim_clean_estimate(pipeline, noise, cond, start=999)
    for steps in (1, 2, 4):
        torch.testing.assert_close(exact(pipeline, noise, cond, steps=steps, gamma=0.0), expected, atol=1e-4, rtol=1e-4)


def test_lcm_sampler_renoises_the_ode_endpoint(teacher):
    pipeline, cond, noise = teacher
    a_499 = pipeline.scheduler.alphas_cumprod[499]
    fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(7))
    renoised = a_499.sqrt() * ddim_clean_estimate(pipeline, noise, cond, start=999) + (1 - a_499).sqrt() * fresh
    expected = ddim_clean_estimate(pipeline, renoised, cond, start=499)
    torch.testing.assert_close(exact(pipeline, noise, cond, steps=2, gamma=1.0), expected, atol=1e-4, rtol=1e-4)


def test_tcd_sampler_diffuses_from_its_intermediate_point(teacher):
    """gamma 0.3, 2 steps: along the ODE from 999 to s = floor(0.7 * 499) = 349, forward-diffused to 499, then the
    ODE to the end. s is off the grid: the last step of the first leg goes from 359 to 349."""
    from diffusers import DDIMScheduler

    pipeline, cond, noise = teacher
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, timestep_spacing="trailing")
    scheduler.set_timesteps(50)
    alphas_cumprod = scheduler.alphas_cumprod
    latents = noise
    with torch.no_grad():
        for t in [t for t in scheduler.timesteps if t >= 359]:
            eps = sampling.guided_eps(pipeline.unet, latents, t, cond, GUIDANCE_SCALE)
            clean = scheduler.step(eps, t, latents).pred_original_sample
            t_next = int(t) - 20 if int(t) > 359 else 349
            latents = alphas_cumprod[t_next].sqrt() * clean + (1 - alphas_cumprod[t_next]).sqrt() * eps
    ratio = alphas_cumprod[499] / alphas_cumprod[349]
    fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(7))
    expected = ddim_clean_estimate(pipeline, ratio.sqrt() * latents + (1 - ratio).sqrt() * fresh, cond, start=499)
    torch.testing.assert_close(exact(pipeline, noise, cond, steps=2, gamma=0.3), expected, atol=1e-4, rtol=1e-4)
