"""What a GPU run needs of the LCM step, shown on a CPU (issue 20, item 5).

- The step stays on the accelerator: the meta device stands in for one. A meta tensor has no data, so an `.item()`
  (a host sync) raises, a draw made on the CPU shows up as a CPU tensor, and a float64 tensor (which Apple's MPS
  refuses) is seen by a dispatch mode that records every tensor each op makes.
- The full model's EMA target is kept in float32, as diffusers keeps its target_unet: in bf16 the lerp rounds small
  updates away. A simulation with the distiller's own update measures the lag.
- A full-model run under FSDP or DeepSpeed ZeRO-3 is refused, by the distiller (accelerate's state) and by
  `validate` (config.json, deepspeed_config read as SimpleTuner's own Trainer reads it).
"""

from __future__ import annotations

import json

import pytest
import torch
from lcm_plugin.config import LcmConfig
from lcm_plugin.config.training import check_training_config, sharded_by
from lcm_plugin.simpletuner.distiller import LcmDistiller, ema_update
from test_distiller_parity import FakeUnetModel, family_batch, noise_scheduler, tiny_lora_unet
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# ---- the step stays on the device ---------------------------------------------------------------------------------


class MadeTensors(TorchDispatchMode):
    """Records (op, device, dtype) of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[str, str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.made.append((str(func), leaf.device.type, leaf.dtype))
        return out


def on_meta(batch: dict) -> dict:
    return {key: on_meta(value) if isinstance(value, dict) else value.to("meta") for key, value in batch.items()}


SETUPS = [
    ("lcm", "lora", False),
    ("tcd", "lora", False),
    ("pcm", "lora", False),
    ("lcm", "lora", True),  # lora_target_ema
    ("lcm", "full", False),
]


@pytest.mark.parametrize(("variant", "model_type", "target_ema"), SETUPS)
def test_a_step_on_an_accelerator_makes_no_host_tensor_no_float64_and_no_sync(variant, model_type, target_ema):
    unet = tiny_lora_unet(torch.float32).to("meta")
    model = FakeUnetModel(unet, "epsilon")
    config = LcmConfig(variant=variant, lora_target_ema=target_ema)
    distiller = LcmDistiller(model, noise_scheduler=noise_scheduler("epsilon"), config=config,
                             full_model=model_type == "full")
    batch = on_meta(family_batch(2, torch.float32, 0))
    with MadeTensors() as made:
        prepared = distiller.prepare_batch(batch, model, {"global_step": 0})
        loss, logs = distiller.compute_distill_loss(prepared, model.model_predict(prepared), None)
        loss.backward()
        distiller.post_training_step(model, 0)
    assert loss.device.type == "meta" and logs["lcm_loss"].device.type == "meta"
    assert len(made.made) > 100, "the dispatch mode saw no step"
    on_host = sorted({op for op, device, _ in made.made if device != "meta"})
    assert on_host == [], f"tensors made on the host during the step: {on_host}"
    in_float64 = sorted({op for op, _, dtype in made.made if dtype == torch.float64})
    assert in_float64 == [], f"float64 tensors on the device: {in_float64}"


# ---- the full model's target is a float32 EMA ---------------------------------------------------------------------


def lag_in_steps(target_dtype: torch.dtype, steps: int = 400, decay: float = 0.95, drift: float = 1e-5) -> float:
    """How many steps of drift an EMA target (the distiller's update) trails a student whose weights move by `drift`
    a step (the issue's simulation: decay 0.95, drift 1e-5)."""
    student = torch.nn.Linear(64, 64, bias=False).requires_grad_(False)
    target = torch.nn.Linear(64, 64, bias=False).requires_grad_(False).to(target_dtype)
    student.weight.fill_(0.25)
    target.weight.copy_(student.weight)
    for _ in range(steps):
        student.weight += drift
        ema_update(target, student, decay)
    return float((student.weight.double() - target.weight.double()).mean() / drift)


def test_a_float32_target_trails_by_the_emas_own_lag_and_a_bf16_one_falls_far_behind():
    expected = 0.95 / (1 - 0.95)  # the steady-state lag of an EMA with decay d behind a linear drift: d / (1 - d)
    assert lag_in_steps(torch.float32) == pytest.approx(expected, abs=4)
    assert lag_in_steps(torch.bfloat16) > 5 * expected


def test_the_full_models_target_is_kept_in_float32_and_runs_under_autocast():
    unet = tiny_lora_unet(torch.bfloat16)
    model = FakeUnetModel(unet, "epsilon")
    distiller = LcmDistiller(model, noise_scheduler=noise_scheduler("epsilon"), config=LcmConfig(), full_model=True)
    assert {p.dtype for p in distiller.target_unet.parameters()} == {torch.float32}
    assert {p.dtype for p in distiller.teacher_unet.parameters()} == {torch.bfloat16}
    prepared = distiller.prepare_batch(family_batch(2, torch.bfloat16, 0), model, {"global_step": 0})
    loss, _ = distiller.compute_distill_loss(prepared, model.model_predict(prepared), None)
    assert torch.isfinite(loss) and prepared["lcm_target"].dtype == torch.float32


# ---- sharded full-model runs are refused --------------------------------------------------------------------------


class FakeAccelerator:
    def __init__(self, fsdp_plugin=None, zero_stage=None):
        deepspeed = None if zero_stage is None else type("DeepSpeedPlugin", (), {"zero_stage": zero_stage})()
        self.state = type("State", (), {"fsdp_plugin": fsdp_plugin, "deepspeed_plugin": deepspeed})()


@pytest.mark.parametrize(("accelerator", "refused"), [
    (FakeAccelerator(fsdp_plugin=object()), "FSDP"),
    (FakeAccelerator(zero_stage=3), "ZeRO stage 3"),
    (FakeAccelerator(zero_stage=2), None),
    (FakeAccelerator(), None),
])
def test_the_distiller_refuses_a_sharded_full_model_run(accelerator, refused):
    model = FakeUnetModel(tiny_lora_unet(torch.float32), "epsilon")
    model.accelerator = accelerator
    build = lambda full: LcmDistiller(model, noise_scheduler=noise_scheduler("epsilon"), config=LcmConfig(),
                                      full_model=full)
    build(False)  # LoRA keeps no copy of the UNet: it runs under any of them
    if refused is None:
        build(True)
    else:
        with pytest.raises(ValueError, match=refused):
            build(True)


def simpletuners_zero_stage(raw) -> int | None:
    """SimpleTuner 4.10.1's own reading of deepspeed_config (Trainer's static methods)."""
    from simpletuner.helpers.training.trainer import Trainer

    return Trainer._extract_zero_stage(Trainer._normalize_deepspeed_config(raw))


DEEPSPEED_CONFIGS = [
    {"zero_optimization": {"stage": 3}},
    {"zero_optimization": {"stage": "3", "offload_param": {"device": "cpu"}}},
    {"zero_stage": 3},
    {"zero_optimization": {"stage": 2}},
    {"zero_stage": "x", "zero_optimization": {"stage": 3}},
    json.dumps({"zero_optimization": {"stage": 3}}),
    "{'zero_optimization': {'stage': 3}}",
    {"train_batch_size": 4},
]


@pytest.mark.parametrize("raw", DEEPSPEED_CONFIGS)
def test_validate_reads_deepspeed_config_as_simpletuner_does(raw, tmp_path):
    ours = sharded_by({"deepspeed_config": raw}, tmp_path)
    assert (ours is not None) == (simpletuners_zero_stage(raw) == 3), (raw, ours)


def test_validate_reads_a_deepspeed_config_file_from_where_training_starts(tmp_path, monkeypatch):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.chdir(tmp_path)  # SimpleTuner opens it from the working directory
    assert simpletuners_zero_stage("ds.json") == 3
    assert sharded_by({"deepspeed_config": "ds.json"}, tmp_path) is not None
    assert sharded_by({"deepspeed_config": "missing.json"}, tmp_path) is None


BASE = {"model_family": "sdxl", "pretrained_model_name_or_path": "m", "output_dir": "o",
        "data_backend_config": "d.json", "distillation_method": "lcm"}


@pytest.mark.parametrize(("extra", "refused_at"), [
    ({"model_type": "full", "fsdp_enable": True}, "/fsdp_enable"),
    ({"model_type": "full", "deepspeed_config": {"zero_optimization": {"stage": 3}}}, "/deepspeed_config"),
    ({"model_type": "lora", "fsdp_enable": True}, None),
    ({"model_type": "full", "deepspeed_config": {"zero_optimization": {"stage": 2}}}, None),
])
def test_validate_refuses_a_sharded_full_model_run_at_its_key(extra, refused_at, tmp_path):
    problems = check_training_config(BASE | extra, "config.json", tmp_path)
    sharded = [p for p in problems if "cannot distil under" in p.message]
    if refused_at is None:
        assert sharded == []
    else:
        assert [(p.pointer, p.severity) for p in sharded] == [(refused_at, "error")], problems
