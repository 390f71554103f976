"""Classifier-free guidance for the teacher (LCM Alg. 1, the omega-conditioned estimate).

`guidance_scale` is SimpleTuner's CFG scale s: uncond + s (cond - uncond). The LCM paper and diffusers'
scripts write cond + omega (cond - uncond); the two agree with omega = s - 1, so diffusers' default
omega in [3, 15] is s in [4, 16], and the LCM-LoRA report's fixed omega = 7.5 is s = 8.5.
"""

from __future__ import annotations

import torch


def sample_guidance_scale(
    batch_size: int,
    *,
    w_min: float,
    w_max: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One guidance scale per sample from U[w_min, w_max], float32 [B] on `device`: drawn there (or on the
    generator's device, then moved), so a training step makes no host-to-device copy and no float64 tensor, which
    some accelerators (Apple MPS) refuse."""
    u = torch.rand((batch_size,), generator=generator, device=generator.device if generator is not None else device)
    return (w_min + (w_max - w_min) * u).to(device)


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: torch.Tensor) -> torch.Tensor:
    """uncond + s (cond - uncond); guidance_scale [B] broadcasts over cond's trailing dims."""
    s = guidance_scale.to(device=cond.device, dtype=cond.dtype).reshape((-1,) + (1,) * (cond.ndim - 1))
    return uncond + s * (cond - uncond)
