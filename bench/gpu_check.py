"""`make gpu-check`: the whole product on CUDA in one run, printed as one markdown table; a CPU mode by itself.

With a CUDA device (sized for 8 minutes on one H100; each section's wall time is in the notes):
  1. demo: `simpletuner-lcm demo`'s steps (LCM-LoRA of the tiny shapes teacher with the stock `simpletuner train`,
     then its sampling and metrics).
  2. seed config: the seed's settings (bf16, gradient checkpointing, LoRA r64, adamw_bf16, batch 1) on the real-size
     SDXL (lcm_plugin.real_sdxl) at 1024 px through the stock `simpletuner train`: the in-trainer data path encodes
     generated 1024 px JPEGs with the real SDXL VAE (CPU decode feeding the GPU; images/s), the run trains (s/step
     and peak allocated per step, bench/step_probe), then validates once with the LCM quality check (its cost per
     validation). Diffusers' reference step (bench/sdxl_real_size.py's harness) runs in the same check.
  3. the same step with base_model_precision int8-quanto (a row says why when optimum-quanto is missing).
  4. two ranks (accelerate, NCCL) when 2 GPUs are visible.
  5. the LCM step on the device for each variant, LoRA, its EMA target and the full model (tiny UNet, bf16), with
     torch.cuda.set_sync_debug_mode("error"): a host sync in the step fails it; the full model's target must be float32.
Without a CUDA device, or with --cpu: the same sections at tiny sizes (lcm_plugin.tiny_sdxl, 64 px, a few steps;
independent sections side by side). CI runs this mode (tests/integration/test_gpu_check_cpu_mode.py) so that the
script cannot rot; its figures say nothing about speed.

    .venv/bin/python bench/gpu_check.py [--cpu] [--work DIR]        # or: make gpu-check
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import sdxl_real_size  # bench/ is this script's folder
import step as step_bench
from lcm_plugin.config.lcm import QualityCheckConfig
from lcm_plugin.demo.config import load_seed


@dataclass(frozen=True)
class Sizes:
    """How big each section runs."""

    resolution: int
    images: int  # images the data path encodes in the seed run
    steps: int  # optimizer steps of each measured run; the first is a warm-up
    demo_steps: int
    demo_samples: int
    quality_samples: int
    quality_reference_steps: int


GPU_SIZES = Sizes(resolution=1024, images=200, steps=6, demo_steps=600, demo_samples=48, quality_samples=8,
                  quality_reference_steps=50)
CPU_SIZES = Sizes(resolution=64, images=8, steps=3, demo_steps=3, demo_samples=8, quality_samples=4,
                  quality_reference_steps=4)


@dataclass(frozen=True)
class Row:
    check: str
    measure: str
    value: float | None  # None: skipped or failed, the note says which
    note: str = ""


def markdown(rows: list[Row]) -> str:
    lines = ["| check | measure | value | note |", "| --- | --- | --- | --- |"]
    for row in rows:
        value = "–" if row.value is None else f"{row.value:.3g}" if abs(row.value) < 1000 else f"{row.value:.0f}"
        lines.append(f"| {row.check} | {row.measure} | {value} | {row.note} |")
    return "\n".join(lines)


def gib(value: float) -> float:
    return value / 2**30


# ---- sections ----------------------------------------------------------------------------------------------------


def demo_rows(work: Path, sizes: Sizes) -> list[Row]:
    """The demo as `simpletuner-lcm demo` runs it: dataset, seed-derived config, stock trainer, sampling, metrics."""
    from lcm_plugin.demo import run as demo

    check = f"demo (tiny SDXL, {sizes.demo_steps} LCM-LoRA steps)"
    started = time.perf_counter()
    output = work / "demo"
    training = replace(demo.DEFAULT_TRAINING, max_train_steps=sizes.demo_steps)
    demo.prepare(output, training)
    demo.train(output, training.max_train_steps)
    trained = time.perf_counter() - started
    table, _ = demo.evaluate(output, samples=sizes.demo_samples, log=lambda message: None)
    wall = time.perf_counter() - started
    teacher = next(fd for label, (fd, _) in table.items() if label.startswith("teacher DDIM 2 "))
    student = next(fd for label, (fd, _) in table.items() if label.startswith("student") and label.endswith(" 2 steps"))
    return [
        Row(check, "wall time (s)", wall, f"training {trained:.0f} s, then sampling {sizes.demo_samples} per row"),
        Row(check, "student 2-step FD / teacher DDIM-2 FD", student.fd.value / teacher.fd.value,
            "below 1: the student is closer to the teacher's 50-step samples"),
    ]


def seed_rows(model_dir: Path, work: Path, sizes: Sizes, device: str, model_name: str) -> list[Row]:
    """The seed's config through the stock trainer (data path, steps, one validation with the quality check) and
    diffusers' reference step."""
    check = f"seed config, {model_name}, {sizes.resolution} px"
    started = time.perf_counter()
    validation = {
        "validation_disable": False, "validation_step_interval": sizes.steps, "disable_benchmark": True,
        "validation_resolution": f"{sizes.resolution}x{sizes.resolution}", "validation_num_inference_steps": 4,
        "validation_guidance": 0.0,
    }
    quality = {"quality_check": {"samples": sizes.quality_samples, "reference_steps": sizes.quality_reference_steps}}
    ours = sdxl_real_size.measure_stock_trainer(
        model_dir, work, device=device, resolution=sizes.resolution, steps=sizes.steps, images=sizes.images,
        label="ours", overrides=validation, lcm_overrides=quality, wait_for_quality_check=True)
    stock_wall = time.perf_counter() - started
    reference = sdxl_real_size.measure_harness("reference", model_dir, work, device=device,
                                               resolution=sizes.resolution, steps=sizes.steps, label="diffusers")
    if ours.images_encoded is None:
        raise SystemExit("the stock run's log has no data-path figures (\"N image(s) encoded here\", \"data "
                         "preparation took N s\"): did the in-trainer data path run?")
    rows = [Row(f"data path, {model_name} VAE, {sizes.resolution} px", "cache build (images/s)",
                ours.images_encoded / ours.data_seconds,
                f"{ours.images_encoded} JPEGs encoded in the trainer; data preparation {ours.data_seconds:.1f} s")]
    rows += step_rows(check, ours, reference, f"stock run {stock_wall:.0f} s")
    if not ours.quality_checks:
        raise SystemExit(f"the stock run recorded no LCM quality check (validation due at step {sizes.steps})")
    quality_seconds, quality_peak = ours.quality_checks[0]
    default_samples = QualityCheckConfig().samples
    rows += [
        Row(f"LCM quality check, {sizes.quality_samples} samples, {sizes.resolution} px", "seconds per validation",
            quality_seconds, f"first validation (the teacher's sets included); at the default {default_samples} "
            f"samples about {quality_seconds * default_samples / sizes.quality_samples:.0f} s"),
        Row(f"LCM quality check, {sizes.quality_samples} samples, {sizes.resolution} px", "peak memory (GiB)",
            gib(quality_peak), "during the check, weights included"),
    ]
    return rows


def step_rows(check: str, ours, reference, note: str) -> list[Row]:
    """Ours against diffusers', and the seed's whole run projected from our step (one micro-batch)."""
    seed = load_seed()[0]
    steps, accumulation = seed["max_train_steps"], seed["gradient_accumulation_steps"]
    ratio = ours.seconds_per_step / reference.seconds_per_step
    projected_h = steps * accumulation * ours.seconds_per_step / 3600
    return [
        Row(check, "ours s/step", ours.seconds_per_step, f"stock `simpletuner train`; {note}"),
        Row(check, "diffusers s/step", reference.seconds_per_step, "parity re-implementation of the script's step"),
        Row(check, "time ours / diffusers", ratio, "target <= 0.9"),
        Row(check, "ours peak memory (GiB)", gib(ours.peak), "per step, weights included"),
        Row(check, "diffusers peak memory (GiB)", gib(reference.peak), ""),
        Row(check, f"{steps} steps projected (h)", projected_h,
            f"x{accumulation} micro-batches per step as the seed; target <= 5"),
    ]


def quanto_rows(model_dir: Path, work: Path, sizes: Sizes, device: str, model_name: str) -> list[Row]:
    """The seed's step with int8-quanto base weights, ours against diffusers'. Diffusers' side runs first: on a CPU
    it is the quick probe of whether quanto's int8 kernels run there at all."""
    check = f"seed config + int8-quanto, {model_name}, {sizes.resolution} px"
    if importlib.util.find_spec("optimum.quanto") is None:
        return [Row(check, "ours s/step", None, "skipped: optimum-quanto is not installed")]
    try:
        reference = sdxl_real_size.measure_harness("reference", model_dir, work, device=device,
                                                   resolution=sizes.resolution, steps=sizes.steps, quanto=True,
                                                   label="diffusers int8-quanto")
    except SystemExit as error:
        if device != "cpu":
            raise
        # optimum-quanto 0.2.7 with torch 2.14: "_weight_int8pack_mm_cpu : A must be contiguous on the last dimension".
        return [Row(check, "ours s/step", None,
                    f"skipped: int8-quanto does not train on a CPU here ({str(error).strip().splitlines()[-1][:160]})")]
    started = time.perf_counter()
    ours = sdxl_real_size.measure_stock_trainer(
        model_dir, work, device=device, resolution=sizes.resolution, steps=sizes.steps, images=sizes.steps,
        label="ours int8-quanto", overrides={"base_model_precision": "int8-quanto"})
    return step_rows(check, ours, reference, f"stock run {time.perf_counter() - started:.0f} s")


def two_rank_rows(model_dir: Path, work: Path, sizes: Sizes, device: str, model_name: str, gpus: int) -> list[Row]:
    check = f"2 ranks, seed config, {model_name}, {sizes.resolution} px"
    if device != "cuda" or gpus < 2:
        return [Row(check, "s/step", None, f"skipped: needs 2 CUDA GPUs, {gpus} visible")]
    ranks = sdxl_real_size.measure_stock_trainer(
        model_dir, work, device=device, resolution=sizes.resolution, steps=sizes.steps, images=2 * sizes.steps,
        label="2 ranks", extra_env={"TRAINING_NUM_PROCESSES": "2", "ACCELERATE_EXTRA_ARGS": "--multi_gpu"})
    return [Row(check, "s/step", ranks.seconds_per_step, "batch 1 per rank, rank 0's steps"),
            Row(check, "peak memory on rank 0 (GiB)", gib(ranks.peak), "")]


# ---- the run -----------------------------------------------------------------------------------------------------


DEVICE_STEP_SETUPS = (("lcm", "lora", False), ("tcd", "lora", False), ("pcm", "lora", False), ("lcm", "lora", True),
                      ("lcm", "full", False))


def device_step_rows(device: str) -> list[Row]:
    """One LCM step per setup (variant, model type, LoRA EMA target) of the tiny SDXL UNet in bf16 on `device`. On
    CUDA, under sync debug mode "error", so an `.item()` or a host-made tensor copied in raises; on the CPU there is
    no sync to catch (tests/unit/test_distiller_devices.py proves it on the meta device)."""
    import torch
    from lcm_plugin.config import LcmConfig
    from lcm_plugin.simpletuner.distiller import LcmDistiller

    parity = step_bench.load_parity_module()
    check = f"LCM step on {device}, host syncs raise" if device == "cuda" else "LCM step on cpu"
    passed, notes = 0, []
    for variant, model_type, target_ema in DEVICE_STEP_SETUPS:
        name = f"{variant} {model_type}" + (" + EMA target" if target_ema else "")
        unet = parity.tiny_lora_unet(torch.float32).to(device=device, dtype=torch.bfloat16)
        model = parity.FakeUnetModel(unet, "epsilon")
        distiller = LcmDistiller(model, noise_scheduler=parity.noise_scheduler("epsilon"), full_model=model_type == "full",
                                 config=LcmConfig(variant=variant, lora_target_ema=target_ema))
        batch = {key: value.to(device) if isinstance(value, torch.Tensor) else
                 {k: v.to(device) for k, v in value.items()} for key, value in
                 parity.family_batch(2, torch.bfloat16, 0).items()}
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            prepared = distiller.prepare_batch(batch, model, {"global_step": 0})
            loss, _ = distiller.compute_distill_loss(prepared, model.model_predict(prepared), None)
            loss.backward()
            distiller.post_training_step(model, 0)
            target_dtypes = {p.dtype for p in distiller.target_unet.parameters()} if model_type == "full" else None
            if target_dtypes not in (None, {torch.float32}):
                raise RuntimeError(f"the full model's target is {target_dtypes}, not float32")
            passed += 1
        except RuntimeError as error:
            notes.append(f"{name}: {str(error).splitlines()[0][:120]}")
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    return [Row(check, f"setups that ran (of {len(DEVICE_STEP_SETUPS)})", passed,
                "; ".join(notes) or "lcm, tcd, pcm LoRA; LoRA + EMA target; full model (float32 target)")]


def run_sections(sections: dict, parallel: bool) -> list[Row]:
    """Each section's rows in order; a section that fails gives one row naming the error (its figure missing)."""
    def guarded(name, section):
        started = time.perf_counter()
        try:
            return section()
        except (Exception, SystemExit) as error:  # noqa: BLE001 - one broken section must not hide the others
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return [Row(name, "failed", None, f"{type(error).__name__} after {time.perf_counter() - started:.0f} s: "
                        f"{first_line[:300]}")]

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(sections) if parallel else 1) as pool:
        futures = [pool.submit(guarded, name, section) for name, section in sections.items()]
        return [row for future in futures for row in future.result()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU mode even where a GPU is visible")
    parser.add_argument("--work", type=Path, default=None, help="folder for runs and logs (default: a temp folder)")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")

    import torch

    gpus = torch.cuda.device_count()
    device = "cuda" if gpus and not args.cpu else "cpu"
    sizes = GPU_SIZES if device == "cuda" else CPU_SIZES
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if device == "cuda":
        from lcm_plugin.real_sdxl import ensure_real_sdxl

        # The demo samples and scores on the host: every core, not the 2 threads its CPU default gives.
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
        model_dir, model_name = ensure_real_sdxl("bf16", device="cuda"), "real-size SDXL"
        card = torch.cuda.get_device_name()
    else:
        from lcm_plugin.demo import shapes
        from lcm_plugin.tiny_sdxl import save_tiny_sdxl

        model_dir, model_name = save_tiny_sdxl(work / "tiny-sdxl", vocabulary=shapes.VOCABULARY), "tiny SDXL"
        card = "CPU mode (no CUDA device)" if not gpus else "CPU mode (--cpu)"
    sections = {
        "demo": lambda: demo_rows(work, sizes),
        "seed config": lambda: seed_rows(model_dir, work, sizes, device, model_name),
        "int8-quanto": lambda: quanto_rows(model_dir, work, sizes, device, model_name),
        "2 ranks": lambda: two_rank_rows(model_dir, work, sizes, device, model_name, gpus),
        "device step": lambda: device_step_rows(device),
    }
    # On a GPU the sections run one after the other, so that none disturbs another's timing.
    rows = run_sections(sections, parallel=device == "cpu")
    print(f"{card}; torch {torch.__version__}; {time.perf_counter() - started:.0f} s in all; work {work}\n")
    print(markdown(rows))
    if any(row.measure == "failed" or (row.value is not None and not math.isfinite(row.value)) for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
