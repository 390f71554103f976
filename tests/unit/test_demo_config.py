"""lcm_plugin.demo.config: the demo's SimpleTuner config is the seed's LCM run, shrunk for a CPU, and SimpleTuner's
own parser and dataset validators accept it."""

from __future__ import annotations

import copy
import io
import json
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from lcm_plugin.demo import config, run

REPO_SEED = Path(__file__).parents[1] / "fixtures" / "seed"
TRAINING = config.DemoTraining(max_train_steps=300, learning_rate=1e-3, lr_scheduler="linear", lora_rank=16,
                               train_batch_size=8, image_size=64)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    (tmp_path / "data").mkdir()
    config.write_run_folder(tmp_path, TRAINING, teacher_dir=run.TEACHER_DIR, data_dir=tmp_path / "data")
    return tmp_path


def _files(run_dir: Path) -> tuple[dict, list[dict]]:
    return (json.loads((run_dir / "config" / "config.json").read_text()),
            json.loads((run_dir / "config" / "multidatabackend.json").read_text()))


def test_shipped_seed_is_the_quickstart_seed():
    assert json.loads(config.SEED_CONFIG.read_text()) == json.loads((REPO_SEED / "config.json").read_text())
    assert json.loads(config.SEED_BACKENDS.read_text()) == json.loads((REPO_SEED / "multidatabackend.json").read_text())


def test_seed_lcm_run_is_kept(run_dir):
    seed = json.loads((REPO_SEED / "config.json").read_text())
    derived, _ = _files(run_dir)
    for key in ("model_type", "model_family", "distillation_method", "distillation_config", "lora_type", "seed"):
        assert derived[key] == seed[key], key
    assert derived["distillation_method"] == "lcm"


def test_sizes_paths_and_cpu_settings(run_dir):
    derived, _ = _files(run_dir)
    assert derived["pretrained_model_name_or_path"] == str(run.TEACHER_DIR)
    assert derived["pretrained_vae_model_name_or_path"] == str(run.TEACHER_DIR / "vae")
    assert Path(derived["pretrained_vae_model_name_or_path"], "config.json").is_file()
    assert derived["output_dir"] == str(run_dir / "output")
    assert (derived["resolution"], derived["max_train_steps"], derived["lora_rank"]) == (64, 300, 16)
    assert (derived["optimizer"], derived["mixed_precision"], derived["validation_disable"]) == ("torch-adamw", "no", True)
    assert derived["push_to_hub"] is False
    assert not {"hub_model_id", "tracker_project_name", "resume_from_checkpoint"} & set(derived)


def test_backends_are_the_seed_entries_on_the_local_dataset(run_dir):
    _, backends = _files(run_dir)
    image, text = backends
    assert image["instance_data_dir"] == str(run_dir / "data")
    assert (image["caption_strategy"], image["resolution"], image["resolution_type"]) == ("textfile", 64, "pixel")
    assert text["dataset_type"] == "text_embeds" and text["default"] is True
    assert Path(image["cache_dir_vae"]).is_relative_to(run_dir) and Path(text["cache_dir"]).is_relative_to(run_dir)


def test_simpletuner_parser_accepts_the_derived_config(run_dir):
    from simpletuner.helpers.configuration.cmd_args import parse_cmdline_args
    from simpletuner.helpers.configuration.json_file import normalize_args

    derived, _ = _files(run_dir)
    with redirect_stderr(io.StringIO()) as stderr:
        try:
            args = parse_cmdline_args(input_args=normalize_args(derived), exit_on_error=True)
        except SystemExit:
            pytest.fail(stderr.getvalue()[-2000:])
    assert args.distillation_method == "lcm" and args.resolution == 64


def test_simpletuner_decays_the_demo_learning_rate_to_zero(run_dir):
    """The demo's lr_scheduler, as SimpleTuner's get_lr_scheduler builds it: warm-up, then down to 0 at the last step."""
    import logging
    from types import SimpleNamespace

    import torch
    from simpletuner.helpers.configuration.cmd_args import parse_cmdline_args
    from simpletuner.helpers.configuration.json_file import normalize_args
    from simpletuner.helpers.training.custom_schedule import get_lr_scheduler

    derived, _ = _files(run_dir)
    args = parse_cmdline_args(input_args=normalize_args(derived), exit_on_error=True)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = get_lr_scheduler(args, optimizer, SimpleNamespace(num_processes=1), logging.getLogger("test"), 0)
    learning_rates = []
    for _ in range(args.max_train_steps):
        optimizer.step()
        scheduler.step()
        learning_rates.append(optimizer.param_groups[0]["lr"])
    peak = learning_rates[args.lr_warmup_steps - 1]
    assert peak == pytest.approx(args.learning_rate)
    assert learning_rates[args.lr_warmup_steps + (args.max_train_steps - args.lr_warmup_steps) // 2] < 0.6 * peak
    assert learning_rates[-1] == pytest.approx(0.0, abs=1e-12)


def test_simpletuner_dataset_validators_accept_the_derived_entries(run_dir):
    from simpletuner.helpers.data_backend.config import create_backend_config

    derived, backends = _files(run_dir)
    args = {"model_family": "sdxl", "resolution": 64, "resolution_type": "pixel", "caption_strategy": "filename",
            "model_type": "lora", "controlnet": False, "train_batch_size": 8, "minimum_image_size": None,
            "maximum_image_size": None, "target_downsample_size": None}
    for entry in backends:
        create_backend_config(copy.deepcopy(entry), args).validate(args)


def test_our_validator_finds_no_error(run_dir):
    from lcm_plugin.config import has_errors
    from lcm_plugin.config.run import validate_files

    problems = validate_files(run_dir / "config" / "config.json")
    assert not has_errors(problems), problems


def test_teacher_guidance_is_the_mean_of_the_sampled_scales():
    assert run.teacher_guidance_scale({"w_min": 1.0, "w_max": 12.0}) == 6.5
    assert run.teacher_guidance_scale({"w_min": 8.5, "w_max": 8.5}) == 8.5


def test_the_demo_variant_is_merged_over_the_seed_lcm_block(tmp_path):
    from dataclasses import replace

    from lcm_plugin.config import LcmConfig

    (tmp_path / "data").mkdir()
    config.write_run_folder(tmp_path, replace(TRAINING, lcm_settings={"variant": "tcd"}), teacher_dir=run.TEACHER_DIR,
                            data_dir=tmp_path / "data")
    seed = json.loads((REPO_SEED / "config.json").read_text())
    derived, _ = _files(tmp_path)
    assert derived["distillation_config"]["lcm"] == {**seed["distillation_config"]["lcm"], "variant": "tcd"}
    assert LcmConfig.model_validate(derived["distillation_config"]["lcm"]).variant == "tcd"


def test_rows_name_the_student_by_its_variant():
    from lcm_plugin.config import LcmConfig

    labels = [row.label for row in run.rows(LcmConfig(variant="pcm"))]
    assert labels[:4] == ["teacher DDIM 1 step", "teacher DDIM 2 steps", "teacher DDIM 4 steps", "teacher DDIM 8 steps"]
    assert labels[4:] == ["student PCM 1 step", "student PCM 2 steps", "student PCM 4 steps", "student PCM 8 steps"]
