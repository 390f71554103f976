"""lcm_plugin.memory_estimate: its parameter counts against meta-device models (diffusers, transformers, PEFT), and
its weight, gradient and optimizer terms against hand computations from those counts."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from peft import LoraConfig

from lcm_plugin import memory_estimate
from lcm_plugin.memory_estimate import GIB, estimate_run_memory
from lcm_plugin.real_sdxl import SDXL_UNET_CONFIG, SDXL_VAE_CONFIG

# The seed's settings as SimpleTuner resolves them (../shared/seed/config.json; SimpleTuner's defaults elsewhere).
SEED_SETTINGS = {
    "model_family": "sdxl", "model_type": "lora", "mixed_precision": "bf16", "base_model_precision": "no_change",
    "optimizer": "adamw_bf16", "lora_rank": 64, "peft_lora_target_modules": None, "train_batch_size": 1,
    "resolution": 1024, "resolution_type": "pixel", "gradient_checkpointing": True, "vae_batch_size": 4,
    "vae_dtype": "bf16", "validation_disable": False, "validation_resolution": "1024x1024,1280x768,768x1280",
    "use_ema": False, "ema_device": "cpu",
}


def meta_unet() -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


def count(module: torch.nn.Module, predicate=lambda name: True) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if predicate(name))


def terms(phase) -> dict[str, float]:
    return {term.label: term.bytes for term in phase.terms}


def phase(estimate, name: str):
    return next(p for p in estimate.phases if p.name == name)


def test_parameter_counts_are_the_meta_models():
    unet = meta_unet()
    assert count(unet) == memory_estimate.SDXL_UNET_PARAMETERS
    quantizable = sum(module.weight.numel() for module in unet.modules()
                      if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)))
    assert quantizable == memory_estimate.SDXL_UNET_QUANTIZABLE_PARAMETERS
    with torch.device("meta"):
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    assert count(vae) == memory_estimate.SDXL_VAE_PARAMETERS
    # The text encoders' counts are tests/unit/test_real_sdxl_shapes.py's (by hand and on meta).
    assert memory_estimate.SDXL_TEXT_ENCODER_PARAMETERS == 123_060_480 + 694_659_840


@pytest.mark.parametrize("target", sorted(memory_estimate.SDXL_LORA_PARAMETERS_PER_RANK))
def test_lora_parameters_per_rank_are_what_peft_adds(target):
    unet = meta_unet()
    with torch.device("meta"):
        unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=[target]))
    assert count(unet, lambda name: "lora_" in name) == 8 * memory_estimate.SDXL_LORA_PARAMETERS_PER_RANK[target]


def test_seed_run_weight_gradient_and_optimizer_terms_by_hand():
    estimate = estimate_run_memory(SEED_SETTINGS, {})
    training = terms(phase(estimate, "training"))
    lora = 64 * (332_800 + 392_960 + 392_960 + 332_800)  # to_q, to_k, to_v, to_out.0 of SDXL's 70 transformer blocks
    assert training["UNet bf16"] == 2_567_463_684 * 2
    assert training[f"LoRA rank 64 ({lora / 1e6:.1f}M)"] == lora * 2
    assert training["gradients"] == lora * 2
    # adamw_bf16: exp_avg, exp_avg_sq and a Kahan shift, all bf16.
    assert training["adamw_bf16 state"] == lora * 3 * 2
    assert training["CUDA context"] == 0.5 * GIB


def test_int8_quanto_stores_linear_and_conv_weights_in_one_byte():
    estimate = estimate_run_memory({**SEED_SETTINGS, "base_model_precision": "int8-quanto"}, {})
    unet = terms(phase(estimate, "training"))["UNet int8-quanto"]
    quantizable = memory_estimate.SDXL_UNET_QUANTIZABLE_PARAMETERS
    assert unet == quantizable * 1 + (2_567_463_684 - quantizable) * 2
    assert unet / GIB == pytest.approx(2.39, abs=0.01)


@pytest.mark.parametrize(
    ("settings", "label", "bytes_per_parameter"),
    [
        ({"optimizer": "optimi-lion"}, "optimi-lion state", 2 * 2),  # momentum + Kahan compensation, bf16
        ({"optimizer": "bnb-adamw8bit"}, "bnb-adamw8bit state", 2),
        ({"optimizer": "torch-adamw", "mixed_precision": "no"}, "torch-adamw state", 2 * 4),
        ({"optimizer": "optimi-adamw", "mixed_precision": "no"}, "optimi-adamw state", 2 * 4),  # no Kahan in fp32
        ({"optimizer": "torch-sgd"}, "torch-sgd state", 0),
        ({"optimizer": "not-an-optimizer"}, "not-an-optimizer state (unknown optimizer: 2 states assumed)", 2 * 2),
    ],
)
def test_optimizer_state_per_trainable_parameter(settings, label, bytes_per_parameter):
    estimate = estimate_run_memory({**SEED_SETTINGS, **settings}, {})
    lora = memory_estimate.lora_parameters(64, memory_estimate.DEFAULT_LORA_TARGETS)
    assert terms(phase(estimate, "training"))[label] == lora * bytes_per_parameter


def test_full_model_trains_every_weight_and_keeps_teacher_and_target_copies():
    estimate = estimate_run_memory({**SEED_SETTINGS, "model_type": "full", "optimizer": "torch-adamw"}, {})
    training = terms(phase(estimate, "training"))
    assert training["gradients"] == 2_567_463_684 * 2
    assert training["torch-adamw state"] == 2_567_463_684 * 2 * 2
    # the teacher in the student's bf16, the EMA target in float32 (distiller.frozen_copy)
    assert training["LCM teacher and target copies"] == 2_567_463_684 * (2 + 4)


def test_lora_target_ema_keeps_float32_lora_weights_and_a_copy_aside():
    estimate = estimate_run_memory(SEED_SETTINGS, {"lora_target_ema": True})
    lora = memory_estimate.lora_parameters(64, memory_estimate.DEFAULT_LORA_TARGETS)
    assert terms(phase(estimate, "training"))["LCM target LoRA (EMA)"] == lora * (4 + 2)


def test_activations_grow_with_batch_and_area_and_without_checkpointing():
    def step_activations(**settings) -> float:
        training = phase(estimate_run_memory({**SEED_SETTINGS, **settings}, {}), "training")
        return next(term.bytes for term in training.terms if term.label.startswith("activations"))

    base = step_activations()
    assert step_activations(train_batch_size=2) > base
    assert step_activations(resolution=512) < base
    assert step_activations(gradient_checkpointing=False) > base
    # resolution_type 'area' is megapixels of 1e6 pixels: 1.048576 MP is 1024 x 1024.
    assert step_activations(resolution=1.048576, resolution_type="area") == pytest.approx(base)


def test_peak_is_the_largest_phase_and_the_quality_check_can_be_turned_off():
    estimate = estimate_run_memory(SEED_SETTINGS, {})
    assert estimate.peak_gib == max(p.bytes for p in estimate.phases) / GIB
    without_check = estimate_run_memory(SEED_SETTINGS, {"quality_check": {"enabled": False}})
    assert [p.name for p in without_check.phases] == ["caching", "training"]
    assert [p.name for p in estimate_run_memory({**SEED_SETTINGS, "validation_disable": True}, {}).phases] == [
        "caching", "training"]


def test_the_quality_check_counts_at_its_smallest_batch_the_one_its_sizing_falls_back_to():
    from lcm_plugin import quality_check

    validation = phase(estimate_run_memory(SEED_SETTINGS, {}), "validation")
    check = next(term for term in validation.terms if term.label.startswith("quality check"))
    # One 1024 x 1024 image per VAE decode outweighs the teacher's UNet on one sample with CFG (2 x 0.257 + 0.063 GiB).
    assert check.label == "quality check VAE decode (1 x 1.00 MP)"
    assert check.bytes == pytest.approx((1.988 + 0.035) * GIB)
    # The check's sizing decodes one image per call with that much room, two with twice it.
    room = check.bytes / quality_check.FREE_MEMORY_SHARE
    assert quality_check.sampling_batches(int(room * 1.01), 1024, 1024, 2, guided=True)[1] == 1
    assert quality_check.sampling_batches(int(2 * room * 1.01), 1024, 1024, 2, guided=True)[1] == 2


def test_families_without_fitted_terms_get_no_estimate():
    assert estimate_run_memory({**SEED_SETTINGS, "model_family": "sd1x"}, {}) is None


def test_lora_targets_as_simpletuner_holds_them():
    # effective_settings gives peft_lora_target_modules as the JSON text config.json's list becomes.
    settings = {**SEED_SETTINGS, "peft_lora_target_modules": '["to_q", "ff.net.2"]', "lora_rank": 16}
    adapter = next(term for term in phase(estimate_run_memory(settings, {}), "training").terms
                   if term.label.startswith("LoRA"))
    assert adapter.bytes == 16 * (332_800 + 416_000) * 2
