"""The LCM quality check inside the stock `simpletuner train`: values in training_metrics.jsonl, the grid beside the
validation images, and `quality_check.enabled: false` removing both."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image

from lcm_plugin.quality_check import GRID_COLUMNS, GRID_LABEL_WIDTH, METRIC_PREFIX
from conftest import IMAGE_SIZE, write_lcm_training_dir
from test_simpletuner_train import assert_lcm_run, run_stock_trainer

STEPS = 4
VALIDATION_INTERVAL = 2
QUALITY_CHECK = {"steps": [1, 2], "samples": 6, "reference_steps": 4}


def _with_validation(run_dir: Path, quality_check: dict) -> Path:
    """The shared CPU run config, plus a validation every VALIDATION_INTERVAL steps and the given quality_check."""
    config_file = run_dir / "config" / "config.json"
    config = json.loads(config_file.read_text())
    del config["validation_disable"]
    config.update(
        validation_step_interval=VALIDATION_INTERVAL,
        validation_prompt="red circle",
        validation_resolution=f"{IMAGE_SIZE}x{IMAGE_SIZE}",
        validation_num_inference_steps=2,
        validation_guidance=1.0,
        num_validation_images=1,
        disable_benchmark=True,
    )
    config["distillation_config"]["lcm"]["quality_check"] = quality_check
    config_file.write_text(json.dumps(config, indent=2))
    return run_dir


def _quality_records(output: Path) -> dict[int, dict[str, float]]:
    records = {}
    for line in (output / "training_metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        values = {key: value for key, value in record["metrics"].items() if key.startswith(METRIC_PREFIX)}
        if values:
            records.setdefault(record["step"], {}).update(values)
    return records


def _validation_images(output: Path) -> list[Path]:
    return sorted((output / "validation_images").glob("*.png"))


def test_quality_check_logs_metrics_and_grid_at_each_validation(tmp_path, tiny_sdxl_dir, trainer_env):
    run_dir = _with_validation(write_lcm_training_dir(tmp_path / "run", tiny_sdxl_dir, max_train_steps=STEPS),
                               QUALITY_CHECK)
    log = run_stock_trainer(run_dir, trainer_env)
    output = run_dir / "output"
    assert_lcm_run(log, output)

    records = _quality_records(output)
    assert sorted(records) == list(range(VALIDATION_INTERVAL, STEPS + 1, VALIDATION_INTERVAL)), (records, log[-4000:])
    rows = [f"{model}_fd_{steps}step" for model in ("teacher", "student") for steps in QUALITY_CHECK["steps"]]
    expected = {"floor", "floor_low", "floor_high", "seconds",
                *rows, *(f"{row}_low" for row in rows), *(f"{row}_high" for row in rows)}
    for step, values in records.items():
        assert {METRIC_PREFIX + key for key in expected} <= set(values), (step, sorted(values))
        assert all(math.isfinite(value) for value in values.values()), values
        assert values[f"{METRIC_PREFIX}floor_low"] <= values[f"{METRIC_PREFIX}floor_high"]
    first, *later = sorted(records)
    assert f"{METRIC_PREFIX}teacher_seconds" in records[first]
    for step in later:  # the check's time over the training time since the previous check
        assert 0 < records[step][f"{METRIC_PREFIX}cost_share"], records[step]
        # The teacher is sampled once: its rows do not move between checks.
        assert records[step][f"{METRIC_PREFIX}teacher_fd_2step"] == records[first][f"{METRIC_PREFIX}teacher_fd_2step"]

    for step in records:
        grid_file = output / "validation_images" / f"step_{step}_lcm_quality_grid.png"
        assert grid_file.is_file(), _validation_images(output)
        with Image.open(grid_file) as grid:
            columns = min(GRID_COLUMNS, QUALITY_CHECK["samples"])
            samplers = 1 + 2 * len(QUALITY_CHECK["steps"])  # the reference sampler, teacher and student per count
            assert grid.size == (GRID_LABEL_WIDTH + columns * IMAGE_SIZE, samplers * IMAGE_SIZE)
    assert "LCM quality at step" in log and "% of the" in log, log[-4000:]


def test_quality_check_off_logs_nothing(tmp_path, tiny_sdxl_dir, trainer_env):
    run_dir = _with_validation(write_lcm_training_dir(tmp_path / "run", tiny_sdxl_dir, max_train_steps=STEPS),
                               {**QUALITY_CHECK, "enabled": False})
    log = run_stock_trainer(run_dir, trainer_env)
    output = run_dir / "output"
    assert_lcm_run(log, output)
    # Validation itself ran, the check did not.
    assert _validation_images(output), log[-4000:]
    assert _quality_records(output) == {}
    assert not list((output / "validation_images").glob("*lcm_quality*"))
    assert "LCM quality at step" not in log
