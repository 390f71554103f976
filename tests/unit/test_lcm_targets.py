"""consistency_targets / student_consistency_output against a per-sample re-implementation from diffusers'
schedulers (DDPMScheduler.add_noise, DDIMScheduler eta-0 step, LCMScheduler denoised), with toy networks."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

from lcm_plugin.lcm import (
    PREDICTION_TYPES,
    consistency_targets,
    student_consistency_output,
)
from lcm_toy import SDXL_SCHEDULE

SCALING = 10.0


def teacher(x, t):
    """(cond, uncond) outputs that depend on x and t, so mixing up inputs shows."""
    t = t.to(x.dtype).reshape(-1, 1, 1, 1)
    return 0.3 * x + 1e-3 * t, -0.2 * x + 0.5


def target_network(x, t):
    return 0.1 * x - 2e-3 * t.to(x.dtype).reshape(-1, 1, 1, 1)


def _batch(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(4, 4, 8, 8, generator=gen).to(dtype)
    noise = torch.randn(4, 4, 8, 8, generator=gen).to(dtype)
    t_n_plus_k = torch.tensor([19, 39, 519, 999])
    return latents, noise, t_n_plus_k, (t_n_plus_k - 20).clamp(min=0)


def _run(schedule, prediction_type, dtype=torch.float32, target_model=target_network, guidance=(1.0, 2.0, 4.0, 8.5)):
    latents, noise, t_n_plus_k, t_n = _batch(dtype)
    return consistency_targets(
        latents=latents, noise=noise, t_n_plus_k=t_n_plus_k, t_n=t_n,
        guidance_scale=torch.tensor(guidance, dtype=torch.float64), schedule=schedule.to("cpu", dtype),
        prediction_type=prediction_type, timestep_scaling=SCALING, teacher=teacher, target_model=target_model,
    )


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_targets_match_a_reimplementation_with_diffusers_schedulers(schedule, prediction_type):
    guidance = (1.0, 2.0, 4.0, 8.5)
    result = _run(schedule, prediction_type, guidance=guidance)
    latents, noise, t_n_plus_k, t_n = _batch()

    ddpm = DDPMScheduler.from_config(SDXL_SCHEDULE)
    x_t = ddpm.add_noise(latents, noise, t_n_plus_k)
    torch.testing.assert_close(result.x_t, x_t, rtol=1e-6, atol=1e-6)

    ddim = DDIMScheduler.from_config(SDXL_SCHEDULE, prediction_type=prediction_type, timestep_spacing="trailing")
    ddim.set_timesteps(50)  # trailing 50 steps: 999, 979, ..., 19 -> alpha_bar[0], the solver's grid
    lcm = LCMScheduler.from_config(SDXL_SCHEDULE, prediction_type=prediction_type, timestep_scaling=SCALING)
    for i in range(4):
        # Guidance on the raw output equals guidance on (x0, eps): both maps are affine in the output.
        cond, uncond = teacher(x_t[i : i + 1], t_n_plus_k[i : i + 1])
        guided = uncond + guidance[i] * (cond - uncond)
        x_t_n = ddim.step(guided, int(t_n_plus_k[i]), x_t[i : i + 1], eta=0.0).prev_sample
        torch.testing.assert_close(result.x_t_n[i : i + 1], x_t_n, rtol=1e-4, atol=1e-4)

        lcm.set_timesteps(timesteps=[int(t_n[i])])
        target_output = target_network(x_t_n, t_n[i : i + 1])
        target = lcm.step(target_output, int(t_n[i]), x_t_n, generator=torch.Generator().manual_seed(0)).denoised
        torch.testing.assert_close(result.target[i : i + 1], target, rtol=1e-4, atol=1e-4)
    assert torch.equal(result.t_n_plus_k, t_n_plus_k) and torch.equal(result.t_n, t_n)


def test_networks_are_called_at_the_right_points(schedule):
    calls = []

    def recording_teacher(x, t):
        calls.append(("teacher", x.clone(), t.clone()))
        return teacher(x, t)

    def recording_target(x, t):
        calls.append(("target", x.clone(), t.clone()))
        return target_network(x, t)

    latents, noise, t_n_plus_k, t_n = _batch()
    result = consistency_targets(
        latents=latents, noise=noise, t_n_plus_k=t_n_plus_k, t_n=t_n, guidance_scale=torch.full((4,), 3.0),
        schedule=schedule.to("cpu", torch.float32), prediction_type="epsilon", timestep_scaling=SCALING,
        teacher=recording_teacher, target_model=recording_target,
    )
    # LCM Alg. 1: the teacher at (x_{t_{n+k}}, t_{n+k}); the target network at (x_{t_n}, t_n).
    assert [name for name, _, _ in calls] == ["teacher", "target"]
    assert torch.equal(calls[0][1], result.x_t) and torch.equal(calls[0][2], t_n_plus_k)
    assert torch.equal(calls[1][1], result.x_t_n) and torch.equal(calls[1][2], t_n)


def test_target_at_t_zero_is_the_solver_output(schedule):
    # c_skip(0) = 1, c_out(0) = 0: the first solver step's target is x_{t_n} itself, whatever the target says.
    result = _run(schedule, "epsilon")
    assert result.t_n[0] == 0
    torch.testing.assert_close(result.target[0], result.x_t_n[0], rtol=0, atol=0)


def test_target_carries_no_gradient(schedule):
    network = torch.nn.Conv2d(4, 4, 1)
    result = _run(schedule, "epsilon", target_model=lambda x, t: network(x))
    assert not result.target.requires_grad and not result.x_t_n.requires_grad


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_everything_stays_in_the_latents_dtype(schedule, prediction_type, dtype):
    result = _run(schedule, prediction_type, dtype=dtype)
    for name in ("x_t", "x_t_n", "target"):
        value = getattr(result, name)
        assert value.dtype == dtype and value.device.type == "cpu", name
    reference = _run(schedule, prediction_type, dtype=torch.float64).target
    # Rounding is amplified by 1 / alpha (14.6 at t = 999) and the guidance scale, so bound each sample's error
    # by a few ulps of its own magnitude.
    error = (result.target.double() - reference).abs().amax(dim=(1, 2, 3))
    assert (error <= 16 * torch.finfo(dtype).eps * reference.abs().amax(dim=(1, 2, 3))).all(), error


def test_schedule_in_another_dtype_is_refused(schedule):
    latents, noise, t_n_plus_k, t_n = _batch()
    with pytest.raises(ValueError, match=r"schedule tables are torch\.float64 .* latents are torch\.float32"):
        consistency_targets(
            latents=latents, noise=noise, t_n_plus_k=t_n_plus_k, t_n=t_n, guidance_scale=torch.full((4,), 3.0),
            schedule=schedule, prediction_type="epsilon", timestep_scaling=SCALING,
            teacher=teacher, target_model=target_network,
        )


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_student_output_equals_lcm_scheduler_denoised_and_keeps_the_graph(schedule, prediction_type):
    latents, noise, t_n_plus_k, _ = _batch()
    x_t = DDPMScheduler.from_config(SDXL_SCHEDULE).add_noise(latents, noise, t_n_plus_k)
    model_output = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
    prediction = student_consistency_output(
        model_output, x_t=x_t, t_n_plus_k=t_n_plus_k, schedule=schedule.to("cpu", torch.float32),
        prediction_type=prediction_type, timestep_scaling=SCALING,
    )
    lcm = LCMScheduler.from_config(SDXL_SCHEDULE, prediction_type=prediction_type, timestep_scaling=SCALING)
    for i, t in enumerate(t_n_plus_k.tolist()):
        lcm.set_timesteps(timesteps=[t])
        expected = lcm.step(model_output[i : i + 1].detach(), t, x_t[i : i + 1]).denoised
        torch.testing.assert_close(prediction[i : i + 1].detach(), expected, rtol=1e-5, atol=1e-5)
    prediction.sum().backward()
    assert model_output.grad is not None and model_output.grad.abs().sum() > 0
