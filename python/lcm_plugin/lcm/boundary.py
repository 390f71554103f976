"""Boundary-condition parameterisation f(x, t) = c_skip(t) x + c_out(t) x0_hat (LCM eq. 9, CM appendix C)."""

from __future__ import annotations

import torch

SIGMA_DATA = 0.5


def scalings_for_boundary_conditions(
    t: torch.Tensor, *, timestep_scaling: float, sigma_data: float = SIGMA_DATA
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t) and c_out(t) on integer training timesteps t [B], as diffusers' LCM scripts and LCMScheduler.

    With s = timestep_scaling: c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2),
    c_out = s t / sqrt((s t)^2 + sigma_data^2); so c_skip(0) = 1, c_out(0) = 0.
    """
    scaled_t = timestep_scaling * t
    c_skip = sigma_data**2 / (scaled_t**2 + sigma_data**2)
    c_out = scaled_t / (scaled_t**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_function(
    x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor, *, timestep_scaling: float
) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat, computed in x_t's dtype. x_t, x0_hat: [B, C, H, W]; t: [B].

    The scalings are computed in x_t's dtype promoted to at least float32, as diffusers' scripts compute them
    (float32), on t's device: never float64 there, which some accelerators (Apple MPS) refuse."""
    c_skip, c_out = scalings_for_boundary_conditions(
        t.to(torch.promote_types(x_t.dtype, torch.float32)), timestep_scaling=timestep_scaling
    )
    shape = (t.shape[0],) + (1,) * (x_t.ndim - 1)
    c_skip = c_skip.to(x_t.dtype).reshape(shape)
    c_out = c_out.to(x_t.dtype).reshape(shape)
    return c_skip * x_t + c_out * x0_hat
