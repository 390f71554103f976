"""LCM Algorithm 1 for one batch, with the networks injected as callables (no adapters, no I/O)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lcm_plugin.lcm.boundary import consistency_function
from lcm_plugin.lcm.guidance import apply_guidance
from lcm_plugin.lcm.parameterization import x0_and_eps_from_model_output
from lcm_plugin.lcm.schedules import DDIMSkipSchedule
from lcm_plugin.lcm.solver import ddim_step

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
    target: torch.Tensor  # f_target(x_t_n, t_n)


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
) -> ConsistencyTargets:
    """Noise the latents, take one guided teacher DDIM step, evaluate the target network there.

    latents, noise: [B, C, H, W] clean latents x0 and eps ~ N(0, I); guidance_scale: [B] CFG scales s.
    `schedule` must already be in the latents' dtype and device (DDIMSkipSchedule.to).
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

        # 5. target consistency output f_target(x_t_n, t_n)
        target_output = target_model(x_t_n, t_n)
        x0_target, _ = x0_and_eps_from_model_output(target_output, x_t_n, alpha_end, sigma_end, prediction_type)
        target = consistency_function(x_t_n, x0_target, t_n, timestep_scaling=timestep_scaling)

    return ConsistencyTargets(x_t=x_t, t_n_plus_k=t_n_plus_k, t_n=t_n, x_t_n=x_t_n, target=target)


def student_consistency_output(
    model_output: torch.Tensor,
    *,
    x_t: torch.Tensor,
    t_n_plus_k: torch.Tensor,
    schedule: DDIMSkipSchedule,
    prediction_type: str,
    timestep_scaling: float,
) -> torch.Tensor:
    """f_theta(x_t, t_n_plus_k) from the student's raw output at (x_t, t_n_plus_k); keeps the graph."""
    _require_schedule_like(schedule, x_t)
    alpha_start, sigma_start = schedule.alpha_sigma(t_n_plus_k, x_t.ndim)
    x0_hat, _ = x0_and_eps_from_model_output(model_output, x_t, alpha_start, sigma_start, prediction_type)
    return consistency_function(x_t, x0_hat, t_n_plus_k, timestep_scaling=timestep_scaling)
