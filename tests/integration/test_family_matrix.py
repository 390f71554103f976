"""Every epsilon / v-prediction family the README names trains an LCM through the stock `simpletuner train`, LoRA
and full (the flow-matching families: test_flow_families.py, LoRA, each family; test_flow_full_model.py, full: SD3
and Flux, the full-model path of the distiller having no family code).

Families: SD 1.x (epsilon, `model_family: sd1x`), SD 2.x-style v-prediction (`model_family: sd1x` with
`prediction_type: v_prediction`: SimpleTuner 4.10.1's parser refuses `sd2x`) and SDXL (epsilon). Each cell trains
3 steps of a tiny model and must log a finite LCM loss every step and write its weights; the last step, recorded
inside the training interpreter (step_recorder/sitecustomize.py), must be LCM's step, checked against diffusers'
DDPMScheduler.add_noise and DDIMScheduler.step: the teacher (LoRA: adapters off; full: the frozen copy) sees x_t at
t_n+k with the prompt and a zero prompt (plus, SDXL, a zero pooled embedding and the same time_ids), one guided
DDIM step lands on the target's input at t_n, the target (LoRA: adapters on; full: the EMA copy) runs under
no_grad with the prompt, and the student gets x_t with grad. Then the weights load into the family's diffusers
pipeline and change its output.

The teacher's recorded outputs are checked against the untouched base UNet loaded from the model folder, run on
the same inputs; for full-model runs the student's output at the last step must differ from it (trained weights).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from conftest import write_lcm_training_dir
from test_simpletuner_train import LORA_FILE, STEPS, assert_lcm_run, run_stock_trainer, sample

RECORDER_DIR = Path(__file__).parent / "step_recorder"


@dataclass(frozen=True)
class Family:
    model_dir_fixture: str
    pipeline: str  # diffusers pipeline class name
    config: dict = field(default_factory=dict)  # config.json keys on top of the SDXL LoRA run's
    pooled: bool = False  # added_cond_kwargs carry SDXL's pooled embedding and time_ids


FAMILIES = {
    "sd1x": Family("tiny_sd1_dir", "StableDiffusionPipeline", {"model_family": "sd1x"}),
    "sd2x_v": Family(
        "tiny_sd2_v_dir", "StableDiffusionPipeline", {"model_family": "sd1x", "prediction_type": "v_prediction"}
    ),
    "sdxl": Family("tiny_sdxl_dir", "StableDiffusionXLPipeline", {"model_family": "sdxl"}, pooled=True),
}
FULL_MODEL_CONFIG = {"model_type": "full", "lora_type": None, "lora_rank": None, "lora_alpha": None,
                     "lora_dropout": None}


def pytest_generate_tests(metafunc):
    if "cell" in metafunc.fixturenames:
        metafunc.parametrize("cell", [(family, model_type) for model_type in ("lora", "full") for family in FAMILIES],
                             ids=lambda cell: f"{cell[0]}-{cell[1]}")


def write_run(root: Path, model_dir: Path, family: Family, model_type: str) -> Path:
    run = write_lcm_training_dir(root, model_dir, max_train_steps=STEPS)
    config_file = run / "config" / "config.json"
    config = {**json.loads(config_file.read_text()), **family.config}
    if model_type == "full":
        config.update(FULL_MODEL_CONFIG)
    config_file.write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=2))
    return run


def check_lcm_step(record: dict, model_dir: Path, family: Family, model_type: str) -> None:
    """The recorded last training step is LCM's step (module docstring), against diffusers' schedulers."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    lora = model_type == "lora"
    calls = record["calls"]
    assert [c["network"] for c in calls] == (
        ["student"] * 3 if lora else ["teacher_copy", "target_copy", "student"]
    ), [c["network"] for c in calls]
    teacher, target, student = calls
    batch = record["batch"]
    latents, noise, prompt = batch["latents"], batch["noise"], batch["encoder_hidden_states"]
    size = latents.shape[0]
    scheduler = DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler")
    assert record["prediction_type"] == scheduler.config.prediction_type
    skip_k = scheduler.config.num_train_timesteps // record["num_ddim_timesteps"]

    # Teacher: adapters off / frozen copy, no grad, cond and uncond batched at (x_t, t_n+k).
    assert not teacher["grad_enabled"]
    assert teacher["adapters_enabled"] is (False if lora else None)
    t_start = teacher["timestep"][:size]
    assert torch.equal(teacher["timestep"][size:], t_start)
    assert torch.all((t_start + 1) % skip_k == 0), t_start  # on the DDIM solver grid
    x_t = scheduler.add_noise(latents, noise, t_start)
    torch.testing.assert_close(teacher["sample"], torch.cat([x_t, x_t]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher["encoder_hidden_states"][:size], prompt, atol=0, rtol=0)
    assert torch.count_nonzero(teacher["encoder_hidden_states"][size:]) == 0
    added = batch["added_cond_kwargs"] or {}
    if family.pooled:
        torch.testing.assert_close(teacher["added_cond_kwargs"]["text_embeds"][:size], added["text_embeds"])
        assert torch.count_nonzero(teacher["added_cond_kwargs"]["text_embeds"][size:]) == 0
        torch.testing.assert_close(teacher["added_cond_kwargs"]["time_ids"], torch.cat([added["time_ids"]] * 2))
    else:
        assert not added and not teacher["added_cond_kwargs"]
    base_unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet").eval()
    torch.testing.assert_close(teacher["output"], base_unet_output(base_unet, teacher), atol=1e-5, rtol=1e-5)

    # One guided DDIM step (eta 0) from the teacher's outputs, in SimpleTuner's CFG convention.
    cond, uncond = teacher["output"].double().chunk(2)
    scale = record["guidance_scale"].double().reshape(-1, 1, 1, 1)
    guided = uncond + scale * (cond - uncond)
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(record["num_ddim_timesteps"])
    ddim.alphas_cumprod = ddim.alphas_cumprod.double()
    x_t_n = torch.cat([
        ddim.step(guided[i : i + 1], int(t_start[i]), x_t[i : i + 1].double(), eta=0.0).prev_sample
        for i in range(size)
    ])

    # Target: adapters on / EMA copy, no grad, at (x_t_n, t_n) with the prompt.
    assert not target["grad_enabled"]
    assert target["adapters_enabled"] is (True if lora else None)
    assert torch.equal(target["timestep"], (t_start - skip_k).clamp(min=0))
    torch.testing.assert_close(target["sample"].double(), x_t_n, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(target["encoder_hidden_states"], prompt, atol=0, rtol=0)

    # Student: adapters on, with grad, at (x_t, t_n+k).
    assert student["grad_enabled"]
    assert student["adapters_enabled"] is (True if lora else None)
    assert torch.equal(student["timestep"], t_start)
    torch.testing.assert_close(student["sample"], x_t, atol=1e-5, rtol=1e-5)
    if not lora:  # two optimizer steps moved the student away from the base weights the teacher keeps
        moved = (student["output"] - base_unet_output(base_unet, student)).abs().max()
        assert moved > 1e-3, f"the student's output is the base UNet's (max difference {moved})"
    assert math.isfinite(record["loss"])


def base_unet_output(base_unet, call: dict) -> torch.Tensor:
    """The untouched base UNet's prediction for one recorded UNet call's inputs."""
    with torch.no_grad():
        return base_unet(
            call["sample"],
            call["timestep"],
            encoder_hidden_states=call["encoder_hidden_states"],
            added_cond_kwargs=call["added_cond_kwargs"] or None,
        ).sample


def trained_pipeline_changes_output(output: Path, model_dir: Path, family: Family, model_type: str) -> None:
    import diffusers

    pipeline_class = getattr(diffusers, family.pipeline)
    pipeline = pipeline_class.from_pretrained(str(model_dir))
    pipeline.set_progress_bar_config(disable=True)
    base = sample(pipeline)
    if model_type == "lora":
        pipeline.load_lora_weights(str(output), weight_name=LORA_FILE)
        assert pipeline.unet.peft_config, "no LoRA adapter was loaded into the UNet"
        trained = sample(pipeline)
        pipeline.unload_lora_weights()
        # The change comes from the adapter alone: removing it restores the teacher's output.
        np.testing.assert_allclose(sample(pipeline), base, atol=1e-6)
    else:
        # A full-model run saves output/pipeline (UNet, VAE, scheduler; the base model's text encoders).
        unet = diffusers.UNet2DConditionModel.from_pretrained(str(output / "pipeline"), subfolder="unet")
        assert unet.config.cross_attention_dim == pipeline.unet.config.cross_attention_dim
        pipeline.unet = unet
        trained = sample(pipeline)
    assert np.abs(trained - base).max() > 1e-4


def test_family_trains_an_lcm_through_the_stock_trainer(cell, request, tmp_path, trainer_env):
    family_name, model_type = cell
    family = FAMILIES[family_name]
    model_dir = request.getfixturevalue(family.model_dir_fixture)
    run = write_run(tmp_path / "run", model_dir, family, model_type)
    record_file = tmp_path / "lcm_step.pt"
    trainer_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(RECORDER_DIR), trainer_env.get("PYTHONPATH")]))
    trainer_env["LCM_STEP_RECORD"] = str(record_file)

    log = run_stock_trainer(run, trainer_env)
    output = run / "output"
    assert_lcm_run(log, output)
    assert record_file.is_file(), log[-4000:]

    check_lcm_step(torch.load(record_file), model_dir, family, model_type)
    trained_pipeline_changes_output(output, model_dir, family, model_type)
