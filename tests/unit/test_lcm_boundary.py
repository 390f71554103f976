"""c_skip / c_out and the consistency function against diffusers' LCMScheduler and hand computation."""

from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler

from lcm_plugin.lcm import (
    PREDICTION_TYPES,
    DDIMSkipSchedule,
    consistency_function,
    scalings_for_boundary_conditions,
    x0_and_eps_from_model_output,
)
from lcm_toy import SDXL_SCHEDULE


@pytest.mark.parametrize("timestep_scaling", [1.0, 10.0])
def test_scalings_match_lcm_scheduler_on_every_training_timestep(timestep_scaling):
    scheduler = LCMScheduler.from_config(SDXL_SCHEDULE, timestep_scaling=timestep_scaling)
    t = torch.arange(1000)
    c_skip, c_out = scalings_for_boundary_conditions(t.double(), timestep_scaling=timestep_scaling)
    expected = torch.tensor([scheduler.get_scalings_for_boundary_condition_discrete(i) for i in range(1000)],
                            dtype=torch.float64)
    torch.testing.assert_close(c_skip, expected[:, 0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(c_out, expected[:, 1], rtol=1e-12, atol=1e-15)


def test_boundary_condition_holds_at_t_zero():
    # f(x, 0) = x (LCM eq. 9): c_skip(0) = 1, c_out(0) = 0.
    c_skip, c_out = scalings_for_boundary_conditions(torch.tensor([0.0]), timestep_scaling=10.0)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0


def test_scalings_by_hand_at_t_one():
    # s t = 10, sigma_data = 0.5: c_skip = 0.25 / 100.25, c_out = 10 / sqrt(100.25).
    c_skip, c_out = scalings_for_boundary_conditions(torch.tensor([1.0], dtype=torch.float64), timestep_scaling=10.0)
    assert c_skip.item() == pytest.approx(0.25 / 100.25, rel=1e-15)
    assert c_out.item() == pytest.approx(10 / 100.25**0.5, rel=1e-15)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("t", [0, 19, 499, 999])
def test_consistency_function_equals_lcm_scheduler_denoised(prediction_type, t):
    scheduler = LCMScheduler.from_config(SDXL_SCHEDULE, prediction_type=prediction_type, timestep_scaling=10.0)
    scheduler.set_timesteps(timesteps=[t])
    gen = torch.Generator().manual_seed(t)
    model_output, x_t = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    expected = scheduler.step(model_output, t, x_t, generator=gen).denoised

    schedule = DDIMSkipSchedule.from_alphas_cumprod(scheduler.alphas_cumprod, 50).to("cpu", torch.float32)
    timesteps = torch.tensor([t, t])
    x0_hat, _ = x0_and_eps_from_model_output(model_output, x_t, *schedule.alpha_sigma(timesteps, 4), prediction_type)
    torch.testing.assert_close(consistency_function(x_t, x0_hat, timesteps, timestep_scaling=10.0), expected,
                               rtol=1e-5, atol=1e-5)


def test_consistency_function_at_t_zero_returns_its_input():
    gen = torch.Generator().manual_seed(0)
    x_t, x0_hat = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    out = consistency_function(x_t, x0_hat, torch.tensor([0, 0, 0]), timestep_scaling=10.0)
    assert torch.equal(out, x_t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_consistency_function_stays_in_the_latents_dtype(dtype):
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 4, 8, 8, generator=gen).to(dtype)
    x0_hat = torch.randn(2, 4, 8, 8, generator=gen).to(dtype)
    t = torch.tensor([1, 999])  # integer timesteps, as the solver draws them
    out = consistency_function(x_t, x0_hat, t, timestep_scaling=10.0)
    assert out.dtype == dtype and out.device == x_t.device
    c_skip, c_out = scalings_for_boundary_conditions(t.double(), timestep_scaling=10.0)
    reference = c_skip[:, None, None, None] * x_t.double() + c_out[:, None, None, None] * x0_hat.double()
    tolerance = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), reference, rtol=tolerance, atol=tolerance)
