"""LCM-LoRA of the rectified-flow families (SD3, Flux, Chroma, Lumina 2, AuraFlow) through the stock `simpletuner
train` (issue 21): each tiny offline model (lcm_plugin.tiny_flow) trains 2 steps with the plugin's distiller; its step
is the one tests/unit/test_distiller_flow.py proves equal to the equations; here: it runs inside SimpleTuner's trainer
and what the run hands over samples with the flow LCM scheduler in the family's diffusers pipeline."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import stock_trainer_env, write_lcm_training_dir
from test_simpletuner_train import LORA_FILE, lcm_losses, run_stock_trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hub_cache import HUB_TEXT_ENCODERS, offline_hub_cache  # noqa: E402

STEPS = 2
# The in-training quality check at a validation, small: Euler teacher rows (with CFG, or Flux's guidance input).
QUALITY_CHECK = {"steps": [1, 2], "samples": 8, "reference_steps": 4}


def validation_at(step: int) -> dict:
    """config.json keys for one SimpleTuner validation at `step` (it samples with the distiller's scheduler and runs
    the quality check), one small image."""
    return {"validation_disable": None, "validation_step_interval": step, "validation_prompt": "red circle",
            "validation_resolution": "64x64", "validation_num_inference_steps": 2, "validation_guidance": 1.0,
            "num_validation_images": 1, "disable_benchmark": True}


def assert_the_quality_check_ran(run: Path, log: str, step: int) -> None:
    """The check ran at the validation of `step`, logged its table and metrics and saved its grid."""
    from lcm_plugin.quality_check import METRIC_PREFIX

    assert not any(line in log for line in ("the LCM quality check failed", "quality check is skipped",
                                            "quality check skipped")), log[-4000:]
    assert "FD to the teacher Euler 4 steps teacher samples" in log, log[-4000:]
    metrics = {}
    for line in (run / "output" / "training_metrics.jsonl").read_text().splitlines():
        metrics.update({key: value for key, value in json.loads(line).get("metrics", {}).items()
                        if key.startswith(METRIC_PREFIX)})
    expected = {f"{METRIC_PREFIX}{model}_fd_{steps}step" for model in ("teacher", "student") for steps in (1, 2)}
    assert expected <= set(metrics) and all(math.isfinite(metrics[key]) for key in expected), sorted(metrics)
    assert (run / "output" / "validation_images" / f"step_{step}_lcm_quality_grid.png").is_file()


def flow_run(root: Path, family: str, *, steps: int = STEPS, config: dict | None = None,
             lcm: dict | None = None) -> tuple[Path, Path, str]:
    """The family's tiny offline model (lcm_plugin.tiny_flow) and an LCM run of it through the stock trainer:
    conftest's CPU LoRA run with the family's `model_family`, then `config` keys (None removes a key) and `lcm` keys
    of the LCM block. (run folder, model folder, log)."""
    from lcm_plugin.demo import shapes
    from lcm_plugin.tiny_flow import save_tiny_flow

    model = save_tiny_flow(family, root / "model", vocabulary=shapes.VOCABULARY)
    run = write_lcm_training_dir(root / "run", model, max_train_steps=steps)
    config_file = run / "config" / "config.json"
    settings = json.loads(config_file.read_text())
    settings.update({"model_family": family, "model_flavour": None, **(config or {})})
    settings.pop("pretrained_vae_model_name_or_path", None)
    settings["distillation_config"]["lcm"].update(lcm or {})
    config_file.write_text(json.dumps({key: value for key, value in settings.items() if value is not None}, indent=2))
    env = stock_trainer_env()
    if family in HUB_TEXT_ENCODERS:
        env["HF_HUB_CACHE"] = str(offline_hub_cache(run / "hub", HUB_TEXT_ENCODERS[family], model))
    return run, model, run_stock_trainer(run, env)



@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory):
    return flow_run(tmp_path_factory.mktemp("sd3-lcm"), "sd3")


def test_sd3_lcm_lora_trains_through_the_stock_trainer(sd3_run):
    run, _, log = sd3_run
    losses = lcm_losses(run / "output" / "training_metrics.jsonl")
    assert len(losses) >= STEPS and all(math.isfinite(v) and v >= 0 for v in losses.values()), log[-4000:]
    assert (run / "output" / LORA_FILE).is_file(), log[-4000:]


def test_the_lora_records_the_flow_lcm_sampler_and_samples_with_it(sd3_run):
    import torch
    from diffusers import FlowMatchLCMScheduler, StableDiffusion3Pipeline
    from safetensors import safe_open

    run, model, _ = sd3_run
    with safe_open(str(run / "output" / LORA_FILE), "pt") as lora:
        metadata = lora.metadata()
    scheduler_config = json.loads(metadata["lcm.scheduler_config"])
    assert scheduler_config["_class_name"] == "FlowMatchLCMScheduler", metadata
    assert scheduler_config["shift"] == 3.0
    pipeline = StableDiffusion3Pipeline.from_pretrained(model)
    pipeline.scheduler = FlowMatchLCMScheduler.from_config(scheduler_config)
    pipeline.load_lora_weights(run / "output")
    image = pipeline("red circle", num_inference_steps=4, guidance_scale=0.0, height=64, width=64,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and bool((image >= 0).all())


def test_the_data_path_falls_back_for_sd3_with_one_line(sd3_run):
    _, _, log = sd3_run
    assert "every dataset uses SimpleTuner's own caching: model_family 'sd3'" in log, log[-4000:]


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    return flow_run(tmp_path_factory.mktemp("flux-lcm"), "flux", config={"flux_guidance_value": 3.5})


def test_flux_lcm_lora_trains_with_its_own_guidance_input_and_samples(flux_run):
    import torch
    from diffusers import FlowMatchLCMScheduler, FluxPipeline

    run, model, log = flux_run
    losses = lcm_losses(run / "output" / "training_metrics.jsonl")
    assert len(losses) >= STEPS and all(math.isfinite(v) and v >= 0 for v in losses.values()), log[-4000:]
    pipeline = FluxPipeline.from_pretrained(model)
    pipeline.scheduler = FlowMatchLCMScheduler.from_config(pipeline.scheduler.config)
    pipeline.load_lora_weights(run / "output")
    image = pipeline("red circle", num_inference_steps=4, guidance_scale=3.5, height=64, width=64,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_the_card_snippet_of_a_flux_lora_samples_at_its_guidance(flux_run, tmp_path, monkeypatch):
    """The model card's code (outputs.inference_snippet, with what R1 derives for Flux: the transformer, the trained
    guidance input) run as a user would, against the LoRA the run wrote."""
    from types import SimpleNamespace

    from lcm_plugin.config import LcmConfig
    from lcm_plugin.outputs import CardSettings, inference_snippet
    from lcm_plugin.simpletuner.run_output_patches import _flow_card_settings
    from test_run_outputs import run_snippet

    run, model, _ = flux_run
    from diffusers import FluxTransformer2DModel
    from simpletuner.helpers.models.flux.transformer import FluxTransformer2DModel as SimpleTunersFlux

    class Model:  # what R1 reads of SimpleTuner's model object
        def get_trained_component(self):
            return SimpleTunersFlux.__new__(SimpleTunersFlux)

    derived = _flow_card_settings(Model(), SimpleNamespace(model_family="flux", flux_guidance_value=3.5))
    assert derived == {"denoiser": ("transformer", FluxTransformer2DModel.__name__), "guidance_scale": 3.5}
    code = inference_snippet(CardSettings(model_id=str(model), adapter_id=str(run / "output"), lcm=LcmConfig(),
                                          scheduler_overrides={}, prompt="red circle", seed=0, width=64, height=64,
                                          scheduler_class="FlowMatchLCMScheduler", **derived))
    assert "guidance_scale=3.5" in code and "pipeline.fuse_lora()" in code
    variables = run_snippet(code, tmp_path, monkeypatch)
    assert variables["image"].size == (64, 64)


# Families covered by FLOW_FAMILIES with no code of their own: the distiller's generic "cfg" teacher (a doubled batch,
# the prompt entries of the second half zeroed, masks kept). family -> diffusers pipeline, config keys on top.
CFG_FAMILIES = {
    "chroma": ("ChromaPipeline", {}),
    # Lumina-Image-2.0 samples at shift 6; SimpleTuner's training schedule takes flow_schedule_shift (default 3).
    "lumina2": ("Lumina2Pipeline", {"flow_schedule_shift": 6.0}),
    "auraflow": ("AuraFlowPipeline", {"flow_schedule_shift": 1.73}),  # AuraFlow's scheduler shift
}

@pytest.fixture(scope="module", params=list(CFG_FAMILIES))
def cfg_family_run(request, tmp_path_factory):
    family = request.param
    return family, *flow_run(tmp_path_factory.mktemp(f"{family}-lcm"), family,
                             config={**validation_at(STEPS), **CFG_FAMILIES[family][1]},
                             lcm={"quality_check": QUALITY_CHECK})


def test_a_cfg_family_lcm_lora_trains_and_samples_with_the_flow_lcm_scheduler(cfg_family_run):
    import diffusers
    import torch
    from diffusers import FlowMatchLCMScheduler
    from safetensors import safe_open

    family, run, model, log = cfg_family_run
    losses = lcm_losses(run / "output" / "training_metrics.jsonl")
    assert len(losses) >= STEPS and all(math.isfinite(v) and v >= 0 for v in losses.values()), log[-4000:]
    assert f"every dataset uses SimpleTuner's own caching: model_family '{family}'" in log, log[-4000:]
    assert_the_quality_check_ran(run, log, STEPS)
    with safe_open(str(run / "output" / LORA_FILE), "pt") as lora:
        metadata, keys = lora.metadata(), list(lora.keys())
    assert keys and all(key.startswith("transformer.") for key in keys)
    scheduler_config = json.loads(metadata["lcm.scheduler_config"])
    assert scheduler_config["_class_name"] == "FlowMatchLCMScheduler", metadata
    # The grid the student was distilled on: SimpleTuner's training schedule (the folder's, at flow_schedule_shift).
    assert scheduler_config["shift"] == CFG_FAMILIES[family][1].get("flow_schedule_shift", 3.0)
    pipeline = getattr(diffusers, CFG_FAMILIES[family][0]).from_pretrained(model)
    pipeline.scheduler = FlowMatchLCMScheduler.from_config(scheduler_config)
    pipeline.load_lora_weights(run / "output")
    assert pipeline.get_list_adapters() == {"transformer": ["default_0"]}
    image = pipeline("red circle", num_inference_steps=4, guidance_scale=0.0, height=64, width=64,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and bool((image >= 0).all())
