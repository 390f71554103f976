"""Orchestration of `simpletuner-lcm demo`: dataset -> config -> stock SimpleTuner run -> grid and table.

Output folder layout (everything regenerated on each run):
    data/           generated shapes with .txt captions (SimpleTuner writes bucket metadata here)
    config/         config.json and multidatabackend.json derived from the seed
    cache/          SimpleTuner's VAE and text-embed caches
    output/         SimpleTuner's output_dir: pytorch_lora_weights.safetensors, training_metrics.jsonl
    simpletuner.log the trainer's full stdout and stderr
    grid.png        the comparison grid; metrics.txt the table printed at the end
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lcm_plugin.demo import config, shapes

TEACHER_DIR = config.TEACHER
LORA_FILE = "pytorch_lora_weights.safetensors"
DATASET_SIZE = 512
DATASET_SEED = 1
# Tuned so the whole demo fits 10 minutes on 2 CPU cores (SimpleTuner start-up is about a minute). The variant, the
# decaying learning rate and the step count are bench/quality.py's best measured setting (README, "The demo's
# variant"; 400 steps measured further from the teacher).
DEFAULT_TRAINING = config.DemoTraining(
    max_train_steps=600, learning_rate=1e-3, lr_scheduler="linear", lora_rank=32, train_batch_size=8,
    image_size=shapes.IMAGE_SIZE,
    lcm_settings={"variant": "tcd", "lora_target_ema": True},
)
METRIC_SAMPLES = 144  # 12 per prompt; docs/quality.md: separates teacher DDIM 1, 2 and 4 steps from 50
# Issue 10: the 50-step reference draws from its own noise; every row and the floor share the evaluation noise.
REFERENCE_NOISE_SEED = 100
NOISE_SEED = 0
GENERATED = ("data", "config", "cache", "output", "simpletuner.log", "grid.png", "metrics.txt")


@dataclass(frozen=True)
class Row:
    """One sampler of the grid and table."""

    label: str
    model: str  # "teacher" or "student"
    steps: int


# The reference sampler; on the evaluation noise it is also the floor and the grid's first row.
REFERENCE = Row("teacher DDIM 50 steps", "teacher", 50)
STEP_COUNTS = (1, 2, 4, 8)


def rows(lcm) -> tuple[Row, ...]:
    """Teacher DDIM, then the student with its variant's sampler (lcm: the run's LcmConfig), at each step count."""
    def label(sampler: str, steps: int) -> str:
        return f"{sampler} {steps} step{'s' if steps > 1 else ''}"

    student = f"student {lcm.variant.upper()}"
    return (*(Row(label("teacher DDIM", k), "teacher", k) for k in STEP_COUNTS),
            *(Row(label(student, k), "student", k) for k in STEP_COUNTS))


def prepare(output: Path, training: config.DemoTraining) -> Path:
    """Fresh dataset and config in `output`; returns the run folder (= `output`)."""
    output.mkdir(parents=True, exist_ok=True)
    for name in GENERATED:
        path = output / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    shapes.write_dataset(output / "data", DATASET_SIZE, DATASET_SEED)
    config.write_run_folder(output, training, teacher_dir=TEACHER_DIR, data_dir=output / "data")
    return output


def trainer_env() -> dict[str, str]:
    """The CPU environment of NOTES.md for SimpleTuner's launcher, this interpreter's tools first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MIXED_PRECISION="no")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _progress(metrics_file: Path) -> tuple[int, float | None]:
    """(last optimisation step, its LCM loss) from SimpleTuner's training_metrics.jsonl; (0, None) before any."""
    if not metrics_file.is_file():
        return 0, None
    step, loss = 0, None
    for line in metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if "lcm_loss" in record.get("metrics", {}) and record["step"] >= step:
            step, loss = record["step"], record["metrics"]["lcm_loss"]
    return step, loss


def train(run_dir: Path, max_train_steps: int) -> Path:
    """Run the stock `simpletuner train` in `run_dir` with a progress bar; return the LoRA file.

    Success is judged by the LoRA file, not the exit code (SimpleTuner can exit 0 after a failure).
    """
    from tqdm import tqdm

    simpletuner = Path(sys.executable).parent / "simpletuner"
    log_path = run_dir / "simpletuner.log"
    metrics_file = run_dir / "output" / "training_metrics.jsonl"
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(simpletuner), "train"], cwd=run_dir, env=trainer_env(),
                                   stdout=log, stderr=subprocess.STDOUT)
        # Two bars: start-up (model load, VAE and text-embed caches) has no step count; a single bar would
        # fold it into the per-step rate and estimate hours.
        with tqdm(desc="SimpleTuner start-up (loading, caching latents and text embeds)", bar_format="{desc}: {elapsed}") as bar:
            while process.poll() is None and _progress(metrics_file)[0] == 0:
                time.sleep(1.0)
                bar.refresh()
        with tqdm(total=max_train_steps, desc="LCM-LoRA training", unit="step", dynamic_ncols=True) as bar:
            while True:
                finished = process.poll() is not None
                done, loss = _progress(metrics_file)
                if done > bar.n:
                    bar.set_postfix(lcm_loss=f"{loss:.2e}", refresh=False)
                    bar.update(done - bar.n)
                if finished:
                    break
                time.sleep(1.0)
    lora = run_dir / "output" / LORA_FILE
    if not lora.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"SimpleTuner wrote no {LORA_FILE} (exit code {process.returncode}); "
                           f"full log: {log_path}\n--- last lines ---\n{tail}")
    return lora


def teacher_guidance_scale(lcm_block: dict) -> float:
    """The CFG scale the teacher rows use: the mean of U[w_min, w_max].

    A LoRA student has no guidance input, so it distils the teacher ODE averaged over the sampled
    scales; CFG is linear in s, so that average is the ODE at the mean scale.
    """
    return (float(lcm_block["w_min"]) + float(lcm_block["w_max"])) / 2.0


def evaluate(run_dir: Path, *, samples: int = METRIC_SAMPLES, log=print) -> tuple[dict, str]:
    """Sample the reference, the floor and every row; write grid.png and metrics.txt.

    Returns {label: (lcm_plugin.quality.Comparison, endpoint distance or None)} and the table text.
    """
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    from diffusers.utils import logging as diffusers_logging

    from lcm_plugin import quality
    from lcm_plugin.config import LcmConfig
    from lcm_plugin.demo import grid, metrics, sampling
    from lcm_plugin.inference import adds_noise_between_steps, variant_scheduler

    # LCMScheduler.from_config warns about SDXL's PNDM-only keys; nothing to act on.
    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    run_config = json.loads((run_dir / "config" / "config.json").read_text())
    lcm_block = run_config["distillation_config"]["lcm"]
    lcm = LcmConfig.model_validate(lcm_block)
    guidance_scale = teacher_guidance_scale(lcm_block)
    sampled_rows = rows(lcm)
    pipeline = StableDiffusionXLPipeline.from_pretrained(run_config["pretrained_model_name_or_path"])
    pipeline.set_progress_bar_config(disable=True)
    prompts = [shapes.PROMPTS[i % len(shapes.PROMPTS)] for i in range(samples)]
    cond = sampling.encode(pipeline, prompts, shapes.IMAGE_SIZE)
    scheduler_config = pipeline.scheduler.config

    def sample(row: Row, noise_seed: int, label: str) -> np.ndarray:
        started = time.monotonic()
        noise = torch.randn(samples, 4, shapes.IMAGE_SIZE // 8, shapes.IMAGE_SIZE // 8,
                            generator=torch.Generator().manual_seed(noise_seed))
        if row.model == "student" and not getattr(pipeline.unet, "peft_config", None):
            pipeline.load_lora_weights(str(run_dir / "output"), weight_name=LORA_FILE)
        if row.model == "teacher":
            latents = sampling.sample_ddim(pipeline.unet, scheduler_config, noise, cond, steps=row.steps,
                                           guidance_scale=guidance_scale)
        else:
            latents = sampling.sample_student(pipeline.unet, variant_scheduler(scheduler_config, lcm), noise, cond,
                                              steps=row.steps, generator=torch.Generator().manual_seed(noise_seed + 1))
        images = sampling.decode(pipeline.vae, latents).numpy()
        log(f"sampled {samples} x {label} in {time.monotonic() - started:.0f}s")
        return images

    reference = sample(REFERENCE, REFERENCE_NOISE_SEED, f"{REFERENCE.label} (reference noise)")
    images = {row: sample(row, NOISE_SEED, row.label) for row in (REFERENCE, *sampled_rows)}
    comparisons = quality.compare_to_reference(
        quality.image_features(reference),
        quality.image_features(images[REFERENCE]),
        {row.label: quality.image_features(images[row]) for row in sampled_rows},
    )
    table = {}
    for row in sampled_rows:
        deterministic = row.model == "teacher" or row.steps == 1 or not adds_noise_between_steps(lcm)
        endpoint = metrics.endpoint_distance(images[row], images[REFERENCE]) if deterministic else None
        table[row.label] = (comparisons[row.label], endpoint)

    columns = len(shapes.PROMPTS)
    grid.write_grid(run_dir / "grid.png", [(row.label, images[row][:columns]) for row in (REFERENCE, *sampled_rows)],
                    [p.removeprefix("a ") for p in prompts[:columns]])
    text = format_table(table, samples=samples, guidance_scale=guidance_scale)
    (run_dir / "metrics.txt").write_text(text + "\n")
    return table, text


def format_table(table: dict, *, samples: int, guidance_scale: float) -> str:
    floor = next(iter(table.values()))[0].floor
    lines = [
        f"Against the teacher's DDIM 50-step samples (CFG scale {guidance_scale:g}) from their own noise; "
        f"{samples} samples per row, every row on other noise.",
        f"Floor: the 50-step teacher itself on the rows' noise scores FD {floor.value:.1f}; "
        f"a sampler that matches it scores in [{floor.low:.1f}, {floor.high:.1f}].",
        f"{'sampler':<24}{'FD [95% interval]':>26}  {'verdict':<14}{'to 50-step endpoint':>20}",
    ]
    for label, (row, endpoint) in table.items():
        fd = f"{row.fd.value:.1f} [{row.fd.low:.1f}, {row.fd.high:.1f}]"
        verdict = "above floor" if row.above_floor else "within floor"
        endpoint_text = "-" if endpoint is None else f"{endpoint:.1f}"
        lines.append(f"{label:<24}{fd:>26}  {verdict:<14}{endpoint_text:>20}")
    lines.append("FD: Frechet distance of colour and sharpness histograms (lcm_plugin.quality, docs/quality.md); "
                 "lower is closer.")
    lines.append("Endpoint: mean RMS pixel distance (0-255) to the same noise's 50-step image; deterministic rows only.")
    return "\n".join(lines)
