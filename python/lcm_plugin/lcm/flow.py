"""LCM distillation of a rectified-flow teacher (SD3, Flux): the pure math of one step.

Conventions are diffusers' FlowMatchEulerDiscreteScheduler: sigma in [0, 1], x_sigma = (1 - sigma) x0 + sigma eps,
and the network predicts the velocity v = dx_sigma / dsigma = eps - x0. From a velocity v at (x, sigma):
x0_hat = x - sigma v and eps_hat = x + (1 - sigma) v.

The step is the epsilon families' (targets.py) with three changes:
- the solver grid is the teacher's own shifted sigma schedule (FlowSkipSchedule), built from its scheduler config:
  a static shift (SD3) or Flux's resolution-dependent shift mu, so a grid belongs to one latent size;
- the solver is Euler or Heun on the teacher's guided velocity; Euler on the flow path IS the DDIM step,
  x + (sigma_to - sigma) v = (1 - sigma_to) x0_hat + sigma_to eps_hat;
- the consistency function needs no c_skip / c_out: f(x, sigma) = x0_hat = x - sigma v gives f(x, 0) = x exactly.
  Towards an end sigma_end (TCD / PCM) it is the same DDIM jump, f(x, sigma -> sigma_end) = x + (sigma_end - sigma) v.

Sigmas are [B] tensors (float64 from FlowSkipSchedule). Coefficients such as sigma_to - sigma are formed in the
sigmas' precision and cast to x's dtype only where they multiply x, so a bf16 step does not subtract two rounded sigmas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lcm_plugin.lcm.guidance import apply_guidance
from lcm_plugin.lcm.pcm import phase_edge_below, phase_start_indices

SOLVERS = ("euler", "heun")
# (x, sigma [B]) -> the teacher's velocity: one tensor for a guidance-distilled teacher (Flux: the scale is the
# model's `guidance` input, closed over by the callable), or (cond, uncond) for classifier-free guidance.
VelocityFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
# Scheduler options that change the sigmas and that flow_sigma_grid does not implement.
_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")
_GRID_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
              "base_image_seq_len", "max_image_seq_len", "time_shift_type", "shift_terminal")


def _col(c: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficient c [B] (or a scalar) in x's dtype and device, shaped to broadcast over x [B, ...]."""
    return torch.as_tensor(c, device=x.device).to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def dynamic_shift_mu(image_seq_len: int, *, base_shift: float = 0.5, max_shift: float = 1.15,
                     base_image_seq_len: int = 256, max_image_seq_len: int = 4096) -> float:
    """Flux's mu, linear in the latent token count: base_shift at base_image_seq_len, max_shift at max_image_seq_len.

    diffusers' `calculate_shift` (FluxPipeline). image_seq_len counts the transformer's tokens, (h / 2) (w / 2) for a
    Flux latent of h x w, so every bucket resolution has its own mu and its own grid.
    """
    m = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return base_shift + m * (image_seq_len - base_image_seq_len)


def flow_sigma_grid(num_ddim_timesteps: int, *, num_train_timesteps: int = 1000, shift: float = 1.0,
                    use_dynamic_shifting: bool = False, base_shift: float = 0.5, max_shift: float = 1.15,
                    base_image_seq_len: int = 256, max_image_seq_len: int = 4096, image_seq_len: int | None = None,
                    time_shift_type: str = "exponential", shift_terminal: float | None = None) -> torch.Tensor:
    """The N solver sigmas, descending from 1, float64 [N]: the teacher scheduler's own inference grid,
    FlowMatchEulerDiscreteScheduler(**config).set_timesteps(N, mu=dynamic_shift_mu(image_seq_len)).sigmas[:-1].

    As diffusers: linspace from the training sigmas' max (1) to their min, then shifted. With a static shift the
    training sigmas are already shifted, so the smallest solver sigma is shift applied twice to 1 / T (0.0089, not
    0.0030, for SD3's shift 3): reproduced, as it is the grid the teacher samples on.

    With `shift_terminal` (Qwen-Image's 0.02), the shifted grid is then stretched so that its last sigma is exactly
    shift_terminal, 1 - sigma scaled by a constant (diffusers' `stretch_shift_to_terminal`); the top stays 1.
    """
    if num_ddim_timesteps < 1:
        raise ValueError(f"num_ddim_timesteps must be >= 1, got {num_ddim_timesteps}")
    if time_shift_type not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
    if use_dynamic_shifting and image_seq_len is None:
        raise ValueError("use_dynamic_shifting needs image_seq_len (the latent's token count) to compute mu")
    if use_dynamic_shifting:  # Flux: diffusers' time_shift(mu, 1.0, sigmas)
        mu = dynamic_shift_mu(image_seq_len, base_shift=base_shift, max_shift=max_shift,
                              base_image_seq_len=base_image_seq_len, max_image_seq_len=max_image_seq_len)
        e_mu = math.exp(mu) if time_shift_type == "exponential" else mu

        def shifted(sigmas):
            return e_mu / (e_mu + (1 / sigmas - 1))
    else:  # SD3

        def shifted(sigmas):
            return shift * sigmas / (1 + (shift - 1) * sigmas)

    sigma_min = 1.0 / num_train_timesteps if use_dynamic_shifting else shifted(1.0 / num_train_timesteps)
    sigmas = shifted(torch.linspace(1.0, sigma_min, num_ddim_timesteps, dtype=torch.float64))
    if shift_terminal and num_ddim_timesteps > 1:  # one point is sigma 1 alone: nothing to stretch
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus * ((1 - shift_terminal) / one_minus[-1])
    return sigmas


@dataclass(frozen=True)
class FlowSkipSchedule:
    """The solver grid as ascending sigmas [N + 1], float64: sigmas[0] = 0 (data) and sigmas[1:] the N grid sigmas.

    Solver step n in 0..N-1 goes from sigma_{n+k} = sigmas[n + 1] to sigma_n = sigmas[n]: one grid interval, the
    counterpart of DDIMSkipSchedule's skip_k training timesteps. The step with n = 0 ends on the data, sigma_n = 0.
    """

    sigmas: torch.Tensor

    @classmethod
    def from_scheduler_config(cls, config: Mapping, num_ddim_timesteps: int, *,
                              image_seq_len: int | None = None) -> FlowSkipSchedule:
        """From the teacher's FlowMatchEulerDiscreteScheduler config (a dict or its `.config`); see flow_sigma_grid."""
        unsupported = [key for key in _UNSUPPORTED if config.get(key)]
        if unsupported:
            raise ValueError(f"scheduler options {unsupported} change the sigmas and are not supported")
        kwargs = {key: config[key] for key in _GRID_KEYS if config.get(key) is not None}
        grid = flow_sigma_grid(num_ddim_timesteps, image_seq_len=image_seq_len, **kwargs)
        return cls(sigmas=torch.cat([torch.zeros(1, dtype=torch.float64), grid.flip(0)]))

    def to(self, device: torch.device | str, dtype: torch.dtype) -> FlowSkipSchedule:
        """The same grid on `device` in `dtype` (built in float64 on the CPU)."""
        return FlowSkipSchedule(sigmas=self.sigmas.to(dtype).to(device))

    def sample_index(self, batch_size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Solver step n [B] int64, uniform on 0..N-1, on the grid's device (drawn there, or on the generator's)."""
        device = generator.device if generator is not None else self.sigmas.device
        n = torch.randint(0, self.sigmas.shape[0] - 1, (batch_size,), generator=generator, device=device)
        return n.to(self.sigmas.device)

    def step_sigmas(self, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma_n_plus_k, sigma_n), both [B] float64, for solver steps n [B]."""
        return self.sigmas[n + 1], self.sigmas[n]

    def sample_step(self, batch_size: int, *, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one solver step per sample: (sigma_n_plus_k, sigma_n), both [B] float64."""
        return self.step_sigmas(self.sample_index(batch_size, generator=generator))


def flow_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps, the point on the flow path (diffusers' `scale_noise`)."""
    return _col(1 - sigma, x0) * x0 + _col(sigma, x0) * eps


def x0_and_eps_from_velocity(v: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) = (x - sigma v, x + (1 - sigma) v) from a velocity v at (x, sigma)."""
    return x - _col(sigma, x) * v, x + _col(1 - sigma, x) * v


def guided_velocity(output: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                    guidance_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The velocity to step with: a guidance-distilled teacher's single output as is, or uncond + s (cond - uncond)
    for a (cond, uncond) pair (guidance.py). On v this equals guidance on x0_hat and eps_hat: both are affine in v."""
    if isinstance(output, torch.Tensor):
        return output
    if guidance_scale is None:
        raise ValueError("a (cond, uncond) teacher output needs guidance_scale")
    cond, uncond = output
    return apply_guidance(cond, uncond, guidance_scale)


def flow_consistency_function(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor,
                              sigma_end: torch.Tensor | None = None) -> torch.Tensor:
    """f(x, sigma -> sigma_end) = x + (sigma_end - sigma) v; LCM's sigma_end = 0 (None) gives x0_hat = x - sigma v.

    f(x, sigma -> sigma) = x exactly, so f(x, 0) = x: the boundary condition holds without c_skip / c_out. Expanded,
    (1 - sigma_end) x0_hat + sigma_end eps_hat: the DDIM step on the flow path, re-noising x0_hat with eps_hat.
    """
    jump = -sigma if sigma_end is None else sigma_end - sigma
    return x + _col(jump, x) * v


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """x_{sigma_to} = x + (sigma_to - sigma_from) v: FlowMatchEulerDiscreteScheduler.step, and the DDIM step."""
    return flow_consistency_function(x, v, sigma_from, sigma_to)


def heun_step(x: torch.Tensor, v_from: torch.Tensor, v_to: torch.Tensor, sigma_from: torch.Tensor,
              sigma_to: torch.Tensor) -> torch.Tensor:
    """Heun's second stage: x + (sigma_to - sigma_from) (v_from + v_to) / 2, v_to the velocity at the Euler point
    (euler_step(x, v_from, ...), sigma_to). Where sigma_to == 0: Euler (v_to unused), as FlowMatchHeun's last step."""
    to_data = (torch.as_tensor(sigma_to, device=x.device) == 0).reshape((-1,) + (1,) * (x.ndim - 1))
    return euler_step(x, torch.where(to_data, v_from, 0.5 * (v_from + v_to)), sigma_from, sigma_to)


@torch.no_grad()
def flow_solver_step(teacher: VelocityFn, x: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor, *,
                     guidance_scale: torch.Tensor | None = None, solver: str = "euler") -> torch.Tensor:
    """x at sigma_to [B] from x at sigma_from [B] along the teacher's guided velocity, under no_grad.

    The teacher is a callable, not a velocity, because Heun's second velocity is taken at a point the first call
    decides (the Euler point); both calls use the same guidance. Euler calls it once, Heun twice, except when every
    sigma_to is 0 (Heun falls back to Euler there, per sample in a mixed batch; see heun_step).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    v_from = guided_velocity(teacher(x, sigma_from), guidance_scale)
    x_euler = euler_step(x, v_from, sigma_from, sigma_to)
    if solver == "euler" or bool((torch.as_tensor(sigma_to) == 0).all()):
        return x_euler
    v_to = guided_velocity(teacher(x_euler, sigma_to), guidance_scale)
    return heun_step(x, v_from, v_to, sigma_from, sigma_to)


def flow_phase_edge_sigmas(n: torch.Tensor, schedule: FlowSkipSchedule, *, phases: int) -> torch.Tensor:
    """PCM on the flow path (pcm.py): for solver steps n [B] (from sigmas[n + 1] to sigmas[n]), the sigma of the lower
    edge of n's phase [B], sigmas[e_j] with e_j = floor(j N / phases) the largest phase start <= n (0: the data).

    Student and target both map there with flow_consistency_function(..., sigma_end): the target at sigma_n = the edge
    is x_n itself (the jump is 0), PCM's boundary condition.
    """
    starts = phase_start_indices(num_ddim_timesteps=schedule.sigmas.shape[0] - 1, phases=phases, device=n.device)
    return schedule.sigmas[phase_edge_below(n, starts)]


class FlowConsistencyPair(NamedTuple):
    prediction: torch.Tensor  # f_theta(x_{sigma_{n+k}}, sigma_{n+k} -> sigma_end): keeps the student's graph
    target: torch.Tensor  # f_target(x_{sigma_n}, sigma_n -> sigma_end): detached


def flow_consistency_pair(student_velocity: torch.Tensor, target_velocity: torch.Tensor, *, x_n_plus_k: torch.Tensor,
                          sigma_n_plus_k: torch.Tensor, x_n: torch.Tensor, sigma_n: torch.Tensor,
                          sigma_end: torch.Tensor | None = None) -> FlowConsistencyPair:
    """The two sides of LCM's loss (loss.py's consistency_loss) on one flow solver step, towards sigma_end (LCM: 0).

    student_velocity: the student's output at (x_n_plus_k, sigma_n_plus_k), with grad. target_velocity: the target
    network's at (x_n = flow_solver_step(...), sigma_n), computed by the caller under no_grad (adapters on).
    """
    prediction = flow_consistency_function(x_n_plus_k, student_velocity, sigma_n_plus_k, sigma_end)
    target = flow_consistency_function(x_n, target_velocity, sigma_n, sigma_end).detach()
    return FlowConsistencyPair(prediction=prediction, target=target)
