"""LcmDistiller's step equals diffusers' LCM distillation step (re-implemented below), for every UNet family.

The reference follows diffusers' train_lcm_distill_lora_sdxl.py (SDXL) and train_lcm_distill_lora_sd.py (SD 1.x,
SD 2.x: no added conditions, the uncond branch is the zero prompt alone) line by line: DDIMSolver tables from
numpy, DDPMScheduler.add_noise, separate cond / uncond teacher calls with adapters disabled, diffusers' guidance
`cond + w (cond - uncond)` on x0 and eps, the target from the student with adapters enabled under no_grad. Our
side runs the real DistillationBase subclass through a minimal fake of SimpleTuner's model object, whose
model_predict makes the same UNet call as SimpleTuner's SDXL or SD 1.x `_model_predict_single`. Random draws
(solver index, guidance scale) are read from our distiller and handed to the reference.

Families: "sdxl" (tiny_sdxl, epsilon or v), "sd1" (tiny_sd, epsilon), "sd2_v" (tiny_sd, v-prediction, SD 2.x's
attention layout and scheduler).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from simpletuner.helpers.models.common import PredictionTypes

import lcm_plugin.simpletuner.distiller as distiller_module
from lcm_plugin import tiny_sd, tiny_sdxl
from lcm_plugin.config import LcmConfig
from lcm_plugin.simpletuner.distiller import LcmDistiller

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def is_sdxl(family: str) -> bool:
    return family == "sdxl"


def unet_config(family: str) -> dict:
    return tiny_sdxl.unet_config() if is_sdxl(family) else tiny_sd.unet_config(family)


class FakeUnetModel:
    """The parts of SimpleTuner's SDXL / SD 1.x model object the trainer and DistillationBase touch."""

    def __init__(self, unet: UNet2DConditionModel, prediction_type: str, family: str = "sdxl"):
        self.unet = unet
        self.family = family
        self.PREDICTION_TYPE = PredictionTypes.from_str(prediction_type)
        self.config = SimpleNamespace(lora_type="standard")

    def get_trained_component(self):
        return self.unet

    def model_predict(self, prepared_batch):
        if is_sdxl(self.family):
            # Same call as simpletuner.helpers.models.sdxl.model.SDXL._model_predict_single.
            prediction = self.unet(
                prepared_batch["noisy_latents"],
                prepared_batch["timesteps"],
                prepared_batch["encoder_hidden_states"],
                prepared_batch["add_text_embeds"],
                added_cond_kwargs=prepared_batch["added_cond_kwargs"],
                return_dict=False,
            )[0]
        else:
            # Same call as simpletuner.helpers.models.sd1x.model.StableDiffusion1._model_predict_single.
            prediction = self.unet(
                prepared_batch["noisy_latents"],
                prepared_batch["timesteps"],
                prepared_batch["encoder_hidden_states"],
                cross_attention_kwargs=None,
                return_dict=False,
            )[0]
        return {"model_prediction": prediction}


def tiny_lora_unet(dtype: torch.dtype, family: str = "sdxl") -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(family))
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    # PEFT starts lora_B at zero (student == teacher); make the adapters matter so that a target computed
    # with the teacher instead of the student cannot pass.
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2)
    return unet.to(dtype)


# The family's training schedule (SimpleTuner loads a DDPMScheduler from the checkpoint's scheduler config).
SCHEDULER_CONFIGS = {
    "sdxl": tiny_sdxl.SDXL_SCHEDULER_CONFIG,
    "sd1": tiny_sd.SD1_SCHEDULER_CONFIG,
    "sd2_v": tiny_sd.SD2_V_SCHEDULER_CONFIG,
}


def noise_scheduler(prediction_type: str, family: str = "sdxl") -> DDPMScheduler:
    return DDPMScheduler.from_config({**SCHEDULER_CONFIGS[family], "prediction_type": prediction_type})


def family_batch(batch_size: int, dtype: torch.dtype, seed: int, family: str = "sdxl") -> dict:
    """What SimpleTuner's ModelFoundation.prepare_batch hands the distiller: SDXL's pooled embedding and time_ids,
    or (SD 1.x/2.x) an empty added_cond_kwargs."""
    generator = torch.Generator().manual_seed(seed)
    sdxl = is_sdxl(family)
    pooled = torch.randn(batch_size, tiny_sdxl.POOLED_DIM, generator=generator, dtype=dtype) if sdxl else None
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]], dtype=dtype).repeat(batch_size, 1)
    batch = {
        "latents": torch.randn(batch_size, 4, 8, 8, generator=generator, dtype=dtype),
        "noise": torch.randn(batch_size, 4, 8, 8, generator=generator, dtype=dtype),
        "encoder_hidden_states": torch.randn(
            batch_size, tiny_sdxl.MAX_TOKENS, unet_config(family)["cross_attention_dim"], generator=generator,
            dtype=dtype,
        ),
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids} if sdxl else {},
    }
    if sdxl:
        batch["add_text_embeds"] = pooled
    return batch


# ---- reference: diffusers' train_lcm_distill_lora_sdxl.py, one step, draws given -------------------------------


def extract_into_tensor(a, t, x_shape):
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def reference_scalings(timestep, timestep_scaling, sigma_data=0.5):
    scaled = timestep_scaling * timestep
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


def reference_predicted_origin(model_output, timesteps, sample, prediction_type, alphas, sigmas):
    sigmas = extract_into_tensor(sigmas, timesteps, sample.shape)
    alphas = extract_into_tensor(alphas, timesteps, sample.shape)
    if prediction_type == "epsilon":
        return (sample - sigmas * model_output) / alphas
    if prediction_type == "v_prediction":
        return alphas * sample - sigmas * model_output
    raise ValueError(prediction_type)


def reference_predicted_noise(model_output, timesteps, sample, prediction_type, alphas, sigmas):
    sigmas = extract_into_tensor(sigmas, timesteps, sample.shape)
    alphas = extract_into_tensor(alphas, timesteps, sample.shape)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alphas * model_output + sigmas * sample
    raise ValueError(prediction_type)


def reference_inputs(batch):
    """The script's batch unpacking: (latents, noise, prompt_embeds, cond_kwargs, uncond_kwargs)."""
    encoded_text = dict(batch["added_cond_kwargs"])
    # The SD 1.x/2.x script passes no added_cond_kwargs at all; SDXL's uncond zeroes the pooled embedding.
    cond_kwargs = {"added_cond_kwargs": encoded_text} if encoded_text else {}
    uncond_kwargs = (
        {"added_cond_kwargs": {**encoded_text, "text_embeds": torch.zeros_like(encoded_text["text_embeds"])}}
        if encoded_text else {}
    )
    return batch["latents"], batch["noise"], batch["encoder_hidden_states"], cond_kwargs, uncond_kwargs


def reference_solver(scheduler, cfg: LcmConfig, device: torch.device | str = "cpu"):
    """The script's schedules and DDIMSolver: (prediction_type, alpha_schedule, sigma_schedule, ddim_timesteps,
    ddim_alpha_cumprods_prev, topk), moved to `device` as the script moves them to `accelerator.device`."""
    num_train_timesteps = scheduler.config.num_train_timesteps
    alpha_cumprods = scheduler.alphas_cumprod.numpy()
    topk = num_train_timesteps // cfg.num_ddim_timesteps
    ddim_timesteps = (np.arange(1, cfg.num_ddim_timesteps + 1) * topk).round().astype(np.int64) - 1
    ddim_alpha_cumprods_prev = torch.from_numpy(
        np.asarray([alpha_cumprods[0]] + alpha_cumprods[ddim_timesteps[:-1]].tolist())
    )
    return (
        scheduler.config.prediction_type,
        torch.sqrt(scheduler.alphas_cumprod).to(device),
        torch.sqrt(1 - scheduler.alphas_cumprod).to(device),
        torch.from_numpy(ddim_timesteps).long().to(device),
        ddim_alpha_cumprods_prev.to(device),
        topk,
    )


def reference_step(unet, scheduler, batch, index, w, cfg: LcmConfig, teacher_unet=None, target_unet=None):
    """diffusers' step with `index` (solver index) and `w` (diffusers' guidance, [B]) given; returns the loss.

    LoRA script: teacher = `unet` with adapters disabled, target = `unet`. Full-model script
    (train_lcm_distill_sdxl_wds.py, without its guidance embedding): separate `teacher_unet` and `target_unet`.
    """
    teacher_unet = unet if teacher_unet is None else teacher_unet
    target_unet = unet if target_unet is None else target_unet
    latents, noise, prompt_embeds, cond_kwargs, uncond_kwargs = reference_inputs(batch)
    prediction_type, alpha_schedule, sigma_schedule, ddim_timesteps, ddim_alpha_cumprods_prev, topk = (
        reference_solver(scheduler, cfg, latents.device)
    )
    start_timesteps = ddim_timesteps[index]
    timesteps = start_timesteps - topk
    timesteps = torch.where(timesteps < 0, torch.zeros_like(timesteps), timesteps)
    c_skip_start, c_out_start = [
        x.reshape(-1, 1, 1, 1) for x in reference_scalings(start_timesteps, cfg.timestep_scaling_factor)
    ]
    c_skip, c_out = [x.reshape(-1, 1, 1, 1) for x in reference_scalings(timesteps, cfg.timestep_scaling_factor)]
    noisy_model_input = scheduler.add_noise(latents, noise, start_timesteps)
    w = w.reshape(-1, 1, 1, 1).to(dtype=latents.dtype)

    noise_pred = unet(noisy_model_input, start_timesteps, encoder_hidden_states=prompt_embeds, **cond_kwargs).sample
    pred_x_0 = reference_predicted_origin(
        noise_pred, start_timesteps, noisy_model_input, prediction_type, alpha_schedule, sigma_schedule
    )
    model_pred = c_skip_start * noisy_model_input + c_out_start * pred_x_0

    with torch.no_grad():
        if teacher_unet is unet:
            unet.disable_adapters()
        cond_teacher_output = teacher_unet(
            noisy_model_input, start_timesteps, encoder_hidden_states=prompt_embeds, **cond_kwargs
        ).sample
        cond_pred_x0 = reference_predicted_origin(
            cond_teacher_output, start_timesteps, noisy_model_input, prediction_type, alpha_schedule, sigma_schedule
        )
        cond_pred_noise = reference_predicted_noise(
            cond_teacher_output, start_timesteps, noisy_model_input, prediction_type, alpha_schedule, sigma_schedule
        )
        uncond_teacher_output = teacher_unet(
            noisy_model_input, start_timesteps, encoder_hidden_states=torch.zeros_like(prompt_embeds), **uncond_kwargs
        ).sample
        uncond_pred_x0 = reference_predicted_origin(
            uncond_teacher_output, start_timesteps, noisy_model_input, prediction_type, alpha_schedule, sigma_schedule
        )
        uncond_pred_noise = reference_predicted_noise(
            uncond_teacher_output, start_timesteps, noisy_model_input, prediction_type, alpha_schedule, sigma_schedule
        )
        pred_x0 = cond_pred_x0 + w * (cond_pred_x0 - uncond_pred_x0)
        pred_noise = cond_pred_noise + w * (cond_pred_noise - uncond_pred_noise)
        alpha_cumprod_prev = extract_into_tensor(ddim_alpha_cumprods_prev, index, pred_x0.shape).to(latents.dtype)
        x_prev = alpha_cumprod_prev.sqrt() * pred_x0 + (1.0 - alpha_cumprod_prev).sqrt() * pred_noise
        if teacher_unet is unet:
            unet.enable_adapters()

        target_noise_pred = target_unet(x_prev, timesteps, encoder_hidden_states=prompt_embeds, **cond_kwargs).sample
        pred_x_0 = reference_predicted_origin(
            target_noise_pred, timesteps, x_prev, prediction_type, alpha_schedule, sigma_schedule
        )
        target = c_skip * x_prev + c_out * pred_x_0

    if cfg.loss_type == "l2":
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    else:
        loss = torch.mean(torch.sqrt((model_pred.float() - target.float()) ** 2 + cfg.huber_c**2) - cfg.huber_c)
    loss.backward()
    return loss


# ---- our step ----------------------------------------------------------------------------------------------------


def our_step(unet, scheduler, batch, cfg: LcmConfig, monkeypatch, distiller=None, family: str = "sdxl"):
    """Trainer order: distiller.prepare_batch, model.model_predict, distiller.compute_distill_loss, backward.

    Returns (loss, logs, solver index [B], diffusers' w [B]) so the reference can replay the same draws.
    """
    drawn = {}

    def recording_guidance_scale(*args, **kwargs):
        drawn["guidance_scale"] = distiller_module_sample_guidance_scale(*args, **kwargs)
        return drawn["guidance_scale"]

    distiller_module_sample_guidance_scale = distiller_module.sample_guidance_scale
    monkeypatch.setattr(distiller_module, "sample_guidance_scale", recording_guidance_scale)
    model = distiller.teacher_model if distiller else FakeUnetModel(unet, scheduler.config.prediction_type, family)
    distiller = distiller or LcmDistiller(model, noise_scheduler=scheduler, config=cfg)
    prepared = distiller.prepare_batch(batch, model, {"global_step": 0})
    loss, logs = distiller.compute_distill_loss(prepared, model.model_predict(prepared), torch.tensor(0.0))
    loss.backward()
    skip_k = scheduler.config.num_train_timesteps // cfg.num_ddim_timesteps
    index = (prepared["timesteps"] + 1) // skip_k - 1
    # SimpleTuner's CFG scale s is diffusers' w + 1.
    return loss, logs, index, drawn["guidance_scale"] - 1.0


def lora_grads(unet) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in unet.named_parameters() if "lora_" in name}


def run_both(prediction_type, loss_type, batch_size, dtype, monkeypatch, family="sdxl", **lcm_settings):
    cfg = LcmConfig(loss_type=loss_type, **lcm_settings)
    scheduler = noise_scheduler(prediction_type, family)
    ours_unet, reference_unet = tiny_lora_unet(dtype, family), tiny_lora_unet(dtype, family)
    torch.manual_seed(1234)
    loss, logs, index, w = our_step(
        ours_unet, scheduler, family_batch(batch_size, dtype, 7, family), cfg, monkeypatch, family=family
    )
    reference_loss = reference_step(
        reference_unet, scheduler, family_batch(batch_size, dtype, 7, family), index, w, cfg
    )
    return loss, logs, reference_loss, lora_grads(ours_unet), lora_grads(reference_unet)


@pytest.mark.parametrize(
    ("family", "prediction_type", "loss_type", "batch_size"),
    [
        ("sdxl", "epsilon", "l2", 3),
        ("sdxl", "epsilon", "huber", 2),
        ("sdxl", "v_prediction", "l2", 1),
        ("sd1", "epsilon", "l2", 2),
        ("sd1", "epsilon", "huber", 1),
        ("sd2_v", "v_prediction", "l2", 2),
        ("sd2_v", "v_prediction", "huber", 1),
    ],
)
def test_loss_and_lora_grads_match_diffusers_step(family, prediction_type, loss_type, batch_size, monkeypatch):
    loss, logs, reference_loss, grads, reference_grads = run_both(
        prediction_type, loss_type, batch_size, torch.float64, monkeypatch, family, num_ddim_timesteps=50
    )
    assert loss.dtype == torch.float32 and reference_loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=1e-5)
    assert logs == {"lcm_loss": pytest.approx(reference_loss.item(), abs=1e-5)}
    assert grads.keys() == reference_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, reference_grads[name], rtol=0, atol=1e-5, msg=name)


def test_parity_holds_in_float32_with_fixed_guidance(monkeypatch):
    # Fixed guidance (w_min == w_max, LCM-LoRA's omega = 7.5 is s = 8.5) and a coarse solver grid, float32.
    loss, _, reference_loss, grads, reference_grads = run_both(
        "epsilon", "l2", 2, torch.float32, monkeypatch, w_min=8.5, w_max=8.5, num_ddim_timesteps=10
    )
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_half_precision_latents_get_float32_arithmetic_and_keep_their_device(monkeypatch):
    del monkeypatch
    cfg = LcmConfig()
    scheduler = noise_scheduler("epsilon")
    unet = tiny_lora_unet(torch.bfloat16)
    model = FakeUnetModel(unet, "epsilon")
    distiller = LcmDistiller(model, noise_scheduler=scheduler, config=cfg)
    for batch_size in (3, 1):  # aspect buckets change the batch size between steps
        prepared = distiller.prepare_batch(family_batch(batch_size, torch.bfloat16, seed=batch_size), model, {})
        # The student's input keeps the latents' dtype; the LCM arithmetic runs in float32, as diffusers' does.
        expected = {"noisy_latents": torch.bfloat16, "lcm_x_t": torch.float32, "lcm_target": torch.float32}
        for key, dtype in expected.items():
            assert prepared[key].dtype == dtype, key
            assert prepared[key].shape == (batch_size, 4, 8, 8), key
        assert torch.equal(prepared["noisy_latents"], prepared["lcm_x_t"].to(torch.bfloat16))
        assert prepared["timesteps"].dtype == torch.int64
        loss, _ = distiller.compute_distill_loss(prepared, model.model_predict(prepared), torch.tensor(0.0))
        assert torch.isfinite(loss)


# ---- full model: frozen teacher copy, EMA target network -----------------------------------------------------------


def perturbed(module: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return module


def full_model_distiller(cfg: LcmConfig, prediction_type: str = "epsilon", family: str = "sdxl"):
    torch.manual_seed(0)
    student = UNet2DConditionModel(**unet_config(family)).to(torch.float64)
    model = FakeUnetModel(student, prediction_type, family)
    distiller = LcmDistiller(
        model, noise_scheduler=noise_scheduler(prediction_type, family), config=cfg, full_model=True
    )
    return model, distiller


@pytest.mark.parametrize(
    ("family", "prediction_type"), [("sdxl", "epsilon"), ("sd1", "epsilon"), ("sd2_v", "v_prediction")]
)
def test_full_model_step_matches_diffusers_step_with_teacher_and_target_networks(family, prediction_type, monkeypatch):
    cfg = LcmConfig()
    model, distiller = full_model_distiller(cfg, prediction_type, family)
    # Three different networks, as after some training: student moved, target lagging, teacher pretrained.
    perturbed(model.unet, seed=1)
    perturbed(distiller.target_unet, seed=2)
    reference_unets = [copy.deepcopy(m) for m in (model.unet, distiller.teacher_unet, distiller.target_unet)]
    torch.manual_seed(1234)
    loss, _, index, w = our_step(
        model.unet, distiller.noise_scheduler, family_batch(2, torch.float64, 7, family), cfg, monkeypatch, distiller
    )
    student, teacher, target = reference_unets
    reference_loss = reference_step(
        student, distiller.noise_scheduler, family_batch(2, torch.float64, 7, family), index, w, cfg,
        teacher_unet=teacher, target_unet=target,
    )
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=1e-5)
    for (name, ours), theirs in zip(model.unet.named_parameters(), student.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-5, msg=name)
    assert all(p.grad is None for p in distiller.teacher_unet.parameters())
    assert all(p.grad is None for p in distiller.target_unet.parameters())


def test_target_network_follows_the_student_by_ema_and_the_teacher_stays_frozen():
    cfg = LcmConfig(ema_decay=0.9)
    model, distiller = full_model_distiller(cfg)
    teacher_before = [p.clone() for p in distiller.teacher_unet.parameters()]
    target_before = [p.clone() for p in distiller.target_unet.parameters()]
    perturbed(model.unet, seed=3)  # an optimizer step
    distiller.post_training_step(model, step=1)
    for before, after, student in zip(target_before, distiller.target_unet.parameters(), model.unet.parameters()):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * student.detach(), rtol=0, atol=1e-12)
    for before, after in zip(teacher_before, distiller.teacher_unet.parameters()):
        assert torch.equal(before, after)


def test_target_network_is_saved_and_restored_with_checkpoints(tmp_path):
    model, distiller = full_model_distiller(LcmConfig())
    perturbed(distiller.target_unet, seed=4)
    saved = {name: p.clone() for name, p in distiller.target_unet.named_parameters()}
    distiller.on_save_checkpoint(10, str(tmp_path))
    perturbed(distiller.target_unet, seed=5)
    _, resumed = full_model_distiller(LcmConfig())
    resumed.on_load_checkpoint(str(tmp_path))
    for name, parameter in resumed.target_unet.named_parameters():
        assert torch.equal(parameter, saved[name]), name
    del model
