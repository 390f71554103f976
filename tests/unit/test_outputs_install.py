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
    wrapped_example = installer._lcm_code_example(lambda *a, **k: calls.append("example") or "upstream")
    assert wrapped_example(args, "repo", model=SimpleNamespace(), base_model="base") == "upstream"

    path = tmp_path / "pytorch_lora_weights.safetensors"

    def upstream_save(self, save_directory, **kwargs):
        save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})

    wrapped_save = installer._lcm_save_lora_weights(upstream_save)
    wrapped_save(SimpleNamespace(config=args), str(tmp_path))
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert calls == ["example"]
