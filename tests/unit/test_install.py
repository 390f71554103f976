"""lcm_plugin.simpletuner.install: what it patches, that it undoes it, and how it fails."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from simpletuner.helpers.distillation.factory import DistillationMethod, DistillerFactory
from simpletuner.helpers.distillation.registry import DistillationRegistry
from simpletuner.helpers.models.common import PredictionTypes

from lcm_plugin import tiny_sdxl
from lcm_plugin.config import LcmConfig
from lcm_plugin.simpletuner import install as installer
from lcm_plugin.simpletuner.surfaces import SimpleTunerSurfaceError, has_accelerator
from lcm_plugin.simpletuner.distiller import LcmDistiller

LCM_BLOCK = {"num_ddim_timesteps": 25, "w_min": 2.0, "w_max": 9.0, "loss_type": "huber", "huber_c": 0.01,
             "timestep_scaling_factor": 10.0}


@pytest.fixture(scope="module")
def pristine():
    """SimpleTuner's own surfaces, captured with the plugin uninstalled (importing the trainer fires the .pth hook)."""
    installer.install()
    installer.uninstall()
    from simpletuner.helpers.training.trainer import Trainer

    originals = {
        "create": DistillerFactory.__dict__["_create_lcm_distiller"],
        "method_config": DistillerFactory.__dict__["_method_config"],
        "init_data_backend": Trainer.__dict__["init_data_backend"],
        "registered": DistillationRegistry.get("lcm"),
        "pin_memory": torch.Tensor.pin_memory,
    }
    yield originals
    installer.uninstall()


@pytest.fixture
def installed(pristine):
    installer.install()
    yield pristine
    installer.uninstall()


def fake_sdxl_model(prediction_type: PredictionTypes = PredictionTypes.EPSILON):
    return SimpleNamespace(PREDICTION_TYPE=prediction_type, config=SimpleNamespace(lora_type="standard"))


def create(distillation_config, *, model=None, model_type="lora"):
    return DistillerFactory.create_distiller(
        "lcm",
        teacher_model=model or fake_sdxl_model(),
        noise_scheduler=DDPMScheduler.from_config(tiny_sdxl.SDXL_SCHEDULER_CONFIG),
        config={"distillation_config": distillation_config, "train_text_encoder": False},
        model_type=model_type,
        prediction_type="epsilon",
    )


def current_surfaces():
    from simpletuner.helpers.training.trainer import Trainer

    return {
        "create": DistillerFactory.__dict__["_create_lcm_distiller"],
        "method_config": DistillerFactory.__dict__["_method_config"],
        "init_data_backend": Trainer.__dict__["init_data_backend"],
        "registered": DistillationRegistry.get("lcm"),
        "pin_memory": torch.Tensor.pin_memory,
    }


def test_install_and_uninstall_are_idempotent(pristine):
    installer.install()
    first = current_surfaces()
    installer.install()
    assert current_surfaces() == first
    assert first["registered"] is LcmDistiller
    assert first["create"] is not pristine["create"]
    assert first["init_data_backend"] is not pristine["init_data_backend"]
    installer.uninstall()
    installer.uninstall()
    assert current_surfaces() == pristine
    assert pristine["registered"].__module__ == "simpletuner.helpers.distillation.lcm"


def test_missing_import_path_exists_only_while_installed(installed):
    from simpletuner.helpers.distillation.lcm.distiller import LCMDistiller

    assert LCMDistiller is LcmDistiller
    installer.uninstall()
    with pytest.raises(ImportError):
        from simpletuner.helpers.distillation.lcm.distiller import LCMDistiller  # noqa: F401,F811


def test_factory_creates_our_distiller_from_the_lcm_block(installed):
    distiller = create({"lcm": LCM_BLOCK})
    assert isinstance(distiller, LcmDistiller)
    # The block's values; every setting it leaves out keeps its default.
    assert distiller.lcm_config.model_dump() == {**LcmConfig().model_dump(), **LCM_BLOCK}
    assert distiller.schedule.skip_k == 1000 // 25
    scheduler = distiller.get_scheduler()
    assert type(scheduler).__name__ == "LCMScheduler" and scheduler.config.timestep_scaling == 10.0
    # Its skipping grid is the training solver's (LCMScheduler's own default is 50).
    assert scheduler.config.original_inference_steps == LCM_BLOCK["num_ddim_timesteps"] == 25


def test_factory_gives_full_models_a_frozen_teacher_and_a_target_network(installed):
    unet = torch.nn.Linear(2, 2)
    model = fake_sdxl_model()
    model.get_trained_component = lambda: unet
    distiller = create({"lcm": LCM_BLOCK}, model=model, model_type="full")
    for copy in (distiller.teacher_unet, distiller.target_unet):
        assert copy is not unet and torch.equal(copy.weight, unet.weight)
        assert not any(p.requires_grad for p in copy.parameters())
    assert create({"lcm": LCM_BLOCK}).teacher_unet is None  # LoRA: the teacher is the UNet, adapters off


def test_string_form_of_distillation_config(installed, pristine):
    as_string = json.dumps({"lcm": LCM_BLOCK})
    # SimpleTuner itself drops the string form (its _method_config returns {} for a non-dict) ...
    assert pristine["method_config"].__func__(DistillationMethod.LCM, {"distillation_config": as_string}) == {}
    # ... with the plugin it reads the same block as the dict form.
    assert create(as_string).lcm_config == create({"lcm": LCM_BLOCK}).lcm_config
    with pytest.raises(ValueError, match=r"distillation_config: expected a JSON object"):
        create("{lcm: oops")


def test_bad_lcm_settings_name_the_key_and_what_is_valid(installed):
    with pytest.raises(ValueError) as error:
        create({"lcm": {"w_min": 0.5, "num_ddim_steps": 50}})
    message = str(error.value)
    assert "distillation_config.lcm.w_min" in message and "0.5" in message
    assert "distillation_config.lcm.num_ddim_steps" in message and "valid keys: num_ddim_timesteps" in message


def test_unsupported_models_are_refused_clearly(installed):
    wan = fake_sdxl_model(PredictionTypes.FLOW_MATCHING)
    wan.config.model_family = "wan"
    with pytest.raises(ValueError, match="model_family 'wan' is a flow-matching family it does not cover yet"):
        create({"lcm": LCM_BLOCK}, model=wan)
    qwen = fake_sdxl_model(PredictionTypes.FLOW_MATCHING)  # a covered family in a flavour it does not cover
    qwen.config.model_family, qwen.config.model_flavour = "qwen_image", "v2.1"
    with pytest.raises(ValueError, match="qwen_image model_flavour 'v2.1' is Qwen-Image-2.1"):
        create({"lcm": LCM_BLOCK}, model=qwen)
    flux = fake_sdxl_model(PredictionTypes.FLOW_MATCHING)
    flux.config.model_family, flux.config.flux_guidance_mode = "flux", "random-range"
    with pytest.raises(ValueError, match="flux_guidance_mode 'random-range'"):
        create({"lcm": LCM_BLOCK}, model=flux)
    sd3 = fake_sdxl_model(PredictionTypes.FLOW_MATCHING)
    sd3.config.model_family = "sd3"
    with pytest.raises(ValueError, match="variant 'tcd' is defined on a diffusion .* use variant 'lcm' or 'pcm'"):
        create({"lcm": LCM_BLOCK | {"variant": "tcd"}}, model=sd3)
    with pytest.raises(ValueError, match="model_type 'embedding' is not supported"):
        create({"lcm": LCM_BLOCK}, model_type="embedding")


def test_trainer_validates_lcm_settings_before_loading_data_or_model(installed):
    from simpletuner.helpers.training.trainer import Trainer

    trainer = SimpleNamespace(
        config=SimpleNamespace(distillation_method="lcm", distillation_config={"lcm": {"loss_type": "l1"}},
                               model_type="lora", model_family="sdxl"),
        model=fake_sdxl_model(),
    )
    # The original init_data_backend would fail on this fake trainer; ours must stop earlier, with our message.
    with pytest.raises(ValueError, match=r"distillation_config\.lcm\.loss_type"):
        Trainer.init_data_backend(trainer)



def test_trainer_runs_validate_on_the_config_files_before_loading(installed, tmp_path, monkeypatch):
    from simpletuner.helpers.training.trainer import Trainer

    from lcm_plugin.config import format_problems, validate_files

    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({
        "model_family": "sdxl", "model_type": "lora", "pretrained_model_name_or_path": "x", "output_dir": "out",
        "data_backend_config": "multidatabackend.json", "max_train_steps": 3, "num_train_epochs": 0,
        "aspect_bucket_rounding": 64, "distillation_method": "lcm", "distillation_config": {"lcm": LCM_BLOCK},
    }))
    (tmp_path / "multidatabackend.json").write_text("[]")
    monkeypatch.setenv("CONFIG_PATH", str(config_path))
    trainer = SimpleNamespace(
        config=SimpleNamespace(distillation_method="lcm", distillation_config={"lcm": LCM_BLOCK}, model_type="lora",
                               model_family="sdxl", data_backend_config=str(tmp_path / "multidatabackend.json")),
        model=fake_sdxl_model(),
    )
    expected = format_problems(p for p in validate_files(config_path, tmp_path / "multidatabackend.json")
                               if p.severity == "error")
    assert "/aspect_bucket_rounding" in expected
    with pytest.raises(ValueError) as raised:
        Trainer.init_data_backend(trainer)
    for line in expected.splitlines():
        assert line in str(raised.value)


def test_schema_key_is_dropped_before_simpletuner_parses_config_json(installed):
    from simpletuner.helpers.configuration import json_file

    arguments = json_file.mapping_to_cli_args({"$schema": "../schemas/config.schema.json", "learning_rate": 0.5})
    assert not any("$schema" in argument for argument in arguments)
    assert any("learning_rate" in argument for argument in arguments)
    installer.uninstall()
    assert any("$schema" in argument for argument in json_file.mapping_to_cli_args({"$schema": "x"}))

def test_missing_surface_fails_with_its_name_and_changes_nothing(pristine, monkeypatch):
    monkeypatch.delattr(DistillerFactory, "_create_lcm_distiller")
    with pytest.raises(SimpleTunerSurfaceError) as error:
        installer.install()
    assert "DistillerFactory._create_lcm_distiller is missing" in str(error.value)
    assert "SIMPLETUNER_LCM_DISABLE=1" in str(error.value)
    assert not installer.is_installed()
    assert DistillationRegistry.get("lcm") is pristine["registered"]


def test_pin_memory_is_a_no_op_only_without_an_accelerator(installed):
    tensor = torch.zeros(2)
    if has_accelerator(torch):
        assert torch.Tensor.pin_memory is installed["pin_memory"]
    else:
        assert tensor.pin_memory() is tensor
