"""One `simpletuner train` run of a bench, timed from outside (shared by data_path.py and first_step.py; not a
benchmark itself)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

# SimpleTuner 4.10.1 can hang at exit after a run over many files (a multiprocessing queue's finalizer joins a
# feeder thread nobody reads); a run that logged its step is given this long to exit, then stopped.
EXIT_GRACE_S = 120


class TrainerRun(NamedTuple):
    wall: float  # seconds to its exit, or to its step when it had to be stopped
    data_seconds: float  # its data preparation as the plugin logs it (the same span on either path)
    stopped: bool  # stopped EXIT_GRACE_S after its step: it had not exited
    first_step: float  # seconds from the start to its first logged step (polled every 0.25 s)


def train_once(run: Path, data_path: str) -> TrainerRun:
    """A `simpletuner train` in `run` (its config/ folder) with SIMPLETUNER_LCM_DATA_PATH=`data_path`, offline; stops
    the bench with the run's log tail when it fails. Data preparation is the trainer's `configure_multi_databackend`
    call, as the plugin times and logs it on either path."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MIXED_PRECISION="no",
               SIMPLETUNER_LCM_DATA_PATH=data_path)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    metrics = run / "output" / "training_metrics.jsonl"
    metrics.unlink(missing_ok=True)
    log = run / f"train-{data_path}.log"

    def stepped() -> bool:  # SimpleTuner can exit 0 after a failed run: judge it by the step it logged
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        return any(json.loads(line).get("step") for line in lines if line.endswith("}"))

    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen([str(Path(sys.executable).parent / "simpletuner"), "train"], cwd=run, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        stepped_at = None
        while process.poll() is None:
            time.sleep(0.25)
            if stepped_at is None and stepped():
                stepped_at = time.perf_counter()
            elif stepped_at is not None and time.perf_counter() - stepped_at > EXIT_GRACE_S:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                print(f"    ({run.name}, {data_path}: stopped {EXIT_GRACE_S} s after its step; it had not exited)",
                      flush=True)
    ended = time.perf_counter()
    stopped = process.returncode == -signal.SIGKILL and stepped_at is not None
    output = log.read_text(errors="replace")
    prepared = re.findall(r"data preparation took ([0-9.]+) s", output)
    if not stepped() or len(prepared) != 1 or (process.returncode != 0 and stepped_at is None):
        raise SystemExit(f"simpletuner train ({data_path}) in {run} failed:\n{output[-3000:]}")
    first_step = (stepped_at or ended) - start  # a step logged just before the exit is seen after it
    return TrainerRun((stepped_at if stopped else ended) - start, float(prepared[0]), stopped, first_step)
