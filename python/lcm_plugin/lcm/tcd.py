"""Trajectory Consistency Distillation (TCD; Zheng et al. 2024, arXiv 2402.19159): the two pieces that differ from LCM.

1. The trajectory consistency function maps x_t to any s <= t on the PF-ODE trajectory instead of to x_0.
   TCD writes it in the semi-linear (exponential-integrator) form, first order:
       f(x_t, t, s) = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) x0_hat(x_t, t),   h = lambda_s - lambda_t,
   with lambda = log(alpha / sigma), the half log-SNR. It satisfies f(x_s, s, s) = x_s by construction, so
   TCD has no c_skip / c_out. Expanded, it is alpha_s x0_hat + sigma_s eps_hat: a DDIM step from t to s.
2. Training picks the end timestep s = t_m below the solver's end t_n: with the start t_{n+k} and the
   teacher step to t_n as in LCM, m is uniform on 0..n. The loss is
       d( f_student(x_{t_{n+k}}, t_{n+k}, t_m),  f_target(x_hat_{t_n}, t_n, t_m) ).

Sampling is diffusers' TCDScheduler (strategic stochastic sampling). Its step evaluates the same f at
s = floor((1 - gamma) t_prev) (gamma is its `eta`), then re-noises x_s forward to t_prev.

Symbols follow lcm_plugin.lcm's glossary. Timesteps are integer training timesteps, and t_m, t_n lie on the
solver grid {0} U {i skip_k - 1}.
"""

from __future__ import annotations

import torch


def half_log_snr(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) (TCD's and DPM-Solver's lambda_t), elementwise."""
    return torch.log(alpha) - torch.log(sigma)


def trajectory_consistency_function(
    x_t: torch.Tensor,
    x0_hat: torch.Tensor,
    *,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    alpha_s: torch.Tensor,
    sigma_s: torch.Tensor,
) -> torch.Tensor:
    """f(x_t, t, s) in TCD's semi-linear form, from the model's data estimate x0_hat at (x_t, t).

    x_t, x0_hat: [B, C, H, W]; alpha_*, sigma_*: [B, 1, 1, 1] (DDIMSkipSchedule.alpha_sigma) at t and s <= t.
    """
    h = half_log_snr(alpha_s, sigma_s) - half_log_snr(alpha_t, sigma_t)
    # 1 - e^{-h} as -expm1(-h): exact to round-off when s is close to t, where h -> 0.
    return (sigma_s / sigma_t) * x_t + alpha_s * (-torch.expm1(-h)) * x0_hat


def sample_end_timestep(
    t_n: torch.Tensor, *, skip_k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """TCD's training end timestep t_m for each solver end t_n [B] (int64): m uniform on 0..n.

    t_n = max(n skip_k - 1, 0) is the end of the solver step from t_{n+k}, so n = (t_n + 1) // skip_k,
    and t_m = max(m skip_k - 1, 0) <= t_n; m = n gives s = t_n, where the target is the teacher step itself.
    """
    n = torch.div(t_n + 1, skip_k, rounding_mode="floor")
    # Drawn on t_n's device in float32 (no host copy, no float64 on accelerators that refuse it); float32 resolves
    # m exactly for n + 1 <= 2**24, far above any number of solver steps.
    u = torch.rand(t_n.shape, generator=generator, device=generator.device if generator is not None else t_n.device)
    m = torch.floor(u.to(t_n.device) * (n + 1)).to(torch.int64)
    return (m * skip_k - 1).clamp(min=0)
