"""Batched sampling with the demo's tiny SDXL: teacher DDIM with classifier-free guidance, the
student with its variant's scheduler.

All samplers take the same initial noise and conditioning, so rows of the grid and of the metric
table differ only by the sampler and the model. Latents are [B, 4, 8, 8]; images uint8 [B, 64, 64, 3].
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Conditioning:
    """SDXL conditioning for B samples: prompt_embeds [B, 77, D], pooled [B, P], time_ids [B, 6]."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor

    def unconditional(self) -> Conditioning:
        # SDXL's empty-prompt convention (force_zeros_for_empty_prompt), also LCM's uncond: zeros, same time_ids.
        return Conditioning(torch.zeros_like(self.prompt_embeds), torch.zeros_like(self.pooled), self.time_ids)


@torch.no_grad()
def encode(pipeline, prompts: list[str], image_size: int) -> Conditioning:
    """Conditioning for `prompts` as the SDXL pipeline computes it, time_ids for an uncropped square image."""
    prompt_embeds, _, pooled, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False)
    time_ids = torch.tensor([[image_size, image_size, 0, 0, image_size, image_size]], dtype=prompt_embeds.dtype)
    return Conditioning(prompt_embeds, pooled, time_ids.expand(len(prompts), -1))


def _unet(unet, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    return unet(
        latents,
        t,
        encoder_hidden_states=cond.prompt_embeds,
        added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids},
    ).sample


def guided_eps(unet, latents, t, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
    """uncond + s * (cond - uncond) (SimpleTuner's and diffusers' CFG scale s); one UNet call for both."""
    if guidance_scale == 1.0:
        return _unet(unet, latents, t, cond)
    both = Conditioning(*(torch.cat([u, c]) for u, c in zip(
        (cond.unconditional().prompt_embeds, cond.unconditional().pooled, cond.time_ids),
        (cond.prompt_embeds, cond.pooled, cond.time_ids),
    )))
    eps_uncond, eps_cond = _unet(unet, torch.cat([latents, latents]), t, both).chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def sample_ddim(unet, scheduler_config: dict, noise: torch.Tensor, cond: Conditioning, *, steps: int,
                guidance_scale: float) -> torch.Tensor:
    """Teacher DDIM (eta 0) from `noise` [B, 4, h, w] in `steps` steps with "trailing" spacing.

    Trailing spacing starts at t = 999 for any step count; SDXL's default "leading" would start
    DDIM-1 at t = 1 and make the few-step teacher look absurdly bad (an unfair baseline).
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = guided_eps(unet, latents, t, cond, guidance_scale)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


@torch.no_grad()
def sample_student(unet, scheduler, noise: torch.Tensor, cond: Conditioning, *, steps: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Student sampling (no guidance: it was distilled into the student) in `steps` steps with the scheduler of
    its variant (`lcm_plugin.inference.variant_scheduler`: LCMScheduler or TCDScheduler on the training solver's
    grid); the stochastic steps draw their fresh noise from `generator`.
    """
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        latents = scheduler.step(_unet(unet, latents, t, cond), t, latents, generator=generator).prev_sample
    return latents


@torch.no_grad()
def sample_exact_consistency(unet, scheduler_config: dict, noise: torch.Tensor, cond: Conditioning, *, steps: int,
                             gamma: float, guidance_scale: float, num_ddim_timesteps: int,
                             generator: torch.Generator) -> torch.Tensor:
    """A perfect student: TCD's multi-step sampler at `gamma` (1 is LCM's, which renoises the clean estimate) with
    the consistency function replaced by the teacher's guided DDIM ODE on the training solver's grid.

    No student sampled this way can do better. With fresh noise between steps (gamma > 0) the sampler itself
    moves samples off the teacher's ODE, since a guided ODE's marginals are not its endpoint distribution renoised;
    at gamma 0 it is the teacher's DDIM on that grid.
    """
    from diffusers import DDPMScheduler

    from lcm_plugin.inference import tcd_scheduler
    from lcm_plugin.lcm.schedules import DDIMSkipSchedule

    alphas_cumprod = DDPMScheduler.from_config(scheduler_config).alphas_cumprod
    grid = DDIMSkipSchedule.from_alphas_cumprod(alphas_cumprod, num_ddim_timesteps).solver_timesteps.tolist()[::-1]

    def solve(latents: torch.Tensor, t: int, end: int) -> torch.Tensor:
        """Guided DDIM from timestep t down the grid to timestep `end`; end < 0: the clean estimate at the grid's
        last step."""
        while True:
            eps = guided_eps(unet, latents, torch.tensor(t), cond, guidance_scale)
            clean = (latents - (1 - alphas_cumprod[t]).sqrt() * eps) / alphas_cumprod[t].sqrt()
            lower = [g for g in grid if end <= g < t]
            if end < 0 and not lower:
                return clean
            t = lower[0] if lower else end
            latents = alphas_cumprod[t].sqrt() * clean + (1 - alphas_cumprod[t]).sqrt() * eps
            if t == end:
                return latents

    # Only its timesteps are used (TCD's step does not read timestep_scaling).
    scheduler = tcd_scheduler(scheduler_config, num_ddim_timesteps=num_ddim_timesteps, timestep_scaling=10.0,
                              gamma=gamma)
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    latents = noise
    for t, t_prev in itertools.pairwise(timesteps):
        end = int((1 - gamma) * t_prev)  # TCDScheduler's s = floor((1 - gamma) * t_prev)
        fresh = torch.randn(latents.shape, generator=generator) if gamma > 0 else torch.zeros_like(latents)
        if end <= 0:  # LCM's step: the clean estimate renoised to t_prev
            x_end, ratio = solve(latents, t, -1), alphas_cumprod[t_prev]
        else:  # TCD's: along the ODE to s, then forward-diffused from s to t_prev
            x_end, ratio = solve(latents, t, end), alphas_cumprod[t_prev] / alphas_cumprod[end]
        latents = ratio.sqrt() * x_end + (1 - ratio).sqrt() * fresh
    return solve(latents, timesteps[-1], -1)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Latents [B, C, h, w], (sample - shift_factor) * scaling_factor (SDXL's VAE has no shift) -> uint8 images
    [B, 8h, 8w, 3]."""
    shift = vae.config.shift_factor or 0.0
    images = [
        vae.decode(chunk / vae.config.scaling_factor + shift).sample for chunk in latents.split(batch_size)
    ]
    pixels = (torch.cat(images).clamp(-1, 1) + 1) * 127.5
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1)
