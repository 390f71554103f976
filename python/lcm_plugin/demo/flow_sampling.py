"""Batched sampling with the tiny SD3 flow teacher (demo/assets/flow_teacher): the teacher's Euler with classifier-free
guidance, the student with its variant's flow scheduler.

The flow counterpart of `sampling` (SDXL): all samplers take the same initial noise and conditioning. Latents are
[B, C, 8, 8] in the transformer's space, (VAE sample - shift_factor) * scaling_factor; `sampling.decode` maps them
back to uint8 images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlowConditioning:
    """SD3 conditioning for B samples: prompt_embeds [B, tokens, D] (CLIP-L and CLIP-G, then T5), pooled [B, P]."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor

    def unconditional(self) -> FlowConditioning:
        # The distiller's unconditional branch for a flow teacher (and the teacher's caption dropout): zeros.
        return FlowConditioning(torch.zeros_like(self.prompt_embeds), torch.zeros_like(self.pooled))


@torch.no_grad()
def encode(pipeline, prompts: list[str], max_sequence_length: int) -> FlowConditioning:
    """Conditioning for `prompts` as the SD3 pipeline computes it, T5 at `max_sequence_length` tokens."""
    prompt_embeds, _, pooled, _ = pipeline.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                         max_sequence_length=max_sequence_length)
    return FlowConditioning(prompt_embeds, pooled)


def velocity(transformer, latents: torch.Tensor, t: torch.Tensor, cond: FlowConditioning) -> torch.Tensor:
    """The transformer's velocity at timestep t (sigma x 1000, the schedulers' timesteps)."""
    return transformer(hidden_states=latents, timestep=t.expand(len(latents)), encoder_hidden_states=cond.prompt_embeds,
                       pooled_projections=cond.pooled).sample


def guided_velocity(transformer, latents, t, cond: FlowConditioning, guidance_scale: float) -> torch.Tensor:
    """uncond + s * (cond - uncond), one transformer call for both halves."""
    if guidance_scale == 1.0:
        return velocity(transformer, latents, t, cond)
    uncond = cond.unconditional()
    both = FlowConditioning(torch.cat([uncond.prompt_embeds, cond.prompt_embeds]),
                            torch.cat([uncond.pooled, cond.pooled]))
    v_uncond, v_cond = velocity(transformer, torch.cat([latents, latents]), t, both).chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


@torch.no_grad()
def sample_euler(transformer, scheduler_config: dict, noise: torch.Tensor, cond: FlowConditioning, *, steps: int,
                 guidance_scale: float) -> torch.Tensor:
    """The teacher's own sampler: FlowMatchEulerDiscreteScheduler (its shifted grid) from `noise` in `steps` steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    latents = noise
    for t in scheduler.timesteps:
        latents = scheduler.step(guided_velocity(transformer, latents, t, cond, guidance_scale), t, latents).prev_sample
    return latents


@torch.no_grad()
def sample_student(transformer, scheduler, noise: torch.Tensor, cond: FlowConditioning, *, steps: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Student sampling (no guidance: it was distilled into the student) in `steps` steps with its variant's
    scheduler (`lcm_plugin.inference.variant_scheduler`: FlowMatchLCMScheduler, or Euler through PCM's phase
    edges); LCM's renoising steps draw from `generator`."""
    scheduler.set_timesteps(steps)
    latents = noise
    for t in scheduler.timesteps:
        latents = scheduler.step(velocity(transformer, latents, t, cond), t, latents, generator=generator).prev_sample
    return latents


@torch.no_grad()
def sample_exact_consistency(transformer, scheduler, scheduler_config: dict, noise: torch.Tensor,
                             cond: FlowConditioning, *, steps: int, to_data: bool, guidance_scale: float,
                             num_ddim_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """A perfect student in a student's `scheduler`: at each of its steps the consistency function is the teacher's
    guided Euler ODE on the training grid (the teacher's own N-step sigmas), from the step's sigma to the data
    (`to_data`: LCM's x0 = x - sigma v, which FlowMatchLCMScheduler renoises) or to the step's next sigma (PCM's
    phased Euler). The velocity handed to `scheduler.step` is the one that lands it there.

    No student sampled by that scheduler can do better: what its row keeps above the floor is the sampler's own cost.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    grid = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    grid.set_timesteps(num_ddim_timesteps)
    grid_sigmas = [float(sigma) for sigma in grid.sigmas]  # descending, the terminal 0 last

    def solve(x: torch.Tensor, sigma: float, end: float) -> torch.Tensor:
        """Guided Euler from `sigma` through the grid's points below it down to `end`."""
        points = [sigma, *(g for g in grid_sigmas if end < g < sigma), end]
        for high, low in zip(points, points[1:]):
            x = x + (low - high) * guided_velocity(transformer, x, torch.tensor(high * 1000), cond, guidance_scale)
        return x

    scheduler.set_timesteps(steps)
    latents = noise
    for index, t in enumerate(scheduler.timesteps):
        sigma, sigma_next = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
        end = 0.0 if to_data else sigma_next
        velocity_to_end = (latents - solve(latents, sigma, end)) / (sigma - end)
        latents = scheduler.step(velocity_to_end, t, latents, generator=generator).prev_sample
    return latents
