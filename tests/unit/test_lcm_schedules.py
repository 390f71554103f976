"""DDIMSkipSchedule against diffusers' DDPMScheduler tables and the DDIMSolver formula, recomputed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from lcm_plugin.lcm import DDIMSkipSchedule
from lcm_toy import SDXL_SCHEDULE

T = 1000


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    return DDPMScheduler.from_config(SDXL_SCHEDULE).alphas_cumprod


def test_alpha_sigma_match_sdxl_scaled_linear_betas_by_hand(alphas_cumprod):
    # SDXL: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, alpha_bar = cumprod(1 - beta).
    betas = np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1.0 - betas)
    schedule = DDIMSkipSchedule.from_alphas_cumprod(alphas_cumprod, 50)
    assert schedule.alpha.dtype == torch.float64
    # diffusers' table is float32: 1 - alpha_bar near t = 0 keeps only ~1e-7 absolute precision.
    np.testing.assert_allclose(schedule.alpha.numpy(), np.sqrt(alpha_bar), rtol=0, atol=1e-6)
    np.testing.assert_allclose(schedule.sigma.numpy(), np.sqrt(1.0 - alpha_bar), rtol=0, atol=1e-6)
    np.testing.assert_allclose((schedule.alpha**2 + schedule.sigma**2).numpy(), 1.0, rtol=1e-12)


@pytest.mark.parametrize("num_ddim_timesteps", [1, 3, 7, 50, 64, 1000])
def test_solver_timesteps_follow_diffusers_ddim_solver(alphas_cumprod, num_ddim_timesteps):
    # diffusers' DDIMSolver: step_ratio = T // N; ddim_timesteps = (arange(1, N + 1) * step_ratio).round() - 1.
    step_ratio = T // num_ddim_timesteps
    expected = (np.arange(1, num_ddim_timesteps + 1) * step_ratio).round().astype(np.int64) - 1
    schedule = DDIMSkipSchedule.from_alphas_cumprod(alphas_cumprod, num_ddim_timesteps)
    assert schedule.skip_k == step_ratio
    assert schedule.solver_timesteps.dtype == torch.int64
    np.testing.assert_array_equal(schedule.solver_timesteps.numpy(), expected)


@pytest.mark.parametrize("num_ddim_timesteps", [7, 50])
def test_sampled_steps_end_where_ddim_solver_alpha_prev_points(alphas_cumprod, num_ddim_timesteps):
    # DDIMSolver.ddim_alpha_cumprods_prev = [alpha_bar[0]] + alpha_bar[ddim_timesteps[:-1]]: the step from
    # ddim_timesteps[i] ends at ddim_timesteps[i - 1], and the first one at t = 0.
    schedule = DDIMSkipSchedule.from_alphas_cumprod(alphas_cumprod, num_ddim_timesteps)
    ddim_timesteps = schedule.solver_timesteps.numpy()
    alpha_bar = alphas_cumprod.double().numpy()
    alpha_bar_prev = np.concatenate([alpha_bar[:1], alpha_bar[ddim_timesteps[:-1]]])
    t_n_plus_k, t_n = schedule.sample_step(4000, generator=torch.Generator().manual_seed(0))
    index = np.searchsorted(ddim_timesteps, t_n_plus_k.numpy())
    np.testing.assert_array_equal(ddim_timesteps[index], t_n_plus_k.numpy())  # starts are solver timesteps
    np.testing.assert_array_equal(alpha_bar[t_n.numpy()], alpha_bar_prev[index])
    assert set(index.tolist()) == set(range(num_ddim_timesteps))  # every solver step can be drawn
    assert t_n.min() == 0 and (t_n_plus_k - t_n).max() == schedule.skip_k


def test_sample_step_is_reproducible_with_a_generator(alphas_cumprod):
    schedule = DDIMSkipSchedule.from_alphas_cumprod(alphas_cumprod, 50)
    first = schedule.sample_step(16, generator=torch.Generator().manual_seed(3))
    second = schedule.sample_step(16, generator=torch.Generator().manual_seed(3))
    for a, b in zip(first, second):
        assert torch.equal(a, b) and a.dtype == torch.int64 and a.shape == (16,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_forward_noising_matches_ddpm_add_noise_in_the_latents_dtype(alphas_cumprod, dtype):
    scheduler = DDPMScheduler.from_config(SDXL_SCHEDULE)
    schedule = DDIMSkipSchedule.from_alphas_cumprod(alphas_cumprod, 50).to("cpu", dtype)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 4, 8, 8, generator=gen).to(dtype)
    eps = torch.randn(6, 4, 8, 8, generator=gen).to(dtype)
    t = torch.tensor([0, 19, 259, 500, 979, 999])
    alpha_t, sigma_t = schedule.alpha_sigma(t, x0.ndim)
    assert alpha_t.shape == (6, 1, 1, 1) and alpha_t.dtype == dtype and sigma_t.dtype == dtype
    x_t = alpha_t * x0 + sigma_t * eps
    assert x_t.dtype == dtype
    # Reference: add_noise on the same inputs in float64 (in half precision diffusers rounds alpha_bar
    # before the square root, so it is less exact than a float64 table cast once).
    expected = scheduler.add_noise(x0.double(), eps.double(), t)
    tolerance = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(x_t.double(), expected, rtol=tolerance, atol=tolerance)


def test_to_keeps_integer_timesteps_and_float64_source(alphas_cumprod):
    schedule = DDIMSkipSchedule.from_alphas_cumprod(alphas_cumprod, 50)
    half = schedule.to("cpu", torch.float16)
    assert half.alpha.dtype == torch.float16 and half.solver_timesteps.dtype == torch.int64
    assert schedule.alpha.dtype == torch.float64  # frozen: the original is untouched


@pytest.mark.parametrize("num_ddim_timesteps", [0, -1, 1001])
def test_out_of_range_solver_resolution_is_a_clear_error(alphas_cumprod, num_ddim_timesteps):
    with pytest.raises(ValueError, match=r"num_ddim_timesteps must be in 1\.\.1000"):
        DDIMSkipSchedule.from_alphas_cumprod(alphas_cumprod, num_ddim_timesteps)
