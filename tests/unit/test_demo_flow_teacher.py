"""The shipped SD3 flow teacher (issue 21, item 6) and the flow samplers bench/quality.py scores it with.

The samplers are judged by diffusers' own StableDiffusion3Pipeline on the same teacher, noise and conditioning: its
denoising loop (Euler on the shifted grid, classifier-free guidance), its decode (latents / scaling + shift), and
with a student's scheduler in place of Euler its loop without guidance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcm_plugin.config import LcmConfig
from lcm_plugin.demo import config, flow_sampling, sampling, shapes
from lcm_plugin.inference import variant_scheduler

from test_demo_teacher import _foreground, _nearest_colour


@pytest.fixture(scope="module")
def teacher():
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(str(config.FLOW_TEACHER))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def conditioning(teacher, prompts: list[str]) -> flow_sampling.FlowConditioning:
    return flow_sampling.encode(teacher, prompts, config.FLOW_TEACHER_T5_TOKENS)


def noise(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def pipeline_latents(teacher, cond, latents, *, steps: int, guidance_scale: float, **call) -> torch.Tensor:
    """diffusers' own SD3 loop; its unconditional branch given as zeros, the distiller's and the bench's."""
    uncond = cond.unconditional()
    return teacher(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled,
                   negative_prompt_embeds=uncond.prompt_embeds, negative_pooled_prompt_embeds=uncond.pooled,
                   latents=latents.clone(), num_inference_steps=steps, guidance_scale=guidance_scale,
                   height=shapes.IMAGE_SIZE, width=shapes.IMAGE_SIZE, **call).images


def test_flow_teacher_fits_the_ten_megabyte_budget():
    total = sum(path.stat().st_size for path in config.FLOW_TEACHER.rglob("*") if path.is_file())
    assert total <= 10 * 2**20, total


def test_flow_teacher_vae_factors_give_unit_latents(teacher):
    images, _ = shapes.sample_images(256, seed=321)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        samples = teacher.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
    latents = (samples - teacher.vae.config.shift_factor) * teacher.vae.config.scaling_factor
    assert abs(float(latents.mean())) < 0.1 and abs(float(latents.std()) - 1) < 0.1


def test_euler_sampler_is_the_sd3_pipelines_loop(teacher):
    prompts = list(shapes.PROMPTS[:4])
    cond, start = conditioning(teacher, prompts), noise(len(prompts))
    ours = flow_sampling.sample_euler(teacher.transformer, teacher.scheduler.config, start, cond, steps=4,
                                      guidance_scale=4.5)
    theirs = pipeline_latents(teacher, cond, start, steps=4, guidance_scale=4.5, output_type="latent")
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_decode_is_the_sd3_pipelines_decode(teacher):
    prompts = list(shapes.PROMPTS[:4])
    cond, start = conditioning(teacher, prompts), noise(len(prompts), seed=1)
    latents = flow_sampling.sample_euler(teacher.transformer, teacher.scheduler.config, start, cond, steps=2,
                                         guidance_scale=1.0)
    ours = sampling.decode(teacher.vae, latents).numpy().astype(float)
    theirs = pipeline_latents(teacher, cond, start, steps=2, guidance_scale=1.0, output_type="np") * 255
    assert np.abs(ours - theirs).max() <= 1.0


@pytest.mark.parametrize("variant", ["lcm", "pcm"])
def test_student_sampler_is_the_sd3_pipelines_loop_with_its_scheduler(teacher, variant):
    from diffusers import StableDiffusion3Pipeline

    prompts = list(shapes.PROMPTS[4:8])
    cond, start = conditioning(teacher, prompts), noise(len(prompts), seed=2)
    lcm = LcmConfig(variant=variant, pcm_phases=2)
    ours = flow_sampling.sample_student(teacher.transformer, variant_scheduler(teacher.scheduler.config, lcm), start,
                                        cond, steps=2, generator=torch.Generator().manual_seed(7))
    # The pipeline's scheduler.step draws LCM's fresh noise from torch's global generator.
    student = StableDiffusion3Pipeline(**{**teacher.components,
                                          "scheduler": variant_scheduler(teacher.scheduler.config, lcm)})
    student.set_progress_bar_config(disable=True)
    torch.manual_seed(7)
    theirs = pipeline_latents(student, cond, start, steps=2, guidance_scale=1.0, output_type="latent")
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_flow_teacher_draws_the_prompted_colour(teacher):
    prompts = list(shapes.PROMPTS)
    latents = flow_sampling.sample_euler(teacher.transformer, teacher.scheduler.config, noise(len(prompts)),
                                         conditioning(teacher, prompts), steps=8, guidance_scale=3.0)
    images = sampling.decode(teacher.vae, latents).numpy()
    hits = sum(_nearest_colour(_foreground(image)) == prompt.split()[1] for image, prompt in zip(images, prompts))
    assert hits >= 11, hits


@pytest.mark.parametrize(("variant", "steps"), [("lcm", 1), ("pcm", 2), ("pcm", 4)])
def test_a_perfect_student_whose_steps_follow_the_grid_is_the_teachers_euler(teacher, variant, steps):
    """LCM at one step maps the noise to the ODE's end; PCM's steps start on grid points and run the ODE between
    them: both are the teacher's Euler on its whole grid, diffusers' loop (test_euler_sampler_is_...)."""
    prompts = list(shapes.PROMPTS[:3])
    cond, start = conditioning(teacher, prompts), noise(len(prompts), seed=3)
    lcm = LcmConfig(variant=variant, pcm_phases=2, num_ddim_timesteps=12)
    perfect = flow_sampling.sample_exact_consistency(
        teacher.transformer, variant_scheduler(teacher.scheduler.config, lcm), teacher.scheduler.config, start, cond,
        steps=steps, to_data=variant == "lcm", guidance_scale=4.0, num_ddim_timesteps=12,
        generator=torch.Generator().manual_seed(0))
    euler = pipeline_latents(teacher, cond, start, steps=12, guidance_scale=4.0, output_type="latent")
    torch.testing.assert_close(perfect, euler, rtol=1e-4, atol=1e-4)


def test_a_perfect_lcm_student_renoises_between_its_steps(teacher):
    prompts = list(shapes.PROMPTS[:3])
    cond, start = conditioning(teacher, prompts), noise(len(prompts), seed=3)
    lcm = LcmConfig(num_ddim_timesteps=12)

    def perfect(seed: int) -> torch.Tensor:
        return flow_sampling.sample_exact_consistency(
            teacher.transformer, variant_scheduler(teacher.scheduler.config, lcm), teacher.scheduler.config, start,
            cond, steps=4, to_data=True, guidance_scale=4.0, num_ddim_timesteps=12,
            generator=torch.Generator().manual_seed(seed))

    euler = pipeline_latents(teacher, cond, start, steps=12, guidance_scale=4.0, output_type="latent")
    first, again, other = perfect(0), perfect(0), perfect(1)
    torch.testing.assert_close(first, again)
    assert (first - euler).abs().mean() > 0.05 and (first - other).abs().mean() > 0.05
