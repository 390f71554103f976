"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest
from diffusers import DDPMScheduler

from lcm_plugin.lcm import DDIMSkipSchedule
from lcm_toy import SDXL_SCHEDULE


@pytest.fixture(scope="session")
def schedule() -> DDIMSkipSchedule:
    """SDXL's training schedule on a 50-step DDIM solver grid, float64 tables on the CPU."""
    return DDIMSkipSchedule.from_alphas_cumprod(DDPMScheduler.from_config(SDXL_SCHEDULE).alphas_cumprod, 50)
