"""Running the stock `simpletuner train` from tests, and the explicit `simpletuner-lcm train` entry.

The stock launcher with the .pth hook is exercised by test_family_matrix.py (every family, LoRA and full).

SimpleTuner's train.py can exit 0 after a failure, so the run is judged by its output files: the metrics log
(report_to "simpletuner" writes output/training_metrics.jsonl) and the LoRA weights.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import torch

LORA_FILE = "pytorch_lora_weights.safetensors"
STEPS = 3


def run_stock_trainer(run_dir: Path, env: dict[str, str]) -> str:
    simpletuner = Path(env["PATH"].split(":", 1)[0]) / "simpletuner"
    result = subprocess.run(
        [str(simpletuner), "train"], cwd=run_dir, env=env, capture_output=True, text=True, timeout=540
    )
    return result.stdout + result.stderr


def lcm_losses(metrics_file: Path) -> dict[int, float]:
    losses = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if "lcm_loss" in record["metrics"]:
            losses[record["step"]] = record["metrics"]["lcm_loss"]
    return losses


def assert_lcm_run(log: str, output: Path) -> None:
    """The plugin's distiller trained >= STEPS steps, each logging a finite LCM loss."""
    tail = log[-4000:]
    # The hook (or the explicit entry) replaced upstream's distiller inside the training interpreter.
    assert "now uses lcm_plugin.simpletuner.distiller.LcmDistiller" in log, tail
    metrics_file = output / "training_metrics.jsonl"
    assert metrics_file.is_file(), tail
    losses = lcm_losses(metrics_file)
    assert len(losses) >= STEPS, (losses, tail)
    assert all(math.isfinite(loss) and loss >= 0 for loss in losses.values()), losses


def sample(pipeline, seed: int = 3) -> np.ndarray:
    return pipeline(
        "red circle",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


def test_explicit_entry_trains_with_the_hook_disabled(lcm_training_dir, trainer_env):
    # SIMPLETUNER_LCM_DISABLE=1 keeps the .pth hook away; `simpletuner-lcm train` installs the plugin itself.
    trainer_env["SIMPLETUNER_LCM_DISABLE"] = "1"
    entry = Path(trainer_env["PATH"].split(":", 1)[0]) / "simpletuner-lcm"
    result = subprocess.run(
        [str(entry), "train", "config"], cwd=lcm_training_dir, env=trainer_env, capture_output=True, text=True,
        timeout=540,
    )
    output = lcm_training_dir / "output"
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert_lcm_run(log, output)
    assert (output / LORA_FILE).is_file(), log[-4000:]
