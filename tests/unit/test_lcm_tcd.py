"""lcm_plugin.lcm.tcd against diffusers' TCDScheduler (the sampler TCD students run with) and hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import TCDScheduler

from lcm_plugin.lcm import x0_and_eps_from_model_output
from lcm_plugin.lcm.tcd import sample_end_timestep, trajectory_consistency_function
from lcm_toy import SDXL_SCHEDULE


def _tcd_scheduler(schedule, prediction_type: str, timesteps: list[int]) -> TCDScheduler:
    scheduler = TCDScheduler.from_config(SDXL_SCHEDULE, prediction_type=prediction_type)
    scheduler.set_timesteps(timesteps=timesteps)
    scheduler.alphas_cumprod = schedule.alpha**2  # float64, so the comparison is exact
    return scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(("t", "t_prev", "gamma"), [(999, 759, 0.3), (759, 499, 0.0), (499, 259, 0.5), (259, 19, 1.0)])
def test_function_is_tcd_schedulers_noised_sample_and_step(schedule, prediction_type, t, t_prev, gamma):
    # TCDScheduler.step (strategic stochastic sampling) evaluates f(x_t, t, s) at s = floor((1 - gamma) t_prev),
    # then re-noises x_s to t_prev with fresh noise from the generator.
    gen = torch.Generator().manual_seed(t)
    x_t = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    model_output = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    scheduler = _tcd_scheduler(schedule, prediction_type, [t, t_prev, 0])
    expected = scheduler.step(model_output, t, x_t, eta=gamma, generator=torch.Generator().manual_seed(5))

    s = math.floor((1 - gamma) * t_prev)
    alpha_t, sigma_t = schedule.alpha_sigma(torch.tensor([t] * 3), 4)
    alpha_s, sigma_s = schedule.alpha_sigma(torch.tensor([s] * 3), 4)
    x0_hat, _ = x0_and_eps_from_model_output(model_output, x_t, alpha_t, sigma_t, prediction_type)
    x_s = trajectory_consistency_function(x_t, x0_hat, alpha_t=alpha_t, sigma_t=sigma_t, alpha_s=alpha_s, sigma_s=sigma_s)
    torch.testing.assert_close(x_s, expected.pred_noised_sample, rtol=0, atol=1e-12)

    if gamma > 0:  # forward re-noising from s to t_prev: alpha_bar_prev / alpha_bar_s of signal kept
        keep = schedule.alpha[t_prev] ** 2 / schedule.alpha[s] ** 2
        noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        torch.testing.assert_close(keep.sqrt() * x_s + (1 - keep).sqrt() * noise, expected.prev_sample, rtol=0, atol=1e-12)


def test_function_at_its_own_timestep_is_the_identity(schedule):
    # Boundary condition f(x_s, s, s) = x_s, whatever the model predicts: no c_skip/c_out needed.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    x0_hat = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(torch.tensor([0, 479]), 4)
    out = trajectory_consistency_function(x, x0_hat, alpha_t=alpha, sigma_t=sigma, alpha_s=alpha, sigma_s=sigma)
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_exact_data_estimate_lands_on_the_forward_noised_sample_at_s(schedule):
    # With x0_hat the true x0, f(x_t, t, s) = alpha_s x0 + sigma_s eps: the same noise, less of it.
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64)
    eps = torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64)
    t, s = torch.tensor([999, 999, 500, 19]), torch.tensor([0, 739, 499, 0])
    alpha_t, sigma_t = schedule.alpha_sigma(t, 4)
    alpha_s, sigma_s = schedule.alpha_sigma(s, 4)
    out = trajectory_consistency_function(alpha_t * x0 + sigma_t * eps, x0, alpha_t=alpha_t, sigma_t=sigma_t,
                                          alpha_s=alpha_s, sigma_s=sigma_s)
    torch.testing.assert_close(out, alpha_s * x0 + sigma_s * eps, rtol=0, atol=1e-12)


def test_end_timestep_is_uniform_on_the_solver_grid_up_to_t_n(schedule):
    # t_n = 479 is solver end n = 24 (24 * 20 - 1): the ends 0, 19, 39, ..., 479, 25 values, equally likely.
    draws = 50_000
    s = sample_end_timestep(torch.full((draws,), 479), skip_k=20, generator=torch.Generator().manual_seed(2))
    expected_support = [0] + [m * 20 - 1 for m in range(1, 25)]
    values, counts = torch.unique(s, return_counts=True)
    assert values.tolist() == expected_support
    share = counts.double() / draws
    # Binomial standard deviation of each share: sqrt(p (1 - p) / draws) = 0.00088; allow 5 of them.
    assert (share - 1 / 25).abs().max().item() < 5 * math.sqrt((1 / 25) * (24 / 25) / draws)


def test_end_timestep_never_passes_t_n(schedule):
    gen = torch.Generator().manual_seed(3)
    _, t_n = schedule.sample_step(4096, generator=gen)
    s = sample_end_timestep(t_n, skip_k=schedule.skip_k, generator=gen)
    assert s.dtype == torch.int64
    assert bool((s <= t_n).all()) and bool((s >= 0).all())
    assert bool(((s == 0) | ((s + 1) % schedule.skip_k == 0)).all())  # on the solver grid
    # t_n = 0 (the first solver step) leaves one choice.
    assert sample_end_timestep(torch.zeros(64, dtype=torch.int64), skip_k=20, generator=gen).eq(0).all()
