"""One deterministic DDIM step of the probability-flow ODE (LCM Alg. 1, the solver Psi)."""

from __future__ import annotations

import torch


def ddim_step(
    x0_hat: torch.Tensor, eps_hat: torch.Tensor, alpha_t_n: torch.Tensor, sigma_t_n: torch.Tensor
) -> torch.Tensor:
    """x_{t_n} from the (guided) estimates made at t_n_plus_k: alpha_{t_n} x0_hat + sigma_{t_n} eps_hat.

    Equals diffusers' `DDIMSolver.ddim_step`, whose `ddim_alpha_cumprods_prev[i]` is alpha_bar at t_n.
    """
    return alpha_t_n * x0_hat + sigma_t_n * eps_hat
