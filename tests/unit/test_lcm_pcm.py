"""lcm_plugin.lcm.pcm: phase edges by hand, the phase of each solver step by the reference's index rule, and the
target against diffusers' TCDScheduler with gamma 0 (a deterministic jump to any earlier timestep)."""

from __future__ import annotations

import pytest
import torch
from diffusers import TCDScheduler

from lcm_plugin.lcm import ddim_step, x0_and_eps_from_model_output
from lcm_plugin.lcm.pcm import phase_edge_below, phase_edges, phased_consistency_function
from lcm_toy import SDXL_SCHEDULE


@pytest.mark.parametrize(
    ("num_ddim_timesteps", "phases", "skip_k", "expected"),
    [
        # 50 solver steps of 20: phases start at solver index 0, 12, 25, 37 (floor of 0, 12.5, 25, 37.5),
        # whose ends are timesteps 0 (clamped from -1), 239, 499, 739.
        (50, 4, 20, [0, 239, 499, 739]),
        (50, 1, 20, [0]),
        (50, 2, 20, [0, 499]),
        # 8 steps of 125: floor(0, 2.67, 5.33) = 0, 2, 5 -> 0, 249, 624.
        (8, 3, 125, [0, 249, 624]),
        (4, 4, 250, [0, 249, 499, 749]),
    ],
)
def test_phase_edges_by_hand(num_ddim_timesteps, phases, skip_k, expected):
    edges = phase_edges(num_ddim_timesteps=num_ddim_timesteps, phases=phases, skip_k=skip_k)
    assert edges.dtype == torch.int64 and edges.tolist() == expected


@pytest.mark.parametrize("phases", [0, 51])
def test_phase_count_outside_the_solver_grid_is_refused(phases):
    with pytest.raises(ValueError, match=r"phases must be in 1\.\.50"):
        phase_edges(num_ddim_timesteps=50, phases=phases, skip_k=20)


def test_edge_below_each_solver_end_by_hand():
    edges = phase_edges(num_ddim_timesteps=50, phases=4, skip_k=20)
    t_n = torch.tensor([0, 19, 219, 239, 259, 479, 499, 719, 739, 979])
    assert phase_edge_below(t_n, edges).tolist() == [0, 0, 0, 239, 239, 239, 499, 499, 739, 739]


@pytest.mark.parametrize("phases", [1, 2, 3, 4, 7, 50])
def test_edge_below_follows_the_reference_index_rule(schedule, phases):
    # The PCM reference works on solver indices: start index i (start timestep (i + 1) k - 1) belongs to the phase
    # with the largest start index e_j = floor(j N / phases) <= i, and targets that index's end timestep.
    n, k = len(schedule.solver_timesteps), schedule.skip_k
    phase_starts = [j * n // phases for j in range(phases)]
    edges = phase_edges(num_ddim_timesteps=n, phases=phases, skip_k=k)
    for i in range(n):
        e = max(start for start in phase_starts if start <= i)
        t_n = max(i * k - 1, 0)
        assert phase_edge_below(torch.tensor([t_n]), edges).item() == max(e * k - 1, 0), (i, phases)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_target_is_the_deterministic_jump_to_the_edge(schedule, prediction_type):
    gen = torch.Generator().manual_seed(0)
    x_t_n = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)
    target_output = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)
    t_n, edge = 719, 499
    alpha_t_n, sigma_t_n = schedule.alpha_sigma(torch.tensor([t_n]), 4)
    x0_target, eps_target = x0_and_eps_from_model_output(target_output, x_t_n, alpha_t_n, sigma_t_n, prediction_type)
    alpha_edge, sigma_edge = schedule.alpha_sigma(torch.tensor([edge]), 4)
    target = phased_consistency_function(x_t_n, x0_target, eps_target, t=torch.tensor([t_n]), edge=torch.tensor([edge]),
                                       alpha_edge=alpha_edge, sigma_edge=sigma_edge)

    # TCDScheduler with gamma = 0 evaluates its (first-order) trajectory function at s = t_prev exactly.
    scheduler = TCDScheduler.from_config(SDXL_SCHEDULE, prediction_type=prediction_type)
    scheduler.set_timesteps(timesteps=[t_n, edge])
    scheduler.alphas_cumprod = schedule.alpha**2
    expected = scheduler.step(target_output, t_n, x_t_n, eta=0.0).pred_noised_sample
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-12)


def test_target_at_the_edge_is_the_teacher_point_itself(schedule):
    # t_n on an edge: the boundary condition returns x_hat_{t_n} even when the target's estimates disagree with it.
    gen = torch.Generator().manual_seed(1)
    x_t_n = torch.randn(2, 4, 8, 8, generator=gen)
    x0_target = torch.randn(2, 4, 8, 8, generator=gen)
    eps_target = torch.randn(2, 4, 8, 8, generator=gen)
    t_n = torch.tensor([239, 259])
    edge = phase_edge_below(t_n, phase_edges(num_ddim_timesteps=50, phases=4, skip_k=20))
    alpha_edge, sigma_edge = schedule.to("cpu", torch.float32).alpha_sigma(edge, 4)
    target = phased_consistency_function(x_t_n, x0_target, eps_target, t=t_n, edge=edge,
                                       alpha_edge=alpha_edge, sigma_edge=sigma_edge)
    torch.testing.assert_close(target[0], x_t_n[0], rtol=0, atol=0)
    torch.testing.assert_close(target[1], ddim_step(x0_target[1], eps_target[1], alpha_edge[1], sigma_edge[1]),
                               rtol=0, atol=0)
