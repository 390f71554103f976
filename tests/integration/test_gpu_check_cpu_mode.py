"""bench/gpu_check.py's CPU mode (what `make gpu-check` runs where no CUDA device is visible): every section runs at
tiny sizes and prints the table the GPU run prints, so the script cannot rot between GPU runs."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

from conftest import stock_trainer_env

GPU_CHECK = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
STEP_MEASURES = ("ours s/step", "diffusers s/step", "time ours / diffusers", "ours peak memory (GiB)",
                 "diffusers peak memory (GiB)", "10000 steps projected (h)")
QUANTO = "seed config + int8-quanto, tiny SDXL, 64 px"
# (check, measure) of every row, in order, at the CPU mode's sizes.
EXPECTED_ROWS = [
    ("demo (tiny SDXL, 3 LCM-LoRA steps)", "wall time (s)"),
    ("demo (tiny SDXL, 3 LCM-LoRA steps)", "student 2-step FD / teacher DDIM-2 FD"),
    ("data path, tiny SDXL VAE, 64 px", "cache build (images/s)"),
    *[("seed config, tiny SDXL, 64 px", measure) for measure in STEP_MEASURES],
    ("LCM quality check, 4 samples, 64 px", "seconds per validation"),
    ("LCM quality check, 4 samples, 64 px", "peak memory (GiB)"),
    *[(QUANTO, measure) for measure in STEP_MEASURES],
    ("2 ranks, seed config, tiny SDXL, 64 px", "s/step"),
    ("LCM step on cpu", "setups that ran (of 5)"),
]
# Rows without a figure on a CPU, and why. optimum-quanto 0.2.7's int8 matmul on torch 2.14's CPU refuses the
# activations it gets (a non-contiguous last dimension); where it works, the quanto section gives all its rows.
SKIPPED = {
    ("2 ranks, seed config, tiny SDXL, 64 px", "s/step"): "skipped: needs 2 CUDA GPUs, 0 visible",
    (QUANTO, "ours s/step"): "skipped: int8-quanto does not train on a CPU here (",
}


def table_rows(output: str) -> list[list[str]]:
    lines = [line for line in output.splitlines() if line.startswith("| ")]
    assert lines[0] == "| check | measure | value | note |", output[-3000:]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]  # after the rule


def test_cpu_mode_prints_every_row_with_a_finite_figure(tmp_path):
    env = stock_trainer_env()
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU mode by itself, as on a machine without a GPU
    result = subprocess.run([sys.executable, str(GPU_CHECK), "--work", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert result.stdout.startswith("CPU mode (no CUDA device)")
    rows = table_rows(result.stdout)
    expected = EXPECTED_ROWS
    if any(check == QUANTO and value == "–" for check, _, value, _ in rows):
        expected = [row for row in EXPECTED_ROWS if row[0] != QUANTO or row[1] == "ours s/step"]
    assert [(check, measure) for check, measure, _, _ in rows] == expected, rows
    for check, measure, value, note in rows:
        if (check, measure) in SKIPPED and value == "–":
            assert note.startswith(SKIPPED[check, measure]), note
            continue
        assert math.isfinite(float(value)) and float(value) >= 0, (check, measure, value, note)
    value, note = {(check, measure): (value, note) for check, measure, value, note in rows}[EXPECTED_ROWS[-1]]
    assert float(value) == 5, note  # every setup of the LCM step ran
