"""Guidance: SimpleTuner's CFG scale s against diffusers' LCM form cond + w (cond - uncond), w = s - 1."""

from __future__ import annotations

import pytest
import torch

from lcm_plugin.lcm import apply_guidance, sample_guidance_scale


def _pair(shape, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    uncond = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return cond, uncond


@pytest.mark.parametrize("shape", [(5, 4, 8, 8), (5, 3)])
def test_cfg_scale_equals_diffusers_lcm_w_plus_one(shape):
    # diffusers' train_lcm_distill_*: pred = cond + w * (cond - uncond). Ours with s = w + 1 must agree.
    cond, uncond = _pair(shape)
    s = torch.tensor([1.0, 1.5, 3.0, 8.5, 16.0], dtype=torch.float64)
    w = (s - 1).reshape((-1,) + (1,) * (len(shape) - 1))
    torch.testing.assert_close(apply_guidance(cond, uncond, s), cond + w * (cond - uncond), rtol=1e-12, atol=1e-12)


def test_scale_one_is_conditional_and_zero_is_unconditional():
    cond, uncond = _pair((2, 4, 2, 2))
    torch.testing.assert_close(apply_guidance(cond, uncond, torch.ones(2)), cond, rtol=0, atol=1e-12)
    torch.testing.assert_close(apply_guidance(cond, uncond, torch.zeros(2)), uncond, rtol=0, atol=0)


def test_each_sample_gets_its_own_scale():
    cond, uncond = _pair((3, 4, 2, 2))
    s = torch.tensor([2.0, 5.0, 9.0], dtype=torch.float64)
    guided = apply_guidance(cond, uncond, s)
    for i in range(3):
        torch.testing.assert_close(guided[i], uncond[i] + s[i] * (cond[i] - uncond[i]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_guided_estimate_stays_in_the_latents_dtype(dtype):
    cond, uncond = _pair((2, 4, 8, 8), dtype)
    s = torch.tensor([4.0, 8.5], dtype=torch.float64)  # sampled scales are float64
    guided = apply_guidance(cond, uncond, s)
    assert guided.dtype == dtype and guided.device == cond.device
    reference = apply_guidance(cond.double(), uncond.double(), s)
    tolerance = 32 * torch.finfo(dtype).eps  # |s (cond - uncond)| reaches ~50 here
    torch.testing.assert_close(guided.double(), reference, rtol=tolerance, atol=tolerance)


def test_sampled_scales_are_uniform_on_the_range():
    s = sample_guidance_scale(20000, w_min=4.0, w_max=16.0, generator=torch.Generator().manual_seed(0))
    assert s.shape == (20000,) and s.dtype == torch.float32  # drawn on the device: no float64 (MPS refuses it)
    assert s.min() >= 4.0 and s.max() <= 16.0
    # U[4, 16]: mean 10, standard deviation 12 / sqrt(12); 5 standard errors of slack.
    assert abs(s.mean().item() - 10.0) < 5 * (12 / 12**0.5) / 20000**0.5
    assert abs(s.std().item() - 12 / 12**0.5) < 0.05
    histogram = torch.histc(s, bins=4, min=4.0, max=16.0)
    assert (histogram - 5000).abs().max() < 300


def test_equal_bounds_give_fixed_guidance():
    # The LCM-LoRA report's omega = 7.5 is s = 8.5 in SimpleTuner's convention.
    s = sample_guidance_scale(7, w_min=8.5, w_max=8.5)
    assert torch.equal(s, torch.full((7,), 8.5))


def test_sampled_scales_are_reproducible_with_a_generator():
    first = sample_guidance_scale(8, w_min=3.0, w_max=15.0, generator=torch.Generator().manual_seed(4))
    second = sample_guidance_scale(8, w_min=3.0, w_max=15.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, second)
    assert len(set(first.tolist())) == 8  # per sample, not one scale per batch
