"""Model output -> (x0_hat, eps_hat) for DDPM-family parameterisations (diffusers' DDPMScheduler conventions)."""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def x0_and_eps_from_model_output(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0_hat and eps_hat implied by a model output at x_t.

    model_output, x_t: [B, C, H, W]; alpha_t, sigma_t: [B, 1, 1, 1] (see DDIMSkipSchedule.alpha_sigma).
    Inverts x_t = alpha_t x0 + sigma_t eps and v = alpha_t eps - sigma_t x0.
    """
    if prediction_type == "epsilon":
        eps_hat = model_output
        x0_hat = (x_t - sigma_t * eps_hat) / alpha_t
    elif prediction_type == "v_prediction":
        x0_hat = alpha_t * x_t - sigma_t * model_output
        eps_hat = alpha_t * model_output + sigma_t * x_t
    elif prediction_type == "sample":
        x0_hat = model_output
        eps_hat = (x_t - alpha_t * x0_hat) / sigma_t
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return x0_hat, eps_hat
