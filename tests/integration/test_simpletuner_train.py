"""Running the stock SimpleTuner trainer from tests, and the explicit `simpletuner-lcm train` entry.

`simpletuner train` starts SimpleTuner's train.py through two launcher processes, its CLI and `accelerate launch`,
which cost ~20 s of a 2-core CPU per run and hand train.py nothing but environment variables. The tests start
train.py as they would, in one process (`run_stock_trainer`); the first test here checks that train.py starts with
the environment `simpletuner train` gives it. Runs of several processes go through `simpletuner train` itself. The .pth
hook arms the plugin inside train.py on both launches: test_family_matrix.py trains every family, LoRA and full, with
it.

SimpleTuner's train.py can exit 0 after a failure, so the run is judged by its output files: the metrics log
(report_to "simpletuner" writes output/training_metrics.jsonl) and the LoRA weights.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import torch

LORA_FILE = "pytorch_lora_weights.safetensors"
STEPS = 3


def one_process_launch(run_dir: Path, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment with which `simpletuner train` starts train.py for `run_dir`'s
    config/config.json on one process without an accelerate config file (SimpleTuner 4.10.1, accelerate 1.x)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    assert (run_dir / "config" / "config.json").is_file(), run_dir
    launched = dict(env)
    # Set by the CLI's imports (simpletuner.cli, simpletuner, torch) in its own environment, which train.py inherits.
    for name, value in {"SIMPLETUNER_SKIP_TORCH": "1", "TORCH_BLAS_PREFER_CUBLASLT": "1",
                        "TOKENIZERS_PARALLELISM": "false", "TORCHINDUCTOR_CACHE_DIR": default_cache_dir(),
                        "SIMPLETUNER_SERVER_ROOT_PID": str(os.getpid())}.items():
        launched.setdefault(name, value)
    # The CLI: the config it found. accelerate's simple launcher, given --mixed_precision=$MIXED_PRECISION
    # --num_processes=1 --num_machines=1 --dynamo_backend=no.
    launched.update(
        CONFIG_BACKEND="json", CONFIG_PATH="config/config", ACCELERATE_USE_CPU="False",
        ACCELERATE_MIXED_PRECISION=env.get("MIXED_PRECISION", "bf16"), ACCELERATE_DYNAMO_BACKEND="NO",
        ACCELERATE_DYNAMO_MODE="default", ACCELERATE_DYNAMO_USE_FULLGRAPH="False",
        ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION="False", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
    )
    python = Path(env["PATH"].split(os.pathsep, 1)[0]) / "python"
    return [str(python), str(Path(importlib.util.find_spec("simpletuner").origin).parent / "train.py")], launched


def run_stock_trainer(run_dir: Path, env: dict[str, str]) -> str:
    """SimpleTuner's train.py on `run_dir`, one process, started as `simpletuner train` starts it; its output."""
    command, launched = one_process_launch(run_dir, env)
    result = subprocess.run(command, cwd=run_dir, env=launched, capture_output=True, text=True, timeout=540)
    return result.stdout + result.stderr


def run_simpletuner_cli(run_dir: Path, env: dict[str, str]) -> str:
    """`simpletuner train` itself in `run_dir`; its output."""
    simpletuner = Path(env["PATH"].split(os.pathsep, 1)[0]) / "simpletuner"
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


# On PYTHONPATH: records what train.py starts with, then ends it before it imports anything.
START_RECORDER = """
import json, os, sys
if sys.argv[0].endswith("simpletuner/train.py"):
    with open(os.environ["LCM_TEST_START_RECORD"], "w") as record:
        json.dump({"argv": sys.argv, "executable": sys.executable, "cwd": os.getcwd(), "env": dict(os.environ)}, record)
    os._exit(0)
"""


def test_train_py_starts_as_simpletuner_train_starts_it(lcm_training_dir, trainer_env, tmp_path):
    (tmp_path / "recorder").mkdir()
    (tmp_path / "recorder" / "sitecustomize.py").write_text(START_RECORDER)
    trainer_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "recorder"),
                                                              trainer_env.get("PYTHONPATH")]))
    record = tmp_path / "start.json"
    trainer_env["LCM_TEST_START_RECORD"] = str(record)
    starts = []
    for run in (run_simpletuner_cli, run_stock_trainer):
        log = run(lcm_training_dir, trainer_env)
        assert record.is_file(), log[-4000:]
        starts.append(json.loads(record.read_text()))
        record.unlink()
    cli, ours = starts
    # A process id: the CLI's own, the test's on our launch (the caller's where its environment already has one).
    assert cli["env"].pop("SIMPLETUNER_SERVER_ROOT_PID").isdigit() and ours["env"].pop("SIMPLETUNER_SERVER_ROOT_PID")
    differing = {name: (ours["env"].get(name), cli["env"].get(name))
                 for name in ours["env"].keys() | cli["env"].keys() if ours["env"].get(name) != cli["env"].get(name)}
    assert differing == {}, "(ours, simpletuner train's)"
    assert ours == cli


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
