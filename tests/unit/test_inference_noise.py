"""lcm_plugin.inference.adds_noise_between_steps against diffusers' own schedulers: a sampler draws fresh noise
between steps exactly when two generators give two different results for the same non-final step."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from lcm_plugin.config import LcmConfig
from lcm_plugin.inference import adds_noise_between_steps, variant_scheduler

SDXL_SCHEDULE = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config


@pytest.mark.parametrize("settings", [{}, {"variant": "tcd"}, {"variant": "tcd", "tcd_gamma": 0.0},
                                      {"variant": "pcm"}, {"variant": "pcm", "pcm_phases": 5}])
def test_the_answer_is_what_the_variants_scheduler_does(settings):
    lcm = LcmConfig.model_validate(settings)
    scheduler = variant_scheduler(SDXL_SCHEDULE, lcm)
    scheduler.set_timesteps(4)
    sample, output = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    first = scheduler.timesteps[0]

    def step(seed: int) -> torch.Tensor:
        scheduler._step_index = None  # each call is the first step again
        return scheduler.step(output, first, sample, generator=torch.Generator().manual_seed(seed)).prev_sample

    assert adds_noise_between_steps(lcm) == (not torch.equal(step(0), step(1)))
