"""The consistency objective of LCM, TCD and PCM on one solver step: where both sides map to, and the map.

All three share LCM Alg. 1's draw (x_{t_{n+k}}, the guided teacher step to x_hat_{t_n}, the loss); they differ in
the timestep t_end that the student at (x_{t_{n+k}}, t_{n+k}) and the target at (x_hat_{t_n}, t_n) both map to,
and in the function that maps there:
- "lcm": t_end = 0, f(x, t) = c_skip(t) x + c_out(t) x0_hat (boundary.py);
- "tcd": t_end = t_m, m uniform on 0..n, TCD's semi-linear f(x, t, t_m) (tcd.py);
- "pcm": t_end = the phase edge below t_n, the DDIM jump to it (pcm.py).
"""

from __future__ import annotations

import torch

from lcm_plugin.lcm.boundary import consistency_function
from lcm_plugin.lcm.parameterization import x0_and_eps_from_model_output
from lcm_plugin.lcm.pcm import phase_edge_below, phase_edges, phased_consistency_function
from lcm_plugin.lcm.schedules import DDIMSkipSchedule
from lcm_plugin.lcm.tcd import sample_end_timestep, trajectory_consistency_function

VARIANTS = ("lcm", "tcd", "pcm")


def _require_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def end_timesteps(
    variant: str,
    t_n: torch.Tensor,
    *,
    schedule: DDIMSkipSchedule,
    pcm_phases: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """t_end [B] int64 for solver ends t_n [B]: 0 (LCM), a random t_m <= t_n (TCD) or the phase edge (PCM)."""
    _require_variant(variant)
    if variant == "tcd":
        return sample_end_timestep(t_n, skip_k=schedule.skip_k, generator=generator)
    if variant == "pcm":
        edges = phase_edges(
            num_ddim_timesteps=schedule.solver_timesteps.shape[0], phases=pcm_phases, skip_k=schedule.skip_k,
            device=t_n.device,
        )
        return phase_edge_below(t_n, edges)
    return torch.zeros_like(t_n)


def consistency_output(
    variant: str,
    model_output: torch.Tensor,
    *,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_end: torch.Tensor,
    schedule: DDIMSkipSchedule,
    prediction_type: str,
    timestep_scaling: float,
) -> torch.Tensor:
    """The variant's consistency function at (x_t, t) towards t_end, from a network's raw output there.

    model_output, x_t: [B, C, H, W]; t, t_end: [B]; `schedule` in x_t's dtype and device. Keeps the graph.
    `timestep_scaling` is used by "lcm" only (TCD and PCM have no c_skip / c_out).
    """
    _require_variant(variant)
    alpha_t, sigma_t = schedule.alpha_sigma(t, x_t.ndim)
    x0_hat, eps_hat = x0_and_eps_from_model_output(model_output, x_t, alpha_t, sigma_t, prediction_type)
    if variant == "lcm":
        return consistency_function(x_t, x0_hat, t, timestep_scaling=timestep_scaling)
    alpha_end, sigma_end = schedule.alpha_sigma(t_end, x_t.ndim)
    if variant == "tcd":
        return trajectory_consistency_function(
            x_t, x0_hat, alpha_t=alpha_t, sigma_t=sigma_t, alpha_s=alpha_end, sigma_s=sigma_end
        )
    return phased_consistency_function(
        x_t, x0_hat, eps_hat, t=t, edge=t_end, alpha_edge=alpha_end, sigma_edge=sigma_end
    )
