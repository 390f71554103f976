"""Distance d(., .) between the student's and the target's consistency outputs (LCM Alg. 1, the loss)."""

from __future__ import annotations

import torch

LOSS_TYPES = ("l2", "huber")


def consistency_loss(prediction: torch.Tensor, target: torch.Tensor, *, loss_type: str, huber_c: float) -> torch.Tensor:
    """Scalar mean distance, computed in float32 as diffusers' scripts do.

    l2: mean squared error. huber: pseudo-Huber, mean(sqrt((a - b)^2 + c^2) - c) with c = huber_c.
    """
    prediction, target = prediction.float(), target.float()
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(prediction, target, reduction="mean")
    if loss_type == "huber":
        return torch.mean(torch.sqrt((prediction - target) ** 2 + huber_c**2) - huber_c)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
