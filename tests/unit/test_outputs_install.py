"""install.py's run-output patches (R1-R3): installed on SimpleTuner's surfaces, inert for non-LCM runs, undone
by uninstall(). What they write is checked on real runs in tests/integration/test_run_outputs.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from simpletuner.helpers.models.common import ModelFoundation
from simpletuner.helpers.publishing import huggingface, metadata

from lcm_plugin.simpletuner import install as installer
from lcm_plugin.simpletuner import run_output_patches
from lcm_plugin.simpletuner.run_config import run_lcm_config


@pytest.fixture
def pristine():
    installer.install()
    installer.uninstall()
    originals = (metadata.code_example, huggingface.save_model_card, ModelFoundation.__dict__["save_lora_weights"])
    yield originals
    installer.uninstall()


def test_install_patches_the_run_output_surfaces_and_uninstall_restores_them(pristine):
    installer.install()
    patched = (metadata.code_example, huggingface.save_model_card, ModelFoundation.__dict__["save_lora_weights"])
    assert all(new is not old for new, old in zip(patched, pristine))
    installer.uninstall()
    assert (metadata.code_example, huggingface.save_model_card,
            ModelFoundation.__dict__["save_lora_weights"]) == pristine


def test_a_run_without_lcm_gets_simpletuners_own_outputs(pristine, tmp_path):
    installer.install()
    calls = []
    args = SimpleNamespace(distillation_method=None, model_type="lora")
    wrapped_example = run_output_patches._lcm_code_example(lambda *a, **k: calls.append("example") or "upstream")
    assert wrapped_example(args, "repo", model=SimpleNamespace(), base_model="base") == "upstream"

    path = tmp_path / "pytorch_lora_weights.safetensors"

    def upstream_save(self, save_directory, **kwargs):
        save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})

    wrapped_save = run_output_patches._lcm_save_lora_weights(upstream_save)
    wrapped_save(SimpleNamespace(config=args), str(tmp_path))
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert calls == ["example"]


def test_a_tcd_run_card_and_lora_metadata_name_validations_tcd_scheduler(pristine, tmp_path):
    import ast
    import json

    from diffusers import DDPMScheduler

    from lcm_plugin.inference import variant_scheduler
    from lcm_plugin.tiny_sdxl import SDXL_SCHEDULER_CONFIG, save_tiny_sdxl

    base = save_tiny_sdxl(tmp_path / "base", vocabulary=("red",))
    block = {"lcm": {"variant": "tcd", "tcd_gamma": 0.35, "num_ddim_timesteps": 20}}
    config = SimpleNamespace(
        distillation_method="lcm", distillation_config=json.dumps(block), model_type="lora", lora_type="standard",
        push_to_hub=False, model_card_base_model=None, pretrained_model_name_or_path=str(base),
        output_dir=str(tmp_path / "out"), save_text_encoder=False, validation_resolution="64",
        validation_prompt="red", validation_seed=3, seed=None, lora_format="diffusers",
    )
    training = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    model = SimpleNamespace(config=config, noise_schedule=training, _model_config_path=lambda: str(base))

    example = run_output_patches._lcm_code_example(lambda *a, **k: "upstream")
    section = example(config, None, model=model, base_model=None)
    snippet = section.split("```python\n")[1].split("```")[0]
    calls = {ast.unparse(node.func): node for node in ast.walk(ast.parse(snippet)) if isinstance(node, ast.Call)}
    scheduler_keywords = {k.arg: ast.literal_eval(k.value) for k in calls["TCDScheduler.from_config"].keywords
                          if isinstance(k.value, ast.Constant)}
    assert scheduler_keywords["original_inference_steps"] == 20
    eta = [k.value for k in calls["pipeline"].keywords if k.arg == "eta"]
    assert [ast.literal_eval(node) for node in eta] == [0.35]

    path = tmp_path / "pytorch_lora_weights.safetensors"
    wrapped_save = run_output_patches._lcm_save_lora_weights(
        lambda self, save_directory, **kwargs: save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    )
    wrapped_save(model, str(tmp_path))
    with safe_open(str(path), framework="pt") as handle:
        recorded = json.loads(handle.metadata()["lcm.scheduler_config"])
    validation = variant_scheduler(training.config, run_lcm_config(config))
    assert recorded["_class_name"] == "TCDScheduler" and validation.gamma == 0.35
    assert {key: value for key, value in recorded.items() if not key.startswith("_")} == {
        key: value for key, value in json.loads(validation.to_json_string()).items() if not key.startswith("_")
    }
