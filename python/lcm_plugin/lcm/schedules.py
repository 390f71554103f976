"""The DDIM skip-step schedule the LCM solver walks (LCM Alg. 1, the discretisation t_1 < ... < t_N)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DDIMSkipSchedule:
    """Tables for one noise schedule and solver resolution.

    alpha, sigma: [T] sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) for every training timestep.
    solver_timesteps: [N] t_n_plus_k values a training step may start from,
        (1..N) * skip_k - 1, as diffusers' `DDIMSolver`.
    skip_k: stride T // N between a start timestep and its end timestep.
    """

    alpha: torch.Tensor
    sigma: torch.Tensor
    solver_timesteps: torch.Tensor
    skip_k: int

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int) -> DDIMSkipSchedule:
        num_train_timesteps = alphas_cumprod.shape[0]
        if not 1 <= num_ddim_timesteps <= num_train_timesteps:
            raise ValueError(
                f"num_ddim_timesteps must be in 1..{num_train_timesteps} (the scheduler's num_train_timesteps), "
                f"got {num_ddim_timesteps}"
            )
        skip_k = num_train_timesteps // num_ddim_timesteps
        solver_timesteps = torch.arange(1, num_ddim_timesteps + 1, dtype=torch.int64) * skip_k - 1
        alphas_cumprod = alphas_cumprod.to(torch.float64)
        return cls(
            alpha=alphas_cumprod.sqrt(),
            sigma=(1.0 - alphas_cumprod).sqrt(),
            solver_timesteps=solver_timesteps,
            skip_k=skip_k,
        )

    def to(self, device: torch.device | str, dtype: torch.dtype) -> DDIMSkipSchedule:
        """The same tables on `device`, alpha/sigma in `dtype` (the latents'; tables are built in float64)."""
        return DDIMSkipSchedule(
            alpha=self.alpha.to(device=device, dtype=dtype),
            sigma=self.sigma.to(device=device, dtype=dtype),
            solver_timesteps=self.solver_timesteps.to(device),
            skip_k=self.skip_k,
        )

    def sample_step(
        self, batch_size: int, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one solver step per sample: (t_n_plus_k, t_n), both [B] int64 on the tables' device (drawn there,
        or on the generator's device when one is given)."""
        index = torch.randint(
            0, self.solver_timesteps.shape[0], (batch_size,), generator=generator,
            device=generator.device if generator is not None else self.solver_timesteps.device,
        ).to(self.solver_timesteps.device)
        t_n_plus_k = self.solver_timesteps[index]
        t_n = (t_n_plus_k - self.skip_k).clamp(min=0)
        return t_n_plus_k, t_n

    def alpha_sigma(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t and sigma_t for timesteps t [B], shaped [B, 1, ...] to broadcast over `ndim` dims."""
        shape = (t.shape[0],) + (1,) * (ndim - 1)
        return self.alpha[t].reshape(shape), self.sigma[t].reshape(shape)
