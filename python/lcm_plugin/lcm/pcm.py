"""Phased Consistency Models (PCM; Wang et al. 2024, arXiv 2405.18407): consistency within each of k phases.

PCM cuts the solver grid into `phases` sub-trajectories. Each phase is consistent towards its own lower edge,
not towards x_0. A k-step sampler then visits exactly the phase edges, and every step is deterministic
(no fresh noise between steps, unlike LCM).
- Phase edges: of the N solver steps, phase j starts at solver index e_j = floor(j N / k), j = 0..k-1
  (the split of the PCM reference's `ddim_style_multiphase_pred`). Its lower edge is that index's end
  timestep max(e_j skip_k - 1, 0), so edge 0 is timestep 0.
- The edge of a training step t_{n+k} -> t_n is the largest edge <= t_n, so both ends lie in one phase.
- Student and target map to that edge with the DDIM step (first-order solver) of their own estimates:
  student from (x_{t_{n+k}}, t_{n+k}), target from (x_hat_{t_n}, t_n). When t_n is the edge itself, the
  target is x_hat_{t_n} unchanged: the boundary condition (the reference's c_skip = 1 there).
- Sampling: with phases dividing the solver grid, LCMScheduler / TCDScheduler / trailing DDIM at k steps
  visit exactly the phase tops and edges; TCDScheduler at gamma 0 (deterministic) is the reference's sampler.
- On the flow path (flow.py, flow_phase_edge_sigmas) the phases split the teacher's sigma grid the same way, and the
  DDIM jump to the edge is the flow consistency function's; the sampler is Euler through the edges (the PCM
  reference's SD3 scheduler, `pcm_fm_deterministic_scheduler.py`).
"""

from __future__ import annotations

import torch

from lcm_plugin.lcm.solver import ddim_step


def phase_start_indices(*, num_ddim_timesteps: int, phases: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The solver index e_j = floor(j N / phases) each phase starts at, ascending, int64 [phases]; the first is 0."""
    if not 1 <= phases <= num_ddim_timesteps:
        raise ValueError(
            f"phases must be in 1..{num_ddim_timesteps} (num_ddim_timesteps: each phase needs a solver step), got {phases}"
        )
    return torch.div(torch.arange(phases, device=device) * num_ddim_timesteps, phases, rounding_mode="floor")


def phase_edges(*, num_ddim_timesteps: int, phases: int, skip_k: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """The lower edge timestep of each phase, ascending, int64 [phases] on `device`; the first is 0."""
    start_index = phase_start_indices(num_ddim_timesteps=num_ddim_timesteps, phases=phases, device=device)
    return (start_index * skip_k - 1).clamp(min=0)


def phase_edge_below(t_n: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """For each solver end t_n [B], the largest phase edge <= t_n, [B] int64 (edges on t_n's device)."""
    below = torch.searchsorted(edges, t_n, right=True) - 1
    return edges[below]


def phased_consistency_function(
    x_t: torch.Tensor,
    x0_hat: torch.Tensor,
    eps_hat: torch.Tensor,
    *,
    t: torch.Tensor,
    edge: torch.Tensor,
    alpha_edge: torch.Tensor,
    sigma_edge: torch.Tensor,
) -> torch.Tensor:
    """A network's estimate of the trajectory point at its phase's edge, from its estimates at (x_t, t).

    x_t, x0_hat, eps_hat: [B, C, H, W]; t, edge: [B]; alpha_edge, sigma_edge: [B, 1, 1, 1] at `edge`.
    Student: (x_{t_{n+k}}, t_{n+k}), never on an edge, so always the DDIM jump (the reference's online
    c_skip = 0). Target: (x_hat_{t_n}, t_n), which returns x_hat_{t_n} itself when t_n is the edge.
    """
    at_edge = (t == edge).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return torch.where(at_edge, x_t, ddim_step(x0_hat, eps_hat, alpha_edge, sigma_edge))
