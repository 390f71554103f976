"""consistency_loss: l2 and pseudo-Huber by hand; float32 result for any input dtype."""

from __future__ import annotations

import math

import pytest
import torch

from lcm_plugin.lcm import consistency_loss


def _pair(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


def test_l2_is_the_mean_squared_error():
    a, b = _pair()
    expected = sum((x - y) ** 2 for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()
    assert consistency_loss(a, b, loss_type="l2", huber_c=0.001).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("huber_c", [0.001, 0.5])
def test_huber_is_the_mean_pseudo_huber(huber_c):
    # pseudo-Huber: sqrt((a - b)^2 + c^2) - c, averaged over every element.
    a, b = _pair()
    pairs = zip(a.flatten().tolist(), b.flatten().tolist())
    expected = sum(math.sqrt((x - y) ** 2 + huber_c**2) - huber_c for x, y in pairs) / a.numel()
    assert consistency_loss(a, b, loss_type="huber", huber_c=huber_c).item() == pytest.approx(expected, rel=1e-6)


def test_huber_is_quadratic_near_zero_and_linear_far_away():
    zero = torch.zeros(1)
    small = consistency_loss(torch.tensor([0.05]), zero, loss_type="huber", huber_c=1.0).item()
    large = consistency_loss(torch.tensor([1e4]), zero, loss_type="huber", huber_c=1.0).item()
    assert small == pytest.approx(0.05**2 / 2, rel=1e-3)  # d^2 / (2 c)
    assert large == pytest.approx(1e4 - 1.0, rel=1e-6)  # |d| - c


@pytest.mark.parametrize("loss_type", ["l2", "huber"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_loss_is_computed_in_float32_for_any_input_dtype(loss_type, dtype):
    # As diffusers' scripts: the distance of low-precision tensors is taken after upcasting to float32.
    a, b = _pair(dtype)
    loss = consistency_loss(a, b, loss_type=loss_type, huber_c=0.001)
    assert loss.dtype == torch.float32 and loss.shape == ()
    expected = consistency_loss(a.double(), b.double(), loss_type=loss_type, huber_c=0.001).double()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("loss_type", ["l2", "huber"])
def test_gradient_reaches_the_prediction(loss_type):
    a, b = _pair(torch.bfloat16)
    a.requires_grad_(True)
    consistency_loss(a, b, loss_type=loss_type, huber_c=0.001).backward()
    assert a.grad is not None and a.grad.dtype == torch.bfloat16 and a.grad.abs().sum() > 0


def test_unknown_loss_type_names_the_valid_ones():
    a, b = _pair()
    with pytest.raises(ValueError, match=r"loss_type must be one of \('l2', 'huber'\), got 'l1'"):
        consistency_loss(a, b, loss_type="l1", huber_c=0.001)
