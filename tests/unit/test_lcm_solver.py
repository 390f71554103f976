"""ddim_step against the forward process and diffusers' DDIMScheduler (eta 0, "trailing" spacing)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from lcm_plugin.lcm import ddim_step
from lcm_toy import SDXL_SCHEDULE


def test_exact_estimates_land_on_the_forward_noised_sample(schedule):
    # If x0_hat and eps_hat are the true x0 and eps, the step must land on add_noise(x0, eps, t_n).
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 8, 8, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, 4, 8, 8, generator=gen, dtype=torch.float64)
    t_n = torch.tensor([0, 19, 479, 959, 979])
    alpha_t_n, sigma_t_n = schedule.alpha_sigma(t_n, x0.ndim)
    scheduler = DDPMScheduler.from_config(SDXL_SCHEDULE)
    scheduler.alphas_cumprod = schedule.alpha**2  # float64, so the comparison is exact
    torch.testing.assert_close(ddim_step(x0, eps, alpha_t_n, sigma_t_n), scheduler.add_noise(x0, eps, t_n),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("t_n_plus_k", [19, 39, 499, 999])
def test_one_solver_step_equals_diffusers_ddim_trailing_step(schedule, t_n_plus_k):
    # DDIMScheduler with 50 "trailing" steps walks 999, 979, ..., 19 then to alpha_bar[0] (set_alpha_to_one
    # False): exactly the solver's starts and ends, including the clamp t_n = 0.
    scheduler = DDIMScheduler.from_config(SDXL_SCHEDULE, timestep_spacing="trailing")
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.flip(0).tolist() == schedule.solver_timesteps.tolist()
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 4, 8, 8, generator=gen)
    eps_hat = torch.randn(2, 4, 8, 8, generator=gen)
    expected = scheduler.step(eps_hat, t_n_plus_k, x_t, eta=0.0).prev_sample

    table = schedule.to("cpu", torch.float32)
    alpha_start, sigma_start = table.alpha_sigma(torch.tensor([t_n_plus_k] * 2), 4)
    t_n = torch.tensor([max(t_n_plus_k - schedule.skip_k, 0)] * 2)
    x0_hat = (x_t - sigma_start * eps_hat) / alpha_start
    torch.testing.assert_close(ddim_step(x0_hat, eps_hat, *table.alpha_sigma(t_n, 4)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_step_stays_in_the_latents_dtype(schedule, dtype):
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 4, 8, 8, generator=gen).to(dtype)
    eps = torch.randn(2, 4, 8, 8, generator=gen).to(dtype)
    t_n = torch.tensor([0, 500])
    x_prev = ddim_step(x0, eps, *schedule.to("cpu", dtype).alpha_sigma(t_n, 4))
    assert x_prev.dtype == dtype and x_prev.device == x0.device
    reference = ddim_step(x0.double(), eps.double(), *schedule.alpha_sigma(t_n, 4))
    tolerance = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(x_prev.double(), reference, rtol=tolerance, atol=tolerance)
