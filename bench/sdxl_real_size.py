"""One LCM-LoRA training step of SDXL at its real size: the stock `simpletuner train` against diffusers' step.

Model: lcm_plugin.real_sdxl (SDXL base 1.0's architecture, random weights, bf16, written once to
~/.cache/simpletuner-lcm). Settings: the seed's (demo/assets/seed_config.json): mixed_precision bf16, gradient
checkpointing, LoRA rank 64 on SimpleTuner's SDXL targets, batch 1, the seed's LCM block; one step is one optimizer
step (gradient_accumulation_steps 1; the seed accumulates 4 micro-batches per step).

Rows, each its own process, run one after the other on the same threads:
  - stock `simpletuner train`: the product as a user starts it (the seed's optimizer adamw_bf16); step time and
    peak memory measured inside the trainer by bench/step_probe, from the distiller's prepare_batch to its
    post_training_step (after the optimizer step).
  - our distiller alone: LcmDistiller's step in SimpleTuner's call order, without SimpleTuner.
  - diffusers' recipe: tests/unit/test_distiller_parity.py's re-implementation of train_lcm_distill_lora_sdxl.py's
    step (proven equal to ours there), teacher and target under autocast as the script runs them.
The last two share one harness: the UNet loaded in bf16 with the same LoRA, torch AdamW (the script's default),
random latents and embeddings of the run's shapes. SimpleTuner caches latents and embeddings; the script instead
keeps its VAE and both text encoders loaded and encodes every batch, which this comparison leaves out.

Peak memory on a CPU is the process's peak resident set during a measured step (VmHWM, reset at the step's start;
it includes the Python runtime and everything loaded), on a GPU the peak allocated bytes. The first step is a
warm-up and not counted. "Whole run" is the largest resident set sampled over the whole process tree's life.

    .venv/bin/python bench/sdxl_real_size.py [--resolution 512] [--steps 3] [--device cpu]   # OMP_NUM_THREADS=1 default
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PROBE_DIR = BENCH / "step_probe"
# SimpleTuner 4.10.1's SDXL.DEFAULT_LORA_TARGET: what a seed run trains.
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
SAMPLE_INTERVAL_S = 0.2
# SimpleTuner can hang at exit (bench/data_path.py); a run that recorded every step gets this long to exit.
EXIT_GRACE_S = 120

sys.path.insert(0, str(PROBE_DIR))


@dataclass
class Measured:
    """One row: per measured step (warm-up excluded) seconds and peak bytes; what the process held before its first
    step (harness rows); the largest resident set of the process tree (CPU runs)."""

    label: str
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    loaded_bytes: int | None = None
    run_peak_rss: int | None = None
    # Stock runs: images the in-trainer data path encoded and its data preparation seconds (the plugin's log lines),
    # and (seconds, peak bytes) of each LCM quality check.
    images_encoded: int | None = None
    data_seconds: float | None = None
    quality_checks: list[tuple[float, int]] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_seconds_per_step(self) -> float:
        return statistics.median(self.cpu_seconds)

    @property
    def peak(self) -> int:
        return max(self.peak_bytes)


def read_records(path: Path, warmup_steps: int, label: str, rank: int = 0) -> Measured:
    measured = Measured(label)
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        if record.get("rank", 0) != rank:
            continue
        if record["event"] == "loaded":
            measured.loaded_bytes = record["bytes"]
        elif record["event"] == "quality_check":
            measured.quality_checks.append((record["seconds"], record["peak_bytes"]))
        elif record["event"] == "step" and record["step"] > warmup_steps:
            measured.seconds.append(record["seconds"])
            measured.cpu_seconds.append(record["cpu_seconds"])
            measured.peak_bytes.append(record["peak_bytes"])
    return measured


# ---- the harness: our distiller or diffusers' step, in its own process ---------------------------------------------


def harness(args) -> None:
    """Load the UNet, add the LoRA, run `args.steps` optimizer steps of one implementation; one record per event."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from peak_memory import append_record, current_bytes, peak_bytes, reset_peak
    from step import fresh, load_parity_module  # bench/step.py: the tiny-model step benchmark

    from lcm_plugin.config import LcmConfig
    from lcm_plugin.demo.config import load_seed
    from lcm_plugin.simpletuner.distiller import LcmDistiller
    from lcm_plugin.tiny_sdxl import SDXL_SCHEDULER_CONFIG

    device, dtype = torch.device(args.device), torch.bfloat16
    parity = load_parity_module()
    cfg = LcmConfig(**load_seed()[0]["distillation_config"]["lcm"])
    unet = UNet2DConditionModel.from_pretrained(str(args.model), subfolder="unet", dtype=dtype).to(device)
    unet.requires_grad_(False)
    if args.quanto:
        from optimum.quanto import freeze, qint8, quantize

        quantize(unet, weights=qint8)
        freeze(unet)
    unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, target_modules=LORA_TARGETS))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for parameter in trainable:  # as the script (and SimpleTuner under bf16): the adapters in the weight dtype too
        parameter.data = parameter.data.to(device, dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    scheduler = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)

    size, batch_size = args.resolution // 8, args.batch_size
    generator = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    # The UNet's own conditioning sizes (2048 / 1280 at real size): SDXL's add-embedding input is the pooled text
    # embedding and 6 time ids of addition_time_embed_dim each.
    config = unet.config
    pooled = randn(batch_size, config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim)
    time_ids = torch.tensor([[args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]] * batch_size,
                            device=device, dtype=dtype)
    batch = {"latents": randn(batch_size, 4, size, size), "noise": randn(batch_size, 4, size, size),
             "encoder_hidden_states": randn(batch_size, 77, config.cross_attention_dim), "add_text_embeds": pooled,
             "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    if args.impl == "ours":
        model = parity.FakeUnetModel(unet, "epsilon")
        distiller = LcmDistiller(model, noise_scheduler=scheduler, config=cfg)

        def step() -> None:
            prepared = distiller.prepare_batch(fresh(batch), model, {})
            loss, _ = distiller.compute_distill_loss(prepared, model.model_predict(prepared), None)
            loss.backward()
    else:
        def step() -> None:
            index = torch.randint(0, cfg.num_ddim_timesteps, (batch_size,), device=device)
            w = cfg.w_min - 1 + (cfg.w_max - cfg.w_min) * torch.rand(batch_size, device=device)
            with torch.autocast(device.type, dtype=dtype):
                parity.reference_step(unet, scheduler, fresh(batch), index, w, cfg)

    if device.type == "cpu" and not args.quanto:
        # safetensors maps the weights from the file: read every page now, so that "loaded" holds them.
        with torch.no_grad():
            for parameter in unet.parameters():
                parameter.sum()
    append_record(args.record, {"event": "loaded", "bytes": current_bytes(device),
                                "trainable_parameters": sum(p.numel() for p in trainable)})
    for number in range(1, args.steps + 1):
        reset_peak(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peak = peak_bytes(device)
        append_record(args.record, {"event": "step", "step": number, "seconds": time.perf_counter() - started,
                                    "cpu_seconds": time.process_time() - cpu_started, "peak_bytes": peak})


# ---- running processes -----------------------------------------------------------------------------------------------


def tree_rss(root) -> int:
    """The largest resident set among `root` and its descendants now (0 for processes that vanished)."""
    import psutil

    largest = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            largest = max(largest, process.memory_info().rss)
        except psutil.Error:
            continue
    return largest


def run_process(command: list[str], *, cwd: Path, env: dict, log: Path, done=None, timeout_s: float) -> tuple[int, int]:
    """(exit code, largest resident set sampled in the process tree). Stopped `EXIT_GRACE_S` after `done()` turns
    true if it has not exited (SimpleTuner can hang at exit); stopped at `timeout_s` with an error."""
    import psutil

    started, done_at, largest = time.perf_counter(), None, 0
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        root = psutil.Process(process.pid)
        while process.poll() is None:
            largest = max(largest, tree_rss(root))
            time.sleep(SAMPLE_INTERVAL_S)
            now = time.perf_counter()
            if done_at is None and done is not None and done():
                done_at = now
            if (done_at is not None and now - done_at > EXIT_GRACE_S) or now - started > timeout_s:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                if done_at is None:
                    raise SystemExit(f"{command[0]} ran past {timeout_s:.0f} s; log: {log}")
                return 0, largest
    return process.returncode, largest


def base_env(device: str, mixed_precision: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MIXED_PRECISION=mixed_precision)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name in ("SIMPLETUNER_LCM_DISABLE", "SIMPLETUNER_LCM_DATA_PATH"):
        env.pop(name, None)
    if device == "cpu":
        # One thread unless told otherwise: on a shared machine, OpenMP threads that wait for a descheduled sibling
        # made a step 3x slower (2 threads on this 2-core VM with other jobs running).
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def measure_harness(impl: str, model_dir: Path, work: Path, *, device: str, resolution: int, steps: int,
                    batch_size: int = 1, gradient_checkpointing: bool = True, lora_rank: int = 64,
                    quanto: bool = False, label: str, timeout_s: float = 3600) -> Measured:
    """One harness process (our distiller or diffusers' step); raises with the log's tail if it fails."""
    record = work / f"{impl}-{resolution}-{batch_size}-{int(gradient_checkpointing)}-{int(quanto)}.jsonl"
    record.unlink(missing_ok=True)
    log = record.with_suffix(".log")
    command = [sys.executable, str(Path(__file__)), "harness", "--impl", impl, "--model", str(model_dir),
               "--device", device, "--resolution", str(resolution), "--batch-size", str(batch_size),
               "--gradient-checkpointing", str(int(gradient_checkpointing)), "--lora-rank", str(lora_rank),
               "--steps", str(steps), "--record", str(record)] + (["--quanto"] if quanto else [])
    code, largest = run_process(command, cwd=REPO, env=base_env(device, "bf16"), log=log, timeout_s=timeout_s)
    measured = read_records(record, warmup_steps=1, label=label)
    if code != 0 or len(measured.seconds) != steps - 1:
        raise SystemExit(f"{impl} harness failed (exit {code}):\n{log.read_text(errors='replace')[-3000:]}")
    measured.run_peak_rss = largest
    return measured


def write_images(folder: Path, count: int, resolution: int, seed: int = 1) -> Path:
    """`count` photo-like JPEGs (smooth random colour fields with grain, like a decoder's real work) of
    resolution x resolution, captioned with the demo's prompts: quick to make at 1024 px, unlike the shapes."""
    import numpy as np
    from PIL import Image

    from lcm_plugin.demo import shapes

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        field = np.asarray(coarse.resize((resolution, resolution), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, field.shape, dtype=np.int16)
        Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(folder / f"{index:04d}.jpg", quality=90)
        (folder / f"{index:04d}.txt").write_text(shapes.PROMPTS[index % len(shapes.PROMPTS)])
    return folder


def write_stock_run(root: Path, model_dir: Path, *, resolution: int, steps: int, images: int,
                    overrides: dict | None = None, lcm_overrides: dict | None = None) -> Path:
    """root/config/{config.json, multidatabackend.json} and root/data: the seed's settings on `images` generated
    pictures at `resolution`, one step per optimizer update, no validation, metrics to output/; then `overrides`
    (config.json keys) and `lcm_overrides` (distillation_config.lcm keys)."""
    from lcm_plugin.demo import config as demo_config

    data = write_images(root / "data", images, resolution)
    seed, seed_backends = demo_config.load_seed()
    training = demo_config.DemoTraining(max_train_steps=steps, learning_rate=seed["learning_rate"],
                                        lr_scheduler="constant", lora_rank=seed["lora_rank"], train_batch_size=1,
                                        image_size=resolution)
    config_dir = root / "config"
    config_dir.mkdir()
    backend_file = config_dir / "multidatabackend.json"
    backends = demo_config.derive_backends(seed_backends, training, data_dir=data, cache_dir=root / "cache")
    backend_file.write_text(json.dumps(backends, indent=2))
    config = demo_config.derive_config(seed, training, teacher_dir=model_dir, output_dir=root / "output",
                                       backend_file=backend_file)
    # The demo shrinks these for a CPU; this benchmark keeps the seed's.
    config.update({key: seed[key] for key in ("mixed_precision", "optimizer", "gradient_checkpointing",
                                              "lora_alpha")})
    config.update(overrides or {})
    lcm = {**seed["distillation_config"]["lcm"], **(lcm_overrides or {})}
    config["distillation_config"] = {**seed["distillation_config"], "lcm": lcm}
    (config_dir / "config.json").write_text(json.dumps(config, indent=2))
    return root


def measure_stock_trainer(model_dir: Path, work: Path, *, device: str, resolution: int, steps: int,
                          label: str, images: int = 2, overrides: dict | None = None,
                          lcm_overrides: dict | None = None, extra_env: dict | None = None,
                          wait_for_quality_check: bool = False, timeout_s: float = 3600) -> Measured:
    """`simpletuner train` on a fresh run folder, measured by bench/step_probe inside the trainer. A run is done when
    every step is recorded (and, with `wait_for_quality_check`, the validation after them)."""
    from lcm_plugin.demo.config import load_seed

    env = base_env(device, load_seed()[0]["mixed_precision"])
    if device == "cpu":
        # SimpleTuner sets torch's threads itself (torch_num_threads, default 8): the harness's count instead.
        overrides = {"torch_num_threads": int(env["OMP_NUM_THREADS"]), **(overrides or {})}
    root = write_stock_run(Path(tempfile.mkdtemp(prefix="stock-", dir=work)), model_dir, resolution=resolution,
                           steps=steps, images=images, overrides=overrides, lcm_overrides=lcm_overrides)
    record = root / "steps.jsonl"
    env.update(extra_env or {}, LCM_STEP_PROBE=str(record),
               PYTHONPATH=os.pathsep.join(filter(None, [str(PROBE_DIR), env.get("PYTHONPATH")])))

    def done() -> bool:
        recorded = read_records(record, warmup_steps=0, label=label)
        return len(recorded.seconds) >= steps and (recorded.quality_checks or not wait_for_quality_check)

    log = root / "simpletuner.log"
    code, largest = run_process([str(Path(sys.executable).parent / "simpletuner"), "train"], cwd=root, env=env,
                                log=log, done=done, timeout_s=timeout_s)
    measured = read_records(record, warmup_steps=1, label=label)
    output = log.read_text(errors="replace")
    if code != 0 or len(measured.seconds) != steps - 1:
        raise SystemExit(f"simpletuner train failed (exit {code}); log {log}:\n{output[-3000:]}")
    measured.run_peak_rss = largest
    encoded = re.findall(r"\((\d+) image\(s\) encoded here", output)
    prepared = re.findall(r"data preparation took ([0-9.]+) s", output)
    if encoded and prepared:
        measured.images_encoded, measured.data_seconds = int(encoded[-1]), float(prepared[-1])
    return measured


# ---- the table ---------------------------------------------------------------------------------------------------


def gib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**30:.2f}"


def markdown_table(rows: list[Measured], reference: Measured, *, cpu: bool) -> str:
    """One line per row; on a CPU also the process CPU seconds per step, which other jobs on the machine disturb far
    less than wall time, and the ratio of those."""
    memory = "peak RSS during a step" if cpu else "peak allocated during a step"
    header = ["run", "s/step", *(["CPU s/step"] if cpu else []), f"{memory} (GiB)", "whole run, largest RSS (GiB)",
              "time vs diffusers", *(["CPU time vs diffusers"] if cpu else []), "memory vs diffusers"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row.label, f"{row.seconds_per_step:.2f}",
                 *([f"{row.cpu_seconds_per_step:.2f}"] if cpu else []), gib(row.peak), gib(row.run_peak_rss),
                 f"{row.seconds_per_step / reference.seconds_per_step:.3f}",
                 *([f"{row.cpu_seconds_per_step / reference.cpu_seconds_per_step:.3f}"] if cpu else []),
                 f"{row.peak / reference.peak:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(args) -> None:
    from lcm_plugin.real_sdxl import ensure_real_sdxl

    model_dir = args.model or ensure_real_sdxl("bf16")
    work = Path(args.work or tempfile.mkdtemp(prefix="sdxl-real-size-"))
    work.mkdir(parents=True, exist_ok=True)
    common = dict(device=args.device, resolution=args.resolution, steps=args.steps)
    print(f"model {model_dir}; work {work}; {args.device}, OMP_NUM_THREADS "
          f"{base_env(args.device, 'bf16').get('OMP_NUM_THREADS', '-')}, load average {os.getloadavg()[0]:.1f}",
          flush=True)
    rows = {}
    for name, measure in (
        ("stock", lambda: measure_stock_trainer(model_dir, work, label="stock `simpletuner train` + plugin", **common)),
        ("ours", lambda: measure_harness("ours", model_dir, work, label="our distiller alone", **common)),
        ("reference", lambda: measure_harness("reference", model_dir, work,
                                              label="diffusers' recipe (parity re-implementation)", **common)),
    ):
        rows[name] = measure()
        print(f"{name}: {rows[name]}; load average {os.getloadavg()[0]:.1f}", flush=True)
    stock, ours, reference = rows["stock"], rows["ours"], rows["reference"]
    print(f"\n{model_dir}: SDXL architecture, random weights, bf16; {args.resolution} px, batch 1, LoRA r64, gradient "
          f"checkpointing, {args.steps - 1} measured step(s) after a warm-up; {args.device}\n")
    print(markdown_table([stock, ours, reference], reference, cpu=args.device == "cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("harness", help="internal: one implementation's steps in this process")
    run.add_argument("--impl", choices=("ours", "reference"), required=True)
    run.add_argument("--model", type=Path, required=True)
    run.add_argument("--device", default="cpu")
    run.add_argument("--resolution", type=int, required=True)
    run.add_argument("--batch-size", type=int, default=1)
    run.add_argument("--gradient-checkpointing", type=int, choices=(0, 1), default=1)
    run.add_argument("--lora-rank", type=int, default=64)
    run.add_argument("--steps", type=int, required=True)
    run.add_argument("--record", required=True)
    run.add_argument("--quanto", action="store_true", help="int8-quanto base weights (optimum-quanto)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run; the first is a warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", type=Path, default=None,
                        help="an SDXL folder in the diffusers layout (default: lcm_plugin.real_sdxl's, written if "
                        "missing)")
    parser.add_argument("--work", default=None, help="folder for run folders and logs (default: a new temp folder)")
    args = parser.parse_args()
    if args.command == "harness":
        harness(args)
    else:
        if args.steps < 2:
            parser.error("--steps must be at least 2: the first step is a warm-up")
        compare(args)


if __name__ == "__main__":
    main()
