"""x0_and_eps_from_model_output against diffusers' DDPMScheduler/DDIMScheduler and the definitions by hand."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from lcm_plugin.lcm import PREDICTION_TYPES, x0_and_eps_from_model_output
from lcm_toy import SDXL_SCHEDULE

TIMESTEPS = [0, 19, 259, 500, 979, 999]


def _draw(*shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_exact_target_recovers_clean_sample_and_noise(schedule, prediction_type):
    # Build x_t and the ideal model output from the definitions: eps, x0, or v = alpha eps - sigma x0
    # (diffusers' DDPMScheduler.get_velocity); the map must return the x0 and eps we started from.
    x0, eps = _draw(6, 4, 8, 8, seed=1), _draw(6, 4, 8, 8, seed=2)
    t = torch.tensor(TIMESTEPS)
    alpha_t, sigma_t = schedule.alpha_sigma(t, x0.ndim)
    x_t = alpha_t * x0 + sigma_t * eps
    scheduler = DDPMScheduler.from_config(SDXL_SCHEDULE)
    scheduler.alphas_cumprod = schedule.alpha**2  # float64 table, so the test is exact
    ideal = {"epsilon": eps, "sample": x0, "v_prediction": scheduler.get_velocity(x0, eps, t)}[prediction_type]
    x0_hat, eps_hat = x0_and_eps_from_model_output(ideal, x_t, alpha_t, sigma_t, prediction_type)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-9)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("t", TIMESTEPS)
def test_x0_hat_matches_ddpm_scheduler_pred_original_sample(schedule, prediction_type, t):
    scheduler = DDPMScheduler.from_config(SDXL_SCHEDULE, prediction_type=prediction_type)
    model_output, x_t = _draw(2, 4, 8, 8, seed=3, dtype=torch.float32), _draw(2, 4, 8, 8, seed=4, dtype=torch.float32)
    expected = scheduler.step(model_output, t, x_t, generator=torch.Generator().manual_seed(0)).pred_original_sample
    alpha_t, sigma_t = schedule.to("cpu", torch.float32).alpha_sigma(torch.tensor([t, t]), x_t.ndim)
    x0_hat, _ = x0_and_eps_from_model_output(model_output, x_t, alpha_t, sigma_t, prediction_type)
    # epsilon at t = 999 divides by alpha = 0.068: float32 rounding grows, hence a relative tolerance.
    torch.testing.assert_close(x0_hat, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("t", [19, 500, 999])
def test_eps_hat_drives_diffusers_ddim_step(schedule, prediction_type, t):
    # DDIMScheduler (eta 0) moves to t_prev as alpha_prev x0 + sigma_prev eps with its own eps estimate:
    # ours must give the same point.
    scheduler = DDIMScheduler.from_config(SDXL_SCHEDULE, prediction_type=prediction_type, timestep_spacing="trailing")
    scheduler.set_timesteps(50)
    model_output, x_t = _draw(2, 4, 8, 8, seed=5, dtype=torch.float32), _draw(2, 4, 8, 8, seed=6, dtype=torch.float32)
    expected = scheduler.step(model_output, t, x_t, eta=0.0).prev_sample
    table = schedule.to("cpu", torch.float32)
    alpha_t, sigma_t = table.alpha_sigma(torch.tensor([t, t]), x_t.ndim)
    alpha_prev, sigma_prev = table.alpha_sigma(torch.tensor([max(t - 20, 0)] * 2), x_t.ndim)
    x0_hat, eps_hat = x0_and_eps_from_model_output(model_output, x_t, alpha_t, sigma_t, prediction_type)
    torch.testing.assert_close(alpha_prev * x0_hat + sigma_prev * eps_hat, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_estimates_are_consistent_with_x_t_for_any_output(schedule, prediction_type):
    # Whatever the model says, x0_hat and eps_hat must re-noise to the x_t they came from.
    model_output, x_t = _draw(6, 3, 5, seed=7), _draw(6, 3, 5, seed=8)
    alpha_t, sigma_t = schedule.alpha_sigma(torch.tensor(TIMESTEPS), x_t.ndim)
    x0_hat, eps_hat = x0_and_eps_from_model_output(model_output, x_t, alpha_t, sigma_t, prediction_type)
    torch.testing.assert_close(alpha_t * x0_hat + sigma_t * eps_hat, x_t, rtol=0, atol=1e-9)


def test_parameterisations_map_into_each_other(schedule):
    # epsilon -> (x0, eps) -> v -> (x0, eps) -> x0 -> (x0, eps): the estimates survive every change of output.
    x_t, eps_output = _draw(6, 4, 4, 4, seed=9), _draw(6, 4, 4, 4, seed=10)
    alpha_t, sigma_t = schedule.alpha_sigma(torch.tensor(TIMESTEPS), x_t.ndim)
    x0_a, eps_a = x0_and_eps_from_model_output(eps_output, x_t, alpha_t, sigma_t, "epsilon")
    x0_b, eps_b = x0_and_eps_from_model_output(alpha_t * eps_a - sigma_t * x0_a, x_t, alpha_t, sigma_t, "v_prediction")
    x0_c, eps_c = x0_and_eps_from_model_output(x0_b, x_t, alpha_t, sigma_t, "sample")
    for x0, eps in ((x0_b, eps_b), (x0_c, eps_c)):
        torch.testing.assert_close(x0, x0_a, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(eps, eps_a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_estimates_stay_in_the_latents_dtype(schedule, prediction_type, dtype):
    model_output, x_t = _draw(2, 4, 8, 8, seed=11, dtype=dtype), _draw(2, 4, 8, 8, seed=12, dtype=dtype)
    alpha_t, sigma_t = schedule.to("cpu", dtype).alpha_sigma(torch.tensor([259, 500]), x_t.ndim)
    x0_hat, eps_hat = x0_and_eps_from_model_output(model_output, x_t, alpha_t, sigma_t, prediction_type)
    assert x0_hat.dtype == dtype and eps_hat.dtype == dtype
    assert x0_hat.device == x_t.device and eps_hat.device == x_t.device
    reference, _ = x0_and_eps_from_model_output(
        model_output.double(), x_t.double(), *schedule.alpha_sigma(torch.tensor([259, 500]), 4), prediction_type
    )
    tolerance = 8 * torch.finfo(dtype).eps
    torch.testing.assert_close(x0_hat.double(), reference, rtol=tolerance, atol=tolerance)


def test_unknown_prediction_type_names_the_valid_ones(schedule):
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="prediction_type must be one of .*'epsilon'.*got 'flow'"):
        x0_and_eps_from_model_output(x, x, torch.ones(1, 1), torch.ones(1, 1), "flow")
