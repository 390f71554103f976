"""lcm.flow against diffusers' flow-matching schedulers and a closed-form Gaussian flow.

Judges: FlowMatchEulerDiscreteScheduler (grid, scale_noise, step), FlowMatchHeunDiscreteScheduler (two-call
stepping), solver.ddim_step (the jump is DDIM), and the exact rectified flow of x0 ~ N(mu, s^2) per dimension:
x_sigma ~ N((1 - sigma) mu, r^2), r = sqrt((1 - sigma)^2 s^2 + sigma^2); the ODE keeps z = (x - (1 - sigma) mu) / r,
so it maps x_sigma to mu + s z, with velocity v* = -mu + r' z, r' = (sigma - (1 - sigma) s^2) / r.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from lcm_plugin.lcm import (
    FlowSkipSchedule,
    consistency_loss,
    ddim_step,
    euler_step,
    flow_consistency_function,
    flow_consistency_pair,
    flow_noise,
    flow_sigma_grid,
    flow_solver_step,
    guided_velocity,
    heun_step,
    x0_and_eps_from_velocity,
)

SD3 = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
        "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """diffusers' FluxPipeline calculate_shift, written out independently."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _diffusers_sigmas(config, n, image_seq_len=None):
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(image_seq_len) if config.get("use_dynamic_shifting") else None
    scheduler.set_timesteps(n, mu=mu)
    return scheduler


def _col(c, x):
    return torch.as_tensor(c, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def toy_velocity(x, sigma):
    """A nonlinear velocity field that depends on both x and sigma."""
    s = _col(sigma, x)
    return torch.tanh(x) * (1 + s) - 0.3 * s + 0.1 * x * s * s


# --- 1. the grid -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 8, 50])
def test_grid_equals_diffusers_sigmas_static_shift(n):
    expected = _diffusers_sigmas(SD3, n).sigmas
    assert expected[-1] == 0
    torch.testing.assert_close(flow_sigma_grid(n, **SD3), expected[:-1].double(), rtol=0, atol=1e-6)
    schedule = FlowSkipSchedule.from_scheduler_config(FlowMatchEulerDiscreteScheduler(**SD3).config, n)
    torch.testing.assert_close(schedule.sigmas.flip(0), expected.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("image_seq_len", [1024, 4096])
@pytest.mark.parametrize("n", [8, 50])
def test_grid_equals_diffusers_sigmas_dynamic_shift(n, image_seq_len, time_shift_type):
    config = {**FLUX, "time_shift_type": time_shift_type}
    expected = _diffusers_sigmas(config, n, image_seq_len).sigmas
    schedule = FlowSkipSchedule.from_scheduler_config(
        FlowMatchEulerDiscreteScheduler(**config).config, n, image_seq_len=image_seq_len
    )
    torch.testing.assert_close(schedule.sigmas.flip(0), expected.double(), rtol=0, atol=1e-6)
    # The shift depends on the resolution and is not the config's static shift: the grids must differ.
    other = flow_sigma_grid(n, **{**FLUX, "use_dynamic_shifting": False})
    assert (schedule.sigmas.flip(0)[:-1] - other).abs().max() > 1e-2


# SimpleTuner 4.10.1's Qwen-Image training schedule (qwen_image/model.py setup_training_noise_schedule, as
# Qwen/Qwen-Image's scheduler_config.json): dynamic shifting, then stretched to end at shift_terminal 0.02.
QWEN_IMAGE = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
              "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02,
              "time_shift_type": "exponential"}


@pytest.mark.parametrize("image_seq_len", [16, 1024, 4096])
@pytest.mark.parametrize("n", [2, 8, 50])
def test_grid_equals_diffusers_sigmas_with_a_terminal_shift(n, image_seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE)
    scheduler.set_timesteps(n, mu=calculate_shift(image_seq_len, 256, 8192, 0.5, 0.9))
    schedule = FlowSkipSchedule.from_scheduler_config(scheduler.config, n, image_seq_len=image_seq_len)
    torch.testing.assert_close(schedule.sigmas.flip(0), scheduler.sigmas.double(), rtol=0, atol=1e-6)
    assert schedule.sigmas[1].item() == pytest.approx(0.02) and schedule.sigmas[-1].item() == pytest.approx(1.0)
    unstretched = flow_sigma_grid(n, **{**QWEN_IMAGE, "shift_terminal": None}, image_seq_len=image_seq_len)
    assert (schedule.sigmas.flip(0)[:-1] - unstretched).abs().max() > 1e-3


def test_grid_refuses_what_it_cannot_reproduce():
    with pytest.raises(ValueError, match="image_seq_len"):
        FlowSkipSchedule.from_scheduler_config(FLUX, 8)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowSkipSchedule.from_scheduler_config({**SD3, "use_karras_sigmas": True}, 8)


def test_sampler_draws_adjacent_grid_sigmas_uniformly():
    schedule = FlowSkipSchedule.from_scheduler_config(SD3, 8)
    n = schedule.sample_index(4000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(n, minlength=8)
    assert counts.shape[0] == 8 and counts.min() > 400 and counts.max() < 600
    start, end = schedule.step_sigmas(n)
    grid = flow_sigma_grid(8, **SD3)  # descending
    index_of_start = 7 - n
    assert torch.equal(start, grid[index_of_start])
    assert torch.equal(end[n > 0], grid[index_of_start[n > 0] + 1]) and bool((end[n == 0] == 0).all())
    start2, end2 = schedule.sample_step(5, generator=torch.Generator().manual_seed(0))
    assert start2.dtype == torch.float64 and bool((start2 > end2).all())


# --- 2-4. noising and solver steps ------------------------------------------------------------------------------


@pytest.mark.parametrize("config,image_seq_len", [(SD3, None), (FLUX, 1024)])
def test_noising_equals_scale_noise(config, image_seq_len):
    scheduler = _diffusers_sigmas(config, 10, image_seq_len)
    schedule = FlowSkipSchedule.from_scheduler_config(config, 10, image_seq_len=image_seq_len)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 4, 4, generator=gen)
    n = torch.tensor([0, 3, 7, 9])
    timesteps = scheduler.timesteps[9 - n]  # the scheduler's descending index of sigma_{n+k}
    expected = scheduler.scale_noise(x0, timesteps, eps)
    torch.testing.assert_close(flow_noise(x0, eps, schedule.step_sigmas(n)[0]), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config,image_seq_len", [(SD3, None), (FLUX, 4096)])
@pytest.mark.parametrize("n", [0, 1, 5, 9])
def test_euler_step_equals_flow_match_euler_step(config, image_seq_len, n):
    # With 10 steps the scheduler's consecutive sigmas at index 9 - n are the pair (sigma_{n+k}, sigma_n).
    scheduler = _diffusers_sigmas(config, 10, image_seq_len)
    schedule = FlowSkipSchedule.from_scheduler_config(config, 10, image_seq_len=image_seq_len)
    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 2, 4, 8, 8, generator=gen)
    expected = scheduler.step(v, scheduler.timesteps[9 - n], x).prev_sample
    start, end = schedule.step_sigmas(torch.tensor([n, n]))
    torch.testing.assert_close(euler_step(x, v, start, end), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(flow_solver_step(lambda *_: v, x, start, end), expected, rtol=1e-6, atol=1e-6)


def test_heun_walk_equals_flow_match_heun_scheduler():
    n_steps = 6
    scheduler = FlowMatchHeunDiscreteScheduler(**SD3)
    scheduler.set_timesteps(n_steps)
    schedule = FlowSkipSchedule.from_scheduler_config(SD3, n_steps)
    torch.testing.assert_close(scheduler.sigmas.unique().double(), schedule.sigmas, rtol=0, atol=1e-6)
    x_start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    x = x_start.clone()
    for t in scheduler.timesteps:  # 2N - 1 calls: Heun pairs, then one Euler step to sigma 0
        x = scheduler.step(toy_velocity(x, t / 1000), t, x).prev_sample
    ours, euler = x_start.clone(), x_start.clone()
    for n in range(n_steps - 1, -1, -1):
        start, end = schedule.step_sigmas(torch.tensor([n, n]))
        ours = flow_solver_step(toy_velocity, ours, start, end, solver="heun")
        euler = flow_solver_step(toy_velocity, euler, start, end, solver="euler")
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    assert (euler - x).abs().max() > 1e-2  # the comparison can tell the solvers apart


def test_heun_falls_back_to_euler_per_sample_at_sigma_zero():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    start = torch.tensor([0.4, 0.4, 0.9], dtype=torch.float64)
    end = torch.tensor([0.0, 0.3, 0.0], dtype=torch.float64)
    calls = []

    def teacher(x_in, sigma):
        calls.append(sigma.clone())
        return toy_velocity(x_in, sigma)

    mixed = flow_solver_step(teacher, x, start, end, solver="heun")
    assert len(calls) == 2 and torch.equal(calls[0], start) and torch.equal(calls[1], end)
    v1 = toy_velocity(x, start)
    x_euler = x + _col(end - start, x) * v1
    heun = x + _col(end - start, x) * 0.5 * (v1 + toy_velocity(x_euler, end))
    torch.testing.assert_close(mixed[1], heun[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(mixed[[0, 2]], x_euler[[0, 2]], rtol=0, atol=1e-12)
    torch.testing.assert_close(heun_step(x, v1, toy_velocity(x_euler, end), start, end), mixed, rtol=0, atol=1e-12)
    calls.clear()
    flow_solver_step(teacher, x[[0, 2]], start[[0, 2]], end[[0, 2]], solver="heun")
    assert len(calls) == 1  # no second teacher call when every sample ends on the data


# --- 5. the closed-form Gaussian flow ---------------------------------------------------------------------------

MU = torch.tensor([0.7, -1.2, 2.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)


def _r(sigma):
    return ((1 - sigma) ** 2 * S**2 + sigma**2).sqrt()


def exact_velocity(x, sigma):
    s = _col(sigma, x)
    r = _r(s)
    return -MU + (s - (1 - s) * S**2) / r * (x - (1 - s) * MU) / r


def exact_x0(x, sigma):
    """Where the ODE takes x at sigma: the consistency function a perfect student would have."""
    s = _col(sigma, x)
    return MU + S * (x - (1 - s) * MU) / _r(s)


def exact_consistency_velocity(x, sigma):
    """The student velocity whose x - sigma v is exact_x0 (at sigma = 0 it is multiplied by 0)."""
    s = _col(sigma, x)
    return torch.where(s > 0, (x - exact_x0(x, sigma)) / torch.where(s > 0, s, 1), 0)


def _integrate(x, steps, solver):
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    for a, b in itertools.pairwise(sigmas):
        x = flow_solver_step(exact_velocity, x, a.expand(x.shape[0]), b.expand(x.shape[0]), solver=solver)
    return x


def test_solvers_converge_to_the_closed_form_at_their_orders():
    eps = torch.randn(64, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x0 = MU + S * eps  # r(1) = 1: x_1 = eps maps to mu + s eps

    def error(steps, solver):
        return (_integrate(eps, steps, solver) - x0).abs().max().item()

    euler = [error(200, "euler"), error(400, "euler")]
    heun = [error(20, "heun"), error(40, "heun")]
    assert error(2000, "euler") < 5e-3
    assert 1.8 < euler[0] / euler[1] < 2.2  # first order
    assert 3.5 < heun[0] / heun[1] < 4.8  # second order, the final Euler step included
    assert heun[1] < euler[1] / 5  # 80 teacher calls beat 400


@pytest.mark.parametrize("solver,order", [("euler", 2), ("heun", 3)])
def test_exact_teacher_and_student_agree_up_to_the_local_error(solver, order):
    # One solver step of size h from sigma 0.6: the target differs from the closed-form x0 by the local error h^order.
    gen = torch.Generator().manual_seed(5)
    x0 = MU + S * torch.randn(32, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    start = torch.full((32,), 0.6, dtype=torch.float64)
    x_start = flow_noise(x0, eps, start)
    closed_form = exact_x0(x_start, start)
    errors = []
    for h in (0.1, 0.05, 0.025):
        end = start - h
        x_n = flow_solver_step(exact_velocity, x_start, start, end, solver=solver)
        pair = flow_consistency_pair(
            exact_consistency_velocity(x_start, start), exact_consistency_velocity(x_n, end),
            x_n_plus_k=x_start, sigma_n_plus_k=start, x_n=x_n, sigma_n=end,
        )
        torch.testing.assert_close(pair.prediction, closed_form, rtol=0, atol=1e-12)
        errors.append((pair.target - closed_form).abs().max().item())
    assert errors[0] > 1e-5
    for coarse, fine in itertools.pairwise(errors):
        assert 0.75 * 2**order < coarse / fine < 1.3 * 2**order

    # On the sampled grid too, ending on the data (n = 0) included.
    schedule = FlowSkipSchedule.from_scheduler_config(SD3, 200)
    start, end = schedule.step_sigmas(torch.arange(200))
    x_start = flow_noise(x0[:1].expand(200, 3), eps[:1].expand(200, 3), start)
    x_n = flow_solver_step(exact_velocity, x_start, start, end, solver=solver)
    target = flow_consistency_function(x_n, exact_consistency_velocity(x_n, end), end)
    torch.testing.assert_close(target, exact_x0(x_start, start), rtol=0, atol=2e-4)
    if solver == "heun":  # third-order local error except on the last step, where Heun is Euler
        torch.testing.assert_close(target[1:], exact_x0(x_start, start)[1:], rtol=0, atol=1e-5)
    # The teacher's own x0_hat = x - sigma v* is the posterior mean E[x0 | x], not the ODE's end: a student equal to
    # the teacher is not a consistency model, which is why the loss has something to learn.
    assert (flow_consistency_function(x_start, exact_velocity(x_start, start), start)
            - exact_x0(x_start, start)).abs().max() > 0.1


def exact_flow_map(x, sigma, sigma_end):
    """The ODE's own map from x at sigma to sigma_end: z = (x - (1 - sigma) mu) / r(sigma) is kept."""
    s, e = _col(sigma, x), _col(sigma_end, x)
    return (1 - e) * MU + _r(e) * (x - (1 - s) * MU) / _r(s)


@pytest.mark.parametrize("phases", [2, 5])
def test_a_perfect_pcm_student_samples_the_odes_endpoint_through_the_phase_edges(phases):
    """PCM on the flow path: a student that maps each grid point exactly onto the lower edge of its training step's
    phase (flow_phase_edge_sigmas), sampled by the validation sampler at `phases` steps, lands on the closed-form
    endpoint mu + s x_1: the sampler's points are the training phase edges. Stepping it through other points
    (FlowMatchEuler's own 2-step grid) does not land there."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lcm_plugin.inference import phased_flow_scheduler
    from lcm_plugin.lcm import flow_phase_edge_sigmas

    schedule = FlowSkipSchedule.from_scheduler_config(SD3, 10)
    grid = schedule.sigmas  # ascending, 0 first

    def student_velocity(x, sigma):
        i = int(torch.isclose(grid, torch.as_tensor(sigma, dtype=torch.float64), atol=1e-6).nonzero()[0])
        edge = flow_phase_edge_sigmas(torch.tensor([i - 1]), schedule, phases=phases)  # the step from grid[i]
        return (exact_flow_map(x, sigma, edge) - x) / _col(edge - sigma, x)

    def sample(sampler, x):
        for timestep in sampler.timesteps:
            sigma = float(sampler.sigmas[sampler.step_index or 0])
            x = sampler.step(student_velocity(x, torch.tensor([sigma], dtype=torch.float64)), timestep, x).prev_sample
        return x

    x_1 = torch.randn(16, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    sampler = phased_flow_scheduler(FlowMatchEulerDiscreteScheduler(**SD3).config, num_ddim_timesteps=10)
    sampler.set_timesteps(phases)
    sampler.sigmas = sampler.sigmas.double()
    torch.testing.assert_close(sample(sampler, x_1), MU + S * x_1, rtol=0, atol=1e-5)
    if phases == 2:  # FlowMatchEuler's own 2 steps go from 1 to the grid's lowest point, past the upper phase's edge
        plain = FlowMatchEulerDiscreteScheduler(**SD3)
        plain.set_timesteps(2)
        plain.sigmas = plain.sigmas.double()
        assert (sample(plain, x_1) - (MU + S * x_1)).abs().max() > 0.05


def test_boundary_condition_is_exact():
    gen = torch.Generator().manual_seed(6)
    for dtype in (torch.float64, torch.bfloat16):
        x = torch.randn(4, 3, 8, 8, generator=gen).to(dtype)
        v = (1e4 * torch.randn(4, 3, 8, 8, generator=gen)).to(dtype)
        sigma = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
        assert torch.equal(flow_consistency_function(x, v, torch.zeros(4, dtype=torch.float64)), x)
        assert torch.equal(flow_consistency_function(x, v, sigma, sigma), x)


def test_jump_to_an_end_sigma_is_the_ddim_step_on_the_flow_path():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    sigma_end = torch.tensor([0.0, 0.25, 0.1, 0.6], dtype=torch.float64)
    s, e = _col(sigma, x), _col(sigma_end, x)
    x0_hat, eps_hat = x - s * v, x + (1 - s) * v  # written out, not from the module
    torch.testing.assert_close(x0_and_eps_from_velocity(v, x, sigma), (x0_hat, eps_hat), rtol=0, atol=1e-12)
    expected = ddim_step(x0_hat, eps_hat, 1 - e, e)  # alpha = 1 - sigma on the flow path
    torch.testing.assert_close(flow_consistency_function(x, v, sigma, sigma_end), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(euler_step(x, v, sigma, sigma_end), expected, rtol=0, atol=1e-12)
    # TCD / PCM: both sides of the pair jump to the same sigma_end.
    x_n, v_n = x + 0.1, v - 0.2
    sigma_n = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64)
    pair = flow_consistency_pair(v, v_n, x_n_plus_k=x, sigma_n_plus_k=sigma, x_n=x_n, sigma_n=sigma_n,
                                 sigma_end=sigma_end)
    torch.testing.assert_close(pair.prediction, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(pair.target, x_n + (e - _col(sigma_n, x)) * v_n, rtol=0, atol=1e-12)


# --- 6. guidance ------------------------------------------------------------------------------------------------


def test_guidance():
    gen = torch.Generator().manual_seed(8)
    cond, uncond = torch.randn(2, 3, 4, 2, 2, generator=gen, dtype=torch.float64)
    for scale in (0.0, 1.0, 3.5, 8.0):
        assert torch.equal(guided_velocity((cond, cond), torch.full((3,), scale)), cond)
    torch.testing.assert_close(guided_velocity((cond, uncond), torch.ones(3)), cond, rtol=0, atol=1e-12)
    hand = guided_velocity((torch.full((2, 1), 2.0), torch.full((2, 1), 0.5)), torch.tensor([3.0, 0.0]))
    assert hand.flatten().tolist() == [5.0, 0.5]  # 0.5 + 3 (2 - 0.5); scale 0: uncond
    assert guided_velocity(cond) is cond  # guidance-distilled: the scale went into the model
    with pytest.raises(ValueError, match="guidance_scale"):
        guided_velocity((cond, uncond))


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_solver_guides_every_teacher_call(solver):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    start, end = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64), torch.tensor([0.7, 0.3, 0.1], dtype=torch.float64)
    scale = torch.tensor([1.0, 4.0, 7.5], dtype=torch.float64)

    def cfg_teacher(x_in, sigma):
        return toy_velocity(x_in, sigma), 0.5 * toy_velocity(x_in, sigma) - _col(sigma, x_in)

    def guided(x_in, sigma):  # the same guidance, written out
        cond, uncond = cfg_teacher(x_in, sigma)
        return uncond + _col(scale, x_in) * (cond - uncond)

    expected = flow_solver_step(guided, x, start, end, solver=solver)  # guidance-distilled path: one tensor
    actual = flow_solver_step(cfg_teacher, x, start, end, guidance_scale=scale, solver=solver)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    assert (actual - flow_solver_step(toy_velocity, x, start, end, solver=solver)).abs().max() > 1e-2


# --- 7. dtype, device, gradients --------------------------------------------------------------------------------


def test_bf16_in_bf16_out_and_only_the_prediction_carries_grad():
    gen = torch.Generator().manual_seed(10)
    x0, eps = torch.randn(2, 2, 4, 8, 8, generator=gen)
    schedule = FlowSkipSchedule.from_scheduler_config(SD3, 8)
    start, end = schedule.step_sigmas(torch.tensor([0, 6]))
    weight = torch.nn.Parameter(torch.tensor(0.3))

    def network(x, sigma):
        return weight * toy_velocity(x, sigma).to(x.dtype)

    x_start = flow_noise(x0.bfloat16(), eps.bfloat16(), start)
    x_n = flow_solver_step(network, x_start, start, end, solver="heun")  # a teacher with parameters: no graph
    target_velocity = network(x_n, end)  # deliberately with grad: the pair must still detach the target
    pair = flow_consistency_pair(network(x_start, start), target_velocity,
                                 x_n_plus_k=x_start, sigma_n_plus_k=start, x_n=x_n, sigma_n=end)
    for tensor in (x_start, x_n, *pair):
        assert tensor.dtype == torch.bfloat16 and tensor.device == x0.device
    assert not x_n.requires_grad and not pair.target.requires_grad and pair.prediction.requires_grad
    consistency_loss(pair.prediction, pair.target, loss_type="l2", huber_c=0.001).backward()
    assert weight.grad is not None and weight.grad != 0

    reference_start = flow_noise(x0.double(), eps.double(), start)
    tolerance = 4 * torch.finfo(torch.bfloat16).eps * 4
    torch.testing.assert_close(x_start.double(), reference_start, rtol=tolerance, atol=tolerance)
    reference_n = flow_solver_step(lambda x, sigma: 0.3 * toy_velocity(x, sigma), reference_start, start, end,
                                   solver="heun")
    torch.testing.assert_close(x_n.double(), reference_n, rtol=0.05, atol=0.05)
    assert math.isfinite(float(pair.prediction.detach().float().abs().max()))
