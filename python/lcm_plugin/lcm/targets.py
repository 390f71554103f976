"""LCM Algorithm 1 for one batch, with the networks injected as callables (no adapters, no I/O).

The consistency function is the variant's (variants.py): LCM's by default, TCD's or PCM's towards `t_end`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lcm_plugin.lcm.guidance import apply_guidance
from lcm_plugin.lcm.parameterization import x0_and_eps_from_model_output
from lcm_plugin.lcm.schedules import DDIMSkipSchedule
from lcm_plugin.lcm.solver import ddim_step
from lcm_plugin.lcm.variants import consistency_output

# (x, t) -> (cond_output, uncond_output): the teacher's two predictions, ideally from one batched call.
TeacherFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (x, t) -> output: the target network (LCM-LoRA: the student itself, adapters on; full model: its EMA).
TargetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _require_schedule_like(schedule: DDIMSkipSchedule, x: torch.Tensor) -> None:
    """Tables in another dtype would silently promote every result (upstream's float64 x_prev leak)."""
    if schedule.alpha.dtype != x.dtype or schedule.alpha.device != x.device:
        raise ValueError(
            f"schedule tables are {schedule.alpha.dtype} on {schedule.alpha.device} but the latents are {x.dtype} "
            f"on {x.device}; pass schedule.to(latents.device, latents.dtype)"
        )


@dataclass(frozen=True)
class ConsistencyTargets:
    """What the student step needs. Tensors [B, C, H, W] unless noted; `target` carries no grad."""

    x_t: torch.Tensor  # noisy latents at t_n_plus_k: the student's input
    t_n_plus_k: torch.Tensor  # [B] start timesteps
    t_n: torch.Tensor  # [B] end timesteps
    x_t_n: torch.Tensor  # one guided DDIM step from x_t
    t_end: torch.Tensor  # [B] where both consistency functions map to (LCM: 0)
    target: torch.Tensor  # f_target(x_t_n, t_n) towards t_end


def consistency_targets(
    *,
    latents: torch.Tensor,
    noise: torch.Tensor,
    t_n_plus_k: torch.Tensor,
    t_n: torch.Tensor,
    guidance_scale: torch.Tensor,
    schedule: DDIMSkipSchedule,
    prediction_type: str,
    timestep_scaling: float,
    teacher: TeacherFn,
    target_model: TargetFn,
    variant: str = "lcm",
    t_end: torch.Tensor | None = None,
) -> ConsistencyTargets:
    """Noise the latents, take one guided teacher DDIM step, evaluate the target network there.

    latents, noise: [B, C, H, W] clean latents x0 and eps ~ N(0, I); guidance_scale: [B] CFG scales s.
    `schedule` must already be in the latents' dtype and device (DDIMSkipSchedule.to).
    variant, t_end: the consistency function and where it maps to (variants.end_timesteps; LCM: None = 0).
    """
    _require_schedule_like(schedule, latents)
    with torch.no_grad():
        # 1. forward diffusion to t_n_plus_k (Alg. 1: x_{t_{n+k}} ~ N(alpha x, sigma^2 I))
        alpha_start, sigma_start = schedule.alpha_sigma(t_n_plus_k, latents.ndim)
        x_t = alpha_start * latents + sigma_start * noise

        # 2. teacher estimates at (x_t, t_n_plus_k), conditional and unconditional
        cond_output, uncond_output = teacher(x_t, t_n_plus_k)
        x0_cond, eps_cond = x0_and_eps_from_model_output(cond_output, x_t, alpha_start, sigma_start, prediction_type)
        x0_uncond, eps_uncond = x0_and_eps_from_model_output(
            uncond_output, x_t, alpha_start, sigma_start, prediction_type
        )

        # 3. guided estimates (Alg. 1: the omega-augmented solver step), as diffusers: guidance on x0 and eps
        x0_hat = apply_guidance(x0_cond, x0_uncond, guidance_scale)
        eps_hat = apply_guidance(eps_cond, eps_uncond, guidance_scale)

        # 4. one DDIM step t_n_plus_k -> t_n
        alpha_end, sigma_end = schedule.alpha_sigma(t_n, latents.ndim)
        x_t_n = ddim_step(x0_hat, eps_hat, alpha_end, sigma_end)

        # 5. target consistency output f_target(x_t_n, t_n) (towards t_end)
        t_end = torch.zeros_like(t_n) if t_end is None else t_end
        target = consistency_output(
            variant, target_model(x_t_n, t_n), x_t=x_t_n, t=t_n, t_end=t_end, schedule=schedule,
            prediction_type=prediction_type, timestep_scaling=timestep_scaling,
        )

    return ConsistencyTargets(x_t=x_t, t_n_plus_k=t_n_plus_k, t_n=t_n, x_t_n=x_t_n, t_end=t_end, target=target)


def student_consistency_output(
    model_output: torch.Tensor,
    *,
    x_t: torch.Tensor,
    t_n_plus_k: torch.Tensor,
    schedule: DDIMSkipSchedule,
    prediction_type: str,
    timestep_scaling: float,
    variant: str = "lcm",
    t_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """f_theta(x_t, t_n_plus_k) (towards t_end) from the student's raw output at (x_t, t_n_plus_k); keeps the graph."""
    _require_schedule_like(schedule, x_t)
    return consistency_output(
        variant, model_output, x_t=x_t, t=t_n_plus_k,
        t_end=torch.zeros_like(t_n_plus_k) if t_end is None else t_end, schedule=schedule,
        prediction_type=prediction_type, timestep_scaling=timestep_scaling,
    )
