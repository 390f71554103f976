"""`simpletuner-lcm validate`: file discovery, one line per problem, exit codes, never a traceback."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lcm_plugin.commands.validate as validate_command
from lcm_plugin.cli import main
from lcm_plugin.config import format_problems, validate_files, validate_run

SEED = Path(__file__).resolve().parents[1] / "fixtures" / "seed"
# The quickstart's config.json with the four changes SimpleTuner 4.10 needs (see the oracle test).
FIXES = {
    "aspect_bucket_rounding": 2,
    "minimum_image_size": 0,
    "maximum_image_size": 1024,
    "target_downsample_size": 1024,
    "num_train_epochs": 0,
    "data_backend_config": "config/multidatabackend.json",
}


READ_GPUS = validate_command.visible_gpus


@pytest.fixture(autouse=True)
def no_visible_gpu(monkeypatch):
    """Warning counts below are for a machine without a GPU, whatever this one has."""
    monkeypatch.setattr(validate_command, "visible_gpus", lambda: [])


def _project(tmp_path, config_changes=None, backends=None, data_dir=True):
    """tmp/config/{config.json,multidatabackend.json}, as SimpleTuner lays them out."""
    folder = tmp_path / "config"
    folder.mkdir()
    config = json.loads((SEED / "config.json").read_text())
    config.update(config_changes or {})
    config = {key: value for key, value in config.items() if value is not None}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    entries = backends if backends is not None else json.loads((SEED / "multidatabackend.json").read_text())
    if data_dir:
        (tmp_path / "images").mkdir()  # relative data paths resolve where training starts: above config/
        for entry in entries:
            if "instance_data_dir" in entry:
                entry["instance_data_dir"] = "images"
    (folder / "multidatabackend.json").write_text(json.dumps(entries, indent=2))
    return folder


def _run(capsys, *paths):
    code = main(["validate", *map(str, paths)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_seed_files_report_exactly_what_simpletuner_refuses_and_the_lcm_warnings(tmp_path, capsys):
    shutil.copytree(SEED, tmp_path / "config")
    code, lines, err = _run(capsys, tmp_path)
    config = tmp_path / "config" / "config.json"
    backends = tmp_path / "config" / "multidatabackend.json"
    assert code == 1 and "5 error(s), 3 warning(s)" in err
    assert [line.split(": ")[1] for line in lines] == [
        "/aspect_bucket_rounding",
        "/minimum_image_size",
        "/maximum_image_size",
        "/max_train_steps",
        "/",
        "/",
        "/validation_negative_prompt",
        "/0/instance_data_dir",
    ]
    assert lines[0].endswith('64 is a valid aspect_bucket_alignment (did you mean "aspect_bucket_alignment": 64?)')
    assert lines[4].startswith(f"{config}: /: no data_backend_config")
    assert lines[5] == (
        f"{config}: /: warning: caption_dropout_probability = 0.1 (SimpleTuner's default): SimpleTuner "
        "zeroes SDXL time_ids of the dropped samples, so the teacher sees no size conditioning for them; "
        "set 0 for LCM (the distiller makes its own unconditional branch)"
    )
    assert lines[7] == f"{backends}: /0/instance_data_dir: warning: folder '/path/to/your/dataset' does not exist here"


@pytest.mark.parametrize("argument", ["config", "config/", "config/config.json", "."])
def test_paths_relative_to_the_current_directory(tmp_path, capsys, monkeypatch, argument):
    # What a user types in their run folder: the suggested data_backend_config is named from that folder.
    shutil.copytree(SEED, tmp_path / "config")
    monkeypatch.chdir(tmp_path)
    code, lines, err = _run(capsys, argument)
    assert code == 1 and "5 error(s), 3 warning(s)" in err, (lines, err)
    assert any('add "data_backend_config": "config/multidatabackend.json"' in line for line in lines), lines


def test_named_backend_hint_with_a_relative_config_path(tmp_path, capsys, monkeypatch):
    _project(tmp_path, {**FIXES, "data_backend_config": "multidatabackend.json"})
    monkeypatch.chdir(tmp_path)
    code, lines, _ = _run(capsys, "config")
    assert code == 1
    assert any(line.endswith('write "config/multidatabackend.json"') for line in lines), lines


def test_fixed_seed_validates_with_the_warnings_it_deserves(tmp_path, capsys):
    folder = _project(tmp_path, FIXES, data_dir=False)
    code, lines, err = _run(capsys, folder / "config.json")
    assert code == 0 and "0 error(s), 3 warning(s)" in err
    assert all(": warning: " in line for line in lines)


def test_clean_lcm_project_has_nothing_to_say(tmp_path, capsys):
    folder = _project(tmp_path, {**FIXES, "caption_dropout_probability": 0.0, "validation_negative_prompt": None})
    code, lines, err = _run(capsys, tmp_path)
    assert (code, lines) == (0, []) and err.endswith("\nOK: 0 error(s), 0 warning(s)\n")
    assert _run(capsys, folder / "config.json", folder / "multidatabackend.json")[0] == 0


def test_backend_file_alone(tmp_path, capsys):
    folder = _project(tmp_path, FIXES, backends=[{"id": "a", "instance_data_dir": "images", "crop_aspect": "random"}])
    code, lines, _ = _run(capsys, folder / "multidatabackend.json")
    assert code == 1
    assert lines[0] == (
        f"{folder / 'multidatabackend.json'}: /0/crop_aspect: crop_aspect 'random' requires crop_aspect_buckets "
        "(a list of aspect ratios, or of {aspect_bucket, weight})"
    )


def test_every_problem_at_once_across_both_files(tmp_path, capsys):
    folder = _project(
        tmp_path,
        {**FIXES, "learnig_rate": 1e-4, "validation_guidance": 7.5},
        backends=[{"id": "a", "instance_data_dir": "images", "crop_stlye": "center"}],
    )
    code, lines, _ = _run(capsys, folder)
    assert code == 1
    assert any(line.endswith("/learnig_rate: unknown key (did you mean 'learning_rate'?)") for line in lines)
    assert any("/0/crop_stlye: warning: unknown key (did you mean 'crop_style'?)" in line for line in lines)
    assert any("/validation_guidance: warning: 7.5 washes an LCM student out" in line for line in lines)


def test_invalid_json_is_reported_with_line_and_column(tmp_path, capsys):
    folder = _project(tmp_path, FIXES)
    (folder / "multidatabackend.json").write_text('[\n  {"id": "a",\n   "crop": tru}\n]')
    code, lines, _ = _run(capsys, folder)
    assert code == 1
    assert f"{folder / 'multidatabackend.json'}: /: invalid JSON at line 3, column 12: Expecting value" in lines


def test_relative_paths_resolve_where_training_starts_not_in_the_current_directory(tmp_path, capsys, monkeypatch):
    folder = _project(
        tmp_path,
        {
            **FIXES,
            "caption_dropout_probability": 0.0,
            "validation_negative_prompt": None,
            "data_backend_config": "config/multidatabackend.json",
        },
    )
    monkeypatch.chdir("/")
    assert _run(capsys, folder)[0:2] == (0, [])
    (tmp_path / "images").rmdir()
    code, lines, _ = _run(capsys, folder)
    assert code == 0 and lines == [
        f"{folder / 'multidatabackend.json'}: /0/instance_data_dir: warning: folder "
        f"'{tmp_path / 'images'}' does not exist here"
    ]


def test_named_backend_file_that_does_not_exist(tmp_path, capsys):
    folder = _project(tmp_path, {**FIXES, "data_backend_config": "nope.json"})
    code, lines, _ = _run(capsys, folder)
    assert code == 1 and any(f"/data_backend_config: no such file: {tmp_path / 'nope.json'}" in line for line in lines)


def test_backend_file_named_from_the_config_folder_is_not_where_simpletuner_opens_it(tmp_path, capsys):
    # SimpleTuner opens data_backend_config from where training starts (above config/), not beside config.json.
    folder = _project(tmp_path, {**FIXES, "data_backend_config": "multidatabackend.json"})
    code, lines, _ = _run(capsys, folder)
    assert code == 1
    hint = f'found {folder / "multidatabackend.json"}: write "config/multidatabackend.json"'
    assert any(line.endswith(hint) for line in lines)


def test_shipped_example_paths_resolve_as_simpletuner_resolves_them(tmp_path, capsys):
    shipped = "config/examples/multidatabackend-small-dreambooth-512px.json"
    folder = _project(tmp_path, {**FIXES, "data_backend_config": shipped})
    code, lines, _ = _run(capsys, folder)
    assert code == 0 and not any("/data_backend_config" in line for line in lines)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage", b"[1, 2]", b"null", b'"text"'])
def test_hostile_inputs_give_one_line_not_a_traceback(tmp_path, capsys, content):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    code, lines, err = _run(capsys, path)
    assert code == 1 and "Traceback" not in err and len(lines) >= 1
    assert all(line.startswith(str(path)) for line in lines)


def test_missing_paths_and_too_many_arguments(tmp_path, capsys):
    assert _run(capsys, tmp_path)[0] == 1  # a folder without config.json
    assert _run(capsys, tmp_path / "absent.json")[0] == 1
    assert _run(capsys, "a", "b", "c")[0] == 2


def test_in_process_validation_renders_like_the_cli(tmp_path, capsys):
    folder = _project(tmp_path, {**FIXES, "lora_rank": 0})
    config = json.loads((folder / "config.json").read_text())
    problems = validate_run(config, folder / "config.json")
    assert problems == validate_files(folder / "config.json")
    _, lines, _ = _run(capsys, folder)
    assert format_problems(problems).splitlines() == lines


def test_validate_does_not_import_torch_or_simpletuner(tmp_path):
    folder = _project(tmp_path, FIXES)
    code = (
        "import sys; from lcm_plugin.cli import main; rc = main(['validate', %r]); "
        "assert 'torch' not in sys.modules and 'simpletuner' not in sys.modules, 'heavy import'; sys.exit(rc)"
    ) % str(folder)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_seed_config_prints_the_memory_estimate_and_its_terms(tmp_path, capsys):
    shutil.copytree(SEED, tmp_path / "config")
    _, _, err = _run(capsys, tmp_path)
    lines = err.splitlines()
    estimate = next(i for i, line in enumerate(lines) if line.startswith("estimated peak GPU memory: "))
    peak, phases = lines[estimate], lines[estimate + 1:-1]
    assert [line.split(":")[0] for line in phases] == ["  caching", "  training", "  validation"]
    totals = {line.split(":")[0].strip(): float(line.split(": ")[1].split(" GiB")[0]) for line in phases}
    name = max(totals, key=totals.get)
    assert peak == f"estimated peak GPU memory: {totals[name]:.1f} GiB ({name})"
    # By hand: 2,567,463,684 UNet weights in bf16; LoRA rank 64 on to_q/k/v/out.0 = 92,897,280 bf16 weights, as many
    # gradients, and adamw_bf16's three bf16 states.
    training = next(line for line in phases if line.startswith("  training"))
    assert "= UNet bf16 4.78 + LoRA rank 64 (92.9M) 0.17 + gradients 0.17 + adamw_bf16 state 0.52 + activations" in (
        training)
    assert lines[-1].startswith("FAILED: 5 error(s), 3 warning(s)")


def _fake_nvidia_smi(folder, listing: str):
    """An nvidia-smi on PATH that prints `listing` for validate's query."""
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '{listing}'\n")
    script.chmod(0o755)
    return folder


def test_warns_when_the_estimate_exceeds_the_smallest_visible_gpu(tmp_path, capsys, monkeypatch):
    folder = _project(tmp_path, FIXES, data_dir=False)
    monkeypatch.setattr(validate_command, "visible_gpus", READ_GPUS)
    bin_dir = _fake_nvidia_smi(tmp_path / "bin", "0, NVIDIA Tiny, 4096\\n1, NVIDIA H100 80GB HBM3, 81559\\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    code, lines, err = _run(capsys, folder)
    assert code == 0 and "0 error(s), 4 warning(s)" in err
    warning = next(line for line in lines if "does not fit" in line)
    assert warning.startswith(f"{folder / 'config.json'}: /: warning: estimated peak GPU memory ")
    assert "does not fit the 4.0 GiB of the NVIDIA Tiny: " in warning
    # CUDA_VISIBLE_DEVICES=1: only the 80 GB card is used, and the run fits it.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    code, lines, err = _run(capsys, folder)
    assert "0 error(s), 3 warning(s)" in err and not any("does not fit" in line for line in lines)


@pytest.mark.parametrize("change", [{"validation_resolution": "1024x"}, {"resolution": "abc"}, {"lora_rank": "x"},
                                    {"train_batch_size": -1}, {"gradient_accumulation_steps": "z"}])
def test_values_the_estimate_cannot_read_give_problems_not_a_traceback(tmp_path, capsys, change):
    """Nothing raises: the estimate reads what it can (an unreadable validation_resolution used to raise)."""
    code, out, err = _run(capsys, _project(tmp_path, change))
    assert code == 1 and "Traceback" not in err and out
