"""The training gate (validate_before_model_load): it stops a run only on errors, and a failure inside our own
checks never stops a run SimpleTuner would train."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
from simpletuner.helpers.models.common import PredictionTypes

from lcm_plugin.simpletuner import install as installer

LCM = {"lcm": {"num_ddim_timesteps": 50, "w_min": 1.0, "w_max": 12.0}}
# A config SimpleTuner 4.10.1 trains (see the oracle test) that the validator refused before issue 7:
# false booleans, a pixel_area dataset with its sizes in pixel edges, a dataset key it did not know.
CONFIG = {
    "model_family": "sdxl",
    "model_type": "lora",
    "output_dir": "output",
    "optimizer": "adamw_bf16",
    "mixed_precision": "bf16",
    "data_backend_config": "config/multidatabackend.json",
    "skip_file_discovery": False,
    "push_to_hub": "false",
    "caption_dropout_probability": 0.0,
    "distillation_method": "lcm",
    "distillation_config": LCM,
}
IMAGES = {
    "id": "images",
    "instance_data_dir": "datasets/images",
    "resolution": 1024,
    "resolution_type": "pixel_area",
    "maximum_image_size": 1536,
    "target_downsample_size": 1024,
    "cache_file_suffix": "v2",
}
TEXT = {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"}


@pytest.fixture
def run_folder(tmp_path, monkeypatch):
    """tmp/config/{config.json,multidatabackend.json}; training starts in tmp, as SimpleTuner expects."""
    for name in ("CONFIG_PATH", "SIMPLETUNER_ENVIRONMENT", "SIMPLETUNER_ENV", "ENV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()

    def write(config=CONFIG, entries=(IMAGES, TEXT)):
        (tmp_path / "config" / "config.json").write_text(json.dumps(config))
        (tmp_path / "config" / "multidatabackend.json").write_text(json.dumps(list(entries)))
        return SimpleNamespace(
            config=SimpleNamespace(
                distillation_method="lcm",
                distillation_config=LCM,
                data_backend_config="config/multidatabackend.json",
                model_type="lora",
                model_family="sdxl",
            ),
            model=SimpleNamespace(PREDICTION_TYPE=PredictionTypes.EPSILON),
        )

    return write


def test_a_config_simpletuner_trains_passes_with_its_warnings_logged(run_folder, caplog):
    trainer = run_folder()
    with caplog.at_level(logging.WARNING, logger="simpletuner-lcm"):
        installer.validate_before_model_load(trainer)
    warnings = [record.getMessage() for record in caplog.records]
    assert any("/0/instance_data_dir: warning: folder" in message for message in warnings)


def test_an_error_stops_the_run_with_the_validate_line(run_folder):
    trainer = run_folder(entries=[{**IMAGES, "maximum_image_size": 5000}, TEXT])
    with pytest.raises(ValueError) as raised:
        installer.validate_before_model_load(trainer)
    assert "multidatabackend.json: /0/maximum_image_size: maximum_image_size 5000: 5000 px is 25 megapixels" in str(
        raised.value
    )


def test_an_exception_in_our_checks_is_logged_and_never_stops_the_run(run_folder, caplog, monkeypatch):
    import lcm_plugin.config

    def broken_check(*args, **kwargs):
        raise KeyError("a surface our checks did not expect")

    monkeypatch.setattr(lcm_plugin.config, "validate_files", broken_check)
    trainer = run_folder(entries=[{**IMAGES, "maximum_image_size": 5000}, TEXT])
    with caplog.at_level(logging.WARNING, logger="simpletuner-lcm"):
        installer.validate_before_model_load(trainer)  # no exception: SimpleTuner decides about this run
    (record,) = [r for r in caplog.records if "could not check" in r.getMessage()]
    assert "KeyError" in record.getMessage() and "training goes on" in record.getMessage()


def test_an_invalid_lcm_block_still_stops_the_run(run_folder):
    trainer = run_folder(config={**CONFIG, "distillation_config": {"lcm": {"w_min": 9.0, "w_max": 2.0}}})
    trainer.config.distillation_config = {"lcm": {"w_min": 9.0, "w_max": 2.0}}
    with pytest.raises(ValueError, match="w_min"):
        installer.validate_before_model_load(trainer)
