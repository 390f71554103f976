"""The distiller's TCD and PCM steps and its LoRA EMA target equal re-implementations written from their references.

References, re-implemented below without lcm_plugin code:
- TCD (Zheng et al. 2024, arXiv 2402.19159, eq. 9-10): the end index m uniform on 0..n, t_m = m k - 1 clamped at
  0, and the semi-linear consistency function (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) x0_hat with
  h = lambda_s - lambda_t, for the student at (x_{t_{n+k}}, t_{n+k}) and the target at (x_hat_{t_n}, t_n), both
  towards t_m (as train_tcd_distill_lora_sdxl.py of rootonchair/consistency_models_distill writes it).
- PCM (G-U-N/Phased-Consistency-Model, code/text_to_image_sd15/train_pcm_lora_sd15.py): DDIMSolver's
  `ddim_style_multiphase_pred` (phase starts floor(linspace(0, N, phases)), the DDIM jump to
  `ddim_alpha_cumprods_prev[phase start]`), online scalings c_skip = 0, c_out = 1, target scalings
  c_skip = isin(index, phase starts). The reference feeds the raw UNet output as the noise estimate (epsilon
  models); here the noise estimate is derived per prediction type, which is the same for epsilon.
- LoRA EMA target (diffusers PR #6537, `--use_target_model`): a separate target UNet whose LoRA weights are
  an EMA of the student's, updated after each optimizer step.
The teacher part (DDIMSolver tables, add_noise, separate cond / uncond calls, guidance cond + w (cond - uncond))
is diffusers' LCM-LoRA script, as in test_distiller_parity.py. Draws (solver index, w, TCD's end index) are taken
from our distiller and handed to the reference.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import TCDScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from test_distiller_parity import (
    FakeUnetModel,
    extract_into_tensor,
    family_batch,
    lora_grads,
    noise_scheduler,
    reference_inputs,
    reference_predicted_noise,
    reference_predicted_origin,
    reference_scalings,
    reference_solver,
    reference_step,
    tiny_lora_unet,
)

import lcm_plugin.simpletuner.distiller as distiller_module
from lcm_plugin import tiny_sdxl
from lcm_plugin.config import LcmConfig
from lcm_plugin.lcm import DDIMSkipSchedule
from lcm_plugin.simpletuner.distiller import LcmDistiller

# ---- reference ------------------------------------------------------------------------------------------------


def reference_tcd_map(model_output, timesteps, s_timesteps, sample, prediction_type, alphas, sigmas):
    """TCD's semi-linear consistency function from `timesteps` to `s_timesteps` (paper eq. 9, first order)."""
    t_alphas, t_sigmas = extract_into_tensor(alphas, timesteps, sample.shape), extract_into_tensor(
        sigmas, timesteps, sample.shape
    )
    s_alphas, s_sigmas = extract_into_tensor(alphas, s_timesteps, sample.shape), extract_into_tensor(
        sigmas, s_timesteps, sample.shape
    )
    h = (torch.log(s_alphas) - torch.log(s_sigmas)) - (torch.log(t_alphas) - torch.log(t_sigmas))
    pred_x_0 = reference_predicted_origin(model_output, timesteps, sample, prediction_type, alphas, sigmas)
    return s_sigmas * sample / t_sigmas - s_alphas * (torch.exp(-h) - 1.0) * pred_x_0


def reference_multiphase_pred(pred_x0, pred_noise, timestep_index, multiphase, num_ddim_timesteps,
                              ddim_alpha_cumprods_prev):
    """PCM's DDIMSolver.ddim_style_multiphase_pred: the DDIM jump to the start of the phase holding the index."""
    inference_indices = np.floor(np.linspace(0, num_ddim_timesteps, num=multiphase, endpoint=False)).astype(np.int64)
    inference_indices = torch.from_numpy(inference_indices).long()
    expanded = timestep_index.unsqueeze(1).expand(-1, inference_indices.size(0))
    last_valid = (expanded >= inference_indices).flip(dims=[1]).long().argmax(dim=1)
    phase_start = inference_indices[inference_indices.size(0) - 1 - last_valid]
    alpha_cumprod_prev = extract_into_tensor(ddim_alpha_cumprods_prev, phase_start, pred_x0.shape)
    return alpha_cumprod_prev.sqrt() * pred_x0 + (1.0 - alpha_cumprod_prev).sqrt() * pred_noise, inference_indices


def reference_variant_step(unet, scheduler, batch, index, w, cfg: LcmConfig, variant: str, end_index=None):
    """One LoRA step of `variant` ("lcm", "tcd", "pcm") with draws given; returns (loss, student map, target)."""
    latents, noise, prompt_embeds, cond_kwargs, uncond_kwargs = reference_inputs(batch)
    prediction_type, alpha_schedule, sigma_schedule, ddim_timesteps, ddim_alpha_cumprods_prev, topk = (
        reference_solver(scheduler, cfg)
    )

    start_timesteps = ddim_timesteps[index]
    timesteps = (start_timesteps - topk).clamp(min=0)
    if variant == "tcd":
        end_timesteps = (ddim_timesteps[end_index] - topk).clamp(min=0)
    noisy_model_input = scheduler.add_noise(latents, noise, start_timesteps)
    w = w.reshape(-1, 1, 1, 1).to(dtype=latents.dtype)

    def consistency_map(output, sample, t, role):
        if variant == "tcd":
            return reference_tcd_map(output, t, end_timesteps, sample, prediction_type, alpha_schedule, sigma_schedule)
        x0 = reference_predicted_origin(output, t, sample, prediction_type, alpha_schedule, sigma_schedule)
        if variant == "pcm":
            eps = reference_predicted_noise(output, t, sample, prediction_type, alpha_schedule, sigma_schedule)
            jump, phase_starts = reference_multiphase_pred(
                x0, eps, index, cfg.pcm_phases, cfg.num_ddim_timesteps, ddim_alpha_cumprods_prev.to(x0.dtype)
            )
            c_skip = torch.isin(index, phase_starts).to(x0.dtype) if role == "target" else torch.zeros_like(t, dtype=x0.dtype)
            c_skip = c_skip.reshape(-1, 1, 1, 1)
            return c_skip * sample + (1.0 - c_skip) * jump
        c_skip, c_out = [x.reshape(-1, 1, 1, 1) for x in reference_scalings(t, cfg.timestep_scaling_factor)]
        return c_skip * sample + c_out * x0

    noise_pred = unet(noisy_model_input, start_timesteps, encoder_hidden_states=prompt_embeds, **cond_kwargs).sample
    model_pred = consistency_map(noise_pred, noisy_model_input, start_timesteps, "online")

    with torch.no_grad():
        unet.disable_adapters()
        cond_output = unet(noisy_model_input, start_timesteps, encoder_hidden_states=prompt_embeds, **cond_kwargs).sample
        uncond_output = unet(
            noisy_model_input, start_timesteps, encoder_hidden_states=torch.zeros_like(prompt_embeds), **uncond_kwargs
        ).sample
        estimates = [
            (
                reference_predicted_origin(o, start_timesteps, noisy_model_input, prediction_type, alpha_schedule,
                                           sigma_schedule),
                reference_predicted_noise(o, start_timesteps, noisy_model_input, prediction_type, alpha_schedule,
                                          sigma_schedule),
            )
            for o in (cond_output, uncond_output)
        ]
        (cond_x0, cond_eps), (uncond_x0, uncond_eps) = estimates
        pred_x0 = cond_x0 + w * (cond_x0 - uncond_x0)
        pred_noise = cond_eps + w * (cond_eps - uncond_eps)
        alpha_cumprod_prev = extract_into_tensor(ddim_alpha_cumprods_prev, index, pred_x0.shape).to(latents.dtype)
        x_prev = alpha_cumprod_prev.sqrt() * pred_x0 + (1.0 - alpha_cumprod_prev).sqrt() * pred_noise
        unet.enable_adapters()
        target_output = unet(x_prev, timesteps, encoder_hidden_states=prompt_embeds, **cond_kwargs).sample
        target = consistency_map(target_output, x_prev, timesteps, "target")

    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    loss.backward()
    return loss, model_pred.detach(), target


# ---- our side ---------------------------------------------------------------------------------------------------


def fixed_solver_steps(monkeypatch, indices: list[int]) -> None:
    """Make the distiller draw these solver indices (the reference gets the same); ends are the schedule's rule."""

    def sample_step(self, batch_size, *, generator=None):
        del generator
        assert batch_size == len(indices)
        t_n_plus_k = self.solver_timesteps[torch.tensor(indices, device=self.solver_timesteps.device)]
        return t_n_plus_k, (t_n_plus_k - self.skip_k).clamp(min=0)

    monkeypatch.setattr(DDIMSkipSchedule, "sample_step", sample_step)


def our_step(distiller: LcmDistiller, batch: dict, monkeypatch):
    """Trainer order; returns (loss, prepared batch, solver index [B], diffusers' w [B])."""
    drawn = {}
    original = distiller_module.sample_guidance_scale

    def recording_guidance_scale(*args, **kwargs):
        drawn["guidance_scale"] = original(*args, **kwargs)
        return drawn["guidance_scale"]

    monkeypatch.setattr(distiller_module, "sample_guidance_scale", recording_guidance_scale)
    model = distiller.teacher_model
    prepared = distiller.prepare_batch(batch, model, {"global_step": 0})
    loss, _ = distiller.compute_distill_loss(prepared, model.model_predict(prepared), torch.tensor(0.0))
    loss.backward()
    skip_k = distiller.schedule.skip_k
    index = (prepared["timesteps"] + 1) // skip_k - 1
    return loss, prepared, index, drawn["guidance_scale"] - 1.0


def lora_distiller(cfg: LcmConfig, family: str, prediction_type: str):
    unet = tiny_lora_unet(torch.float64, family)
    model = FakeUnetModel(unet, prediction_type, family)
    return LcmDistiller(model, noise_scheduler=noise_scheduler(prediction_type, family), config=cfg)


FAMILIES = [("sdxl", "epsilon"), ("sd2_v", "v_prediction")]


def assert_same_grads(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name, grad in ours.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, theirs[name], rtol=0, atol=1e-5, msg=name)


def assert_not_lcm(target: torch.Tensor, lcm_target: torch.Tensor, rows) -> None:
    """The variant's target is not LCM's on the same draw (a silent fallback to LCM would fail here)."""
    for row in rows:
        assert (target[row] - lcm_target[row]).abs().max() > 1e-2, row


# ---- TCD ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "prediction_type"), FAMILIES)
def test_tcd_step_matches_the_reference(family, prediction_type, monkeypatch):
    cfg = LcmConfig(variant="tcd")
    indices = [49, 30, 12, 0]
    fixed_solver_steps(monkeypatch, indices)
    distiller = lora_distiller(cfg, family, prediction_type)
    torch.manual_seed(5)
    loss, prepared, index, w = our_step(distiller, family_batch(4, torch.float64, 7, family), monkeypatch)
    assert index.tolist() == indices

    t_n = prepared["timesteps"] - distiller.schedule.skip_k
    t_end = prepared["lcm_t_end"]
    assert bool((t_end <= t_n.clamp(min=0)).all())
    assert bool((t_end < t_n)[:3].any()), "no draw below t_n: the test would not see TCD's end timestep"
    end_index = (t_end + 1) // distiller.schedule.skip_k  # t_m = max(m k - 1, 0)

    reference_unet = tiny_lora_unet(torch.float64, family)
    scheduler = distiller.noise_scheduler
    batch = family_batch(4, torch.float64, 7, family)
    reference_loss, _, target = reference_variant_step(reference_unet, scheduler, batch, index, w, cfg, "tcd", end_index)
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(prepared["lcm_target"], target, rtol=0, atol=1e-5)
    assert_same_grads(lora_grads(distiller.teacher_model.unet), lora_grads(reference_unet))

    _, _, lcm_target = reference_variant_step(tiny_lora_unet(torch.float64, family), scheduler, batch, index, w, cfg,
                                              "lcm")
    assert_not_lcm(prepared["lcm_target"], lcm_target, rows=[i for i in range(3) if t_end[i] < t_n[i]])


def test_tcd_end_timesteps_are_drawn_fresh_each_step(monkeypatch):
    fixed_solver_steps(monkeypatch, [49] * 16)
    torch.manual_seed(0)
    distiller = lora_distiller(LcmConfig(variant="tcd"), "sd1", "epsilon")
    with torch.no_grad():
        ends = [distiller.prepare_batch(family_batch(16, torch.float64, s, "sd1"), None, {})["lcm_t_end"]
                for s in range(2)]
    # m uniform on 0..49: 16 draws take at most 5 distinct values with probability ~1e-10.
    assert len(set(ends[0].tolist())) > 5 and not torch.equal(ends[0], ends[1])


# ---- PCM ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "prediction_type"), FAMILIES)
def test_pcm_step_matches_the_reference(family, prediction_type, monkeypatch):
    cfg = LcmConfig(variant="pcm", pcm_phases=5)
    # 50 solver steps, 5 phases starting at indices 0, 10, 20, 30, 40. Index 10 and 0 end on a phase edge (the
    # target is the teacher's point itself); 17 and 49 jump to the edges 199 and 799.
    indices = [10, 17, 49, 0]
    fixed_solver_steps(monkeypatch, indices)
    distiller = lora_distiller(cfg, family, prediction_type)
    torch.manual_seed(6)
    loss, prepared, index, w = our_step(distiller, family_batch(4, torch.float64, 8, family), monkeypatch)
    assert prepared["lcm_t_end"].tolist() == [199, 199, 799, 0]

    reference_unet = tiny_lora_unet(torch.float64, family)
    scheduler = distiller.noise_scheduler
    batch = family_batch(4, torch.float64, 8, family)
    reference_loss, _, target = reference_variant_step(reference_unet, scheduler, batch, index, w, cfg, "pcm")
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(prepared["lcm_target"], target, rtol=0, atol=1e-5)
    assert_same_grads(lora_grads(distiller.teacher_model.unet), lora_grads(reference_unet))

    _, _, lcm_target = reference_variant_step(tiny_lora_unet(torch.float64, family), scheduler, batch, index, w, cfg,
                                              "lcm")
    assert_not_lcm(prepared["lcm_target"], lcm_target, rows=[0, 1, 2])


def test_reference_lcm_branch_is_the_parity_reference(monkeypatch):
    # The shared teacher part of reference_variant_step is diffusers' LCM-LoRA step: its "lcm" branch reproduces
    # test_distiller_parity's reference loss and gradients on the same draw.
    cfg = LcmConfig()
    scheduler = noise_scheduler("epsilon")
    index, w = torch.tensor([3, 41]), torch.tensor([4.0, 11.5], dtype=torch.float64)
    ours_unet, parity_unet = tiny_lora_unet(torch.float64), tiny_lora_unet(torch.float64)
    loss, _, _ = reference_variant_step(ours_unet, scheduler, family_batch(2, torch.float64, 3), index, w, cfg, "lcm")
    parity_loss = reference_step(parity_unet, scheduler, family_batch(2, torch.float64, 3), index, w, cfg)
    torch.testing.assert_close(loss, parity_loss, rtol=0, atol=1e-12)
    assert_same_grads(lora_grads(ours_unet), lora_grads(parity_unet))
    del monkeypatch


# ---- LoRA EMA target ----------------------------------------------------------------------------------------------


def ema_distiller(decay: float = 0.9):
    return lora_distiller(LcmConfig(lora_target_ema=True, ema_decay=decay), "sdxl", "epsilon")


def lora_parameters(distiller: LcmDistiller) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in distiller.teacher_model.unet.named_parameters() if "lora_" in name}


def perturb_ema(distiller: LcmDistiller, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for weight in distiller._ema_lora_weights().values():
        weight.add_(0.05 * torch.randn(weight.shape, generator=generator, dtype=weight.dtype))


def test_lora_ema_target_step_matches_a_separate_target_unet(monkeypatch):
    distiller = ema_distiller()
    perturb_ema(distiller, seed=1)  # the EMA lags the student, as after some training
    ema = {name: w.clone() for name, w in distiller.target_lora.items()}
    student_before = {name: p.detach().clone() for name, p in lora_parameters(distiller).items()}
    reference_unet = tiny_lora_unet(torch.float64)
    target_unet = copy.deepcopy(reference_unet)
    with torch.no_grad():
        for name, p in target_unet.named_parameters():
            if "lora_" in name:
                p.copy_(ema[name])
    torch.manual_seed(1234)
    loss, _, index, w = our_step(distiller, family_batch(3, torch.float64, 7), monkeypatch)
    cfg = distiller.lcm_config
    reference_loss = reference_step(
        reference_unet, distiller.noise_scheduler, family_batch(3, torch.float64, 7), index, w, cfg,
        target_unet=target_unet,
    )
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=1e-5)
    assert_same_grads(lora_grads(distiller.teacher_model.unet), lora_grads(reference_unet))
    # The student got its own weights back after the target's call.
    for name, p in lora_parameters(distiller).items():
        assert torch.equal(p, student_before[name]), name
    # Not the plain LCM-LoRA step (target = student): that loss differs on the same draw.
    lcm_lora_loss = reference_step(
        tiny_lora_unet(torch.float64), distiller.noise_scheduler, family_batch(3, torch.float64, 7), index, w, cfg
    )
    assert (lcm_lora_loss - reference_loss).abs() > 1e-4


def test_lora_ema_follows_the_student_after_each_optimizer_step():
    distiller = ema_distiller(decay=0.9)
    parameters = lora_parameters(distiller)
    # Trainer order: the first prepare_batch (after any resume) starts the EMA at the student's weights.
    with torch.no_grad():
        distiller.prepare_batch(family_batch(1, torch.float64, 0), None, {})
    expected = {name: p.detach().clone() for name, p in parameters.items()}
    for name, weight in distiller.target_lora.items():
        assert torch.equal(weight, expected[name]), name
    optimizer = torch.optim.SGD(parameters.values(), lr=0.1)
    generator = torch.Generator().manual_seed(2)
    for step in range(3):
        for p in parameters.values():
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        optimizer.step()
        distiller.post_training_step(distiller.teacher_model, step)
        for name, p in parameters.items():
            expected[name] = 0.9 * expected[name] + 0.1 * p.detach()
    assert distiller.target_lora.keys() == parameters.keys()
    for name, weight in distiller.target_lora.items():
        torch.testing.assert_close(weight, expected[name], rtol=0, atol=1e-12, msg=name)
        assert not torch.equal(weight, parameters[name].detach()), name


def test_lora_ema_is_saved_and_restored_with_checkpoints(tmp_path):
    distiller = ema_distiller()
    perturb_ema(distiller, seed=3)
    saved = {name: w.clone() for name, w in distiller.target_lora.items()}
    distiller.on_save_checkpoint(10, str(tmp_path))
    assert (tmp_path / distiller_module.TARGET_LORA_CHECKPOINT_FILE).is_file()
    resumed = ema_distiller()
    resumed.on_load_checkpoint(str(tmp_path))
    assert resumed.target_lora.keys() == saved.keys()
    for name, weight in resumed.target_lora.items():
        assert torch.equal(weight, saved[name]), name


def test_lora_ema_restarts_from_the_student_without_a_saved_file(tmp_path):
    distiller = ema_distiller()
    perturb_ema(distiller, seed=4)
    distiller.on_load_checkpoint(str(tmp_path))  # a checkpoint from a run without lora_target_ema
    for name, p in lora_parameters(distiller).items():
        assert torch.equal(distiller._ema_lora_weights()[name], p.detach()), name


def test_lora_ema_from_other_adapters_is_refused_with_its_path(tmp_path):
    distiller = ema_distiller()
    save_file({"not_an_adapter.lora_A.weight": torch.zeros(2)},
              str(tmp_path / distiller_module.TARGET_LORA_CHECKPOINT_FILE))
    with pytest.raises(ValueError, match="lcm_target_lora.safetensors: its EMA LoRA weights do not match"):
        distiller.on_load_checkpoint(str(tmp_path))


def test_lora_ema_without_trainable_adapters_is_a_clear_error():
    # LyCORIS keeps its weights in its own network, outside the UNet: the UNet has nothing trainable.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_sdxl.unet_config()).to(torch.float64).requires_grad_(False)
    distiller = LcmDistiller(FakeUnetModel(unet, "epsilon"), noise_scheduler=noise_scheduler("epsilon"),
                             config=LcmConfig(lora_target_ema=True))
    with pytest.raises(ValueError, match="lora_target_ema: the trained UNet has no trainable adapter weights"):
        distiller.prepare_batch(family_batch(1, torch.float64, 0), None, {})


def test_without_lora_target_ema_nothing_extra_is_saved(tmp_path):
    distiller = lora_distiller(LcmConfig(), "sdxl", "epsilon")
    distiller.on_save_checkpoint(1, str(tmp_path))
    distiller.post_training_step(distiller.teacher_model, 1)
    assert list(tmp_path.iterdir()) == [] and distiller.target_lora is None


# ---- validation schedulers ----------------------------------------------------------------------------------------


def test_tcd_validation_scheduler_keeps_gamma_whatever_the_pipeline_passes():
    distiller = lora_distiller(LcmConfig(variant="tcd", tcd_gamma=0.4), "sdxl", "epsilon")
    scheduler = distiller.get_scheduler()
    assert isinstance(scheduler, TCDScheduler)
    # Stable Diffusion pipelines pass `eta` (default 0.0) only to a step that accepts it.
    import inspect

    assert "eta" not in inspect.signature(scheduler.step).parameters

    def reference():
        tcd = TCDScheduler.from_config(distiller.noise_scheduler.config, original_inference_steps=50)
        tcd.set_timesteps(4)
        return tcd

    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == reference().timesteps.tolist() == [999, 759, 499, 259]
    gen = torch.Generator().manual_seed(0)
    sample, output = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    ours = scheduler.step(output, 999, sample, generator=torch.Generator().manual_seed(1)).prev_sample
    expected = reference().step(output, 999, sample, eta=0.4, generator=torch.Generator().manual_seed(1)).prev_sample
    deterministic = reference().step(output, 999, sample, eta=0.0).prev_sample
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert not torch.allclose(ours, deterministic)


def test_pcm_validation_scheduler_jumps_from_phase_top_to_phase_edge():
    cfg = LcmConfig(variant="pcm", pcm_phases=5)
    distiller = lora_distiller(cfg, "sdxl", "epsilon")
    scheduler = distiller.get_scheduler()
    scheduler.set_timesteps(cfg.pcm_phases)
    # Phase j covers solver starts 10 j .. 10 j + 9 (timesteps 200 j + 19 .. 200 j + 199); its edge is 200 j - 1.
    assert scheduler.timesteps.tolist() == [999, 799, 599, 399, 199]
    gen = torch.Generator().manual_seed(0)
    sample, output = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    step = scheduler.step(output, 999, sample, generator=torch.Generator().manual_seed(1))
    # Deterministic: prev_sample is the DDIM jump to the edge 799 (gamma 0: no fresh noise).
    alphas_cumprod = scheduler.alphas_cumprod
    x0 = (sample - (1 - alphas_cumprod[999]).sqrt() * output) / alphas_cumprod[999].sqrt()
    jump = alphas_cumprod[799].sqrt() * x0 + (1 - alphas_cumprod[799]).sqrt() * output
    torch.testing.assert_close(step.prev_sample, jump, rtol=1e-5, atol=1e-5)


def test_lcm_validation_scheduler_is_unchanged():
    scheduler = lora_distiller(LcmConfig(), "sdxl", "epsilon").get_scheduler()
    assert type(scheduler).__name__ == "LCMScheduler"
    assert scheduler.config.original_inference_steps == 50


# ---- config -------------------------------------------------------------------------------------------------------


def test_defaults_are_the_reference_lcm_step():
    config = LcmConfig()
    assert (config.variant, config.lora_target_ema) == ("lcm", False)


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ({"variant": "sdxl-turbo"}, "variant"),
        ({"tcd_gamma": 1.5}, "tcd_gamma"),
        ({"pcm_phases": 0}, "pcm_phases"),
        ({"variant": "pcm", "pcm_phases": 4}, "pcm_phases"),  # 4 does not divide 50
        ({"variant": "pcm", "num_ddim_timesteps": 30, "pcm_phases": 4}, "pcm_phases"),
    ],
)
def test_invalid_variant_settings_fail_at_their_field(block, field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as raised:
        LcmConfig.model_validate(block)
    assert [error["loc"] for error in raised.value.errors()] == [(field,)]


def test_phase_count_error_names_the_divisors():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"must divide num_ddim_timesteps \(50\).*\[1, 2, 5, 10, 25, 50\]"):
        LcmConfig(variant="pcm", pcm_phases=4)
    # Unused by the other variants, so not checked there; 100 solver steps take 4 phases.
    assert LcmConfig(pcm_phases=4).pcm_phases == 4
    assert LcmConfig(variant="pcm", num_ddim_timesteps=100, pcm_phases=4).pcm_phases == 4
