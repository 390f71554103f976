"""The measurements behind lcm_plugin.memory_estimate's activation terms, and the estimate's error against each.

Each measurement is its own process on the real-size SDXL (lcm_plugin.real_sdxl, bf16): it loads what the piece
needs, then runs it; activations = peak memory during the piece minus what the process held before it (on a CPU:
peak resident set minus resident set, a proxy for what a GPU allocates; the training step's gradients and optimizer
state, known from the parameter count, are subtracted too). Pieces:

    step     our LCM-LoRA step (bench/sdxl_real_size.py's harness: LcmDistiller, LoRA r64, torch AdamW), gradient
             checkpointing on or off
    forward  the UNet without grad (validation, the quality check)
    encode   the VAE encoder without grad (caching); decode: the VAE decoder without grad (validation)

Prints every measurement beside the estimator's activation term (its fitted coefficients) and the relative error,
as a markdown table. `--fit` also prints least-squares coefficients (per sample-megapixel, constant) per piece
from the measurements marked for fitting; the others are held out. Each measurement is also printed as a JSON line;
`--measured FILE` reads those lines back instead of measuring (the table again, after the coefficients change).
bench/memory_fit_cpu.jsonl holds the measurements behind the committed coefficients (the 2-core CPU VM).

    .venv/bin/python bench/memory_fit.py [--fit] [--quick]     # about 30 minutes on 2 cores, one thread per process
    .venv/bin/python bench/memory_fit.py --measured bench/memory_fit_cpu.jsonl --fit
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import sdxl_real_size  # bench/ is this script's folder

from lcm_plugin import memory_estimate

BENCH = Path(__file__).resolve().parent
GIB = 2**30


@dataclass(frozen=True)
class Case:
    piece: str  # "step", "forward", "encode", "decode"
    batch_size: int
    resolution: int  # square images, pixels
    gradient_checkpointing: bool = True
    fit: bool = True  # used for the fit; False: held out

    @property
    def megapixels(self) -> float:
        return self.resolution**2 / memory_estimate.MEGAPIXEL

    @property
    def name(self) -> str:
        checkpointing = ("" if self.piece != "step" else
                         ", checkpointed" if self.gradient_checkpointing else ", no checkpointing")
        return f"{self.piece} {self.batch_size} x {self.resolution}px{checkpointing}"


# Fitted at the extremes of each piece's sizes (the seed trains at 1024 px); the cases in between are held out.
CASES = (
    Case("step", 1, 256), Case("step", 1, 512, fit=False), Case("step", 2, 512), Case("step", 1, 768, fit=False),
    Case("step", 1, 1024),
    Case("step", 1, 256, False), Case("step", 1, 384, False, fit=False), Case("step", 1, 512, False),
    Case("forward", 2, 512), Case("forward", 4, 512), Case("forward", 8, 256, fit=False),
    Case("encode", 1, 512), Case("encode", 2, 512, fit=False), Case("encode", 1, 1024),
    Case("decode", 1, 512), Case("decode", 2, 512, fit=False), Case("decode", 1, 1024),
)
QUICK_CASES = tuple(case for case in CASES if case.resolution <= 512 and case.batch_size <= 2)


def coefficients_for(case: Case) -> tuple[float, float]:
    if case.piece == "step":
        return (memory_estimate.STEP_ACTIVATIONS_CHECKPOINTED if case.gradient_checkpointing
                else memory_estimate.STEP_ACTIVATIONS_FULL)
    return {"forward": memory_estimate.INFERENCE_ACTIVATIONS, "encode": memory_estimate.VAE_ENCODE_ACTIVATIONS,
            "decode": memory_estimate.VAE_DECODE_ACTIVATIONS}[case.piece]


def estimated_bytes(case: Case) -> float:
    return memory_estimate.activation_bytes(coefficients_for(case), case.batch_size, case.megapixels)


# ---- the pieces other than the step, in their own process -------------------------------------------------------


def piece(args) -> None:
    """Load the UNet or the VAE in bf16, run the piece twice without grad; record held and peak bytes."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peak_memory import append_record, current_bytes, peak_bytes, reset_peak

    device, dtype = torch.device(args.device), torch.bfloat16
    generator = torch.Generator(device).manual_seed(0)
    size = args.resolution // 8
    if args.piece == "forward":  # SDXL's own conditioning sizes: this script measures the real-size model only
        unet = UNet2DConditionModel.from_pretrained(str(args.model), subfolder="unet", dtype=dtype).to(device)
        inputs = dict(sample=torch.randn(args.batch_size, 4, size, size, generator=generator, device=device,
                                         dtype=dtype),
                      timestep=torch.full((args.batch_size,), 500, device=device),
                      encoder_hidden_states=torch.randn(args.batch_size, 77, 2048, generator=generator, device=device,
                                                        dtype=dtype),
                      added_cond_kwargs={"text_embeds": torch.randn(args.batch_size, 1280, generator=generator,
                                                                    device=device, dtype=dtype),
                                         "time_ids": torch.full((args.batch_size, 6), float(args.resolution),
                                                                device=device, dtype=dtype)})

        def run() -> None:
            unet(**inputs)
    else:
        vae = AutoencoderKL.from_pretrained(str(args.model), subfolder="vae", dtype=dtype).to(device)
        if args.piece == "encode":
            images = torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=generator,
                                device=device, dtype=dtype) * 2 - 1

            def run() -> None:
                vae.encode(images).latent_dist.sample()
        else:
            latents = torch.randn(args.batch_size, 4, size, size, generator=generator, device=device, dtype=dtype)

            def run() -> None:
                vae.decode(latents).sample
    module = unet if args.piece == "forward" else vae
    with torch.no_grad():
        for parameter in module.parameters():  # read the memory-mapped weights in, so that "loaded" holds them
            parameter.sum()
    append_record(args.record, {"event": "loaded", "bytes": current_bytes(device)})
    with torch.no_grad():
        for number in (1, 2):
            reset_peak(device)
            started, cpu_started = time.perf_counter(), time.process_time()
            run()
            append_record(args.record, {"event": "step", "step": number, "seconds": time.perf_counter() - started,
                                        "cpu_seconds": time.process_time() - cpu_started,
                                        "peak_bytes": peak_bytes(device)})


def measure(case: Case, model_dir: Path, work: Path, device: str) -> float:
    """Activation bytes of `case`: peak during the piece's last run minus what the process held before its first."""
    label = case.name
    if case.piece == "step":
        measured = sdxl_real_size.measure_harness(
            "ours", model_dir, work, device=device, resolution=case.resolution, steps=2,
            batch_size=case.batch_size, gradient_checkpointing=case.gradient_checkpointing, label=label)
        trainable = memory_estimate.lora_parameters(64, memory_estimate.DEFAULT_LORA_TARGETS)
        # bf16 gradients and torch AdamW's two bf16 states of the LoRA weights.
        return measured.peak - measured.loaded_bytes - trainable * 2 * 3
    record = work / f"{case.piece}-{case.batch_size}-{case.resolution}.jsonl"
    record.unlink(missing_ok=True)
    log = record.with_suffix(".log")
    command = [sys.executable, str(Path(__file__)), "piece", "--piece", case.piece, "--model", str(model_dir),
               "--device", device, "--resolution", str(case.resolution), "--batch-size", str(case.batch_size),
               "--record", str(record)]
    code, _ = sdxl_real_size.run_process(command, cwd=BENCH.parent, env=sdxl_real_size.base_env(device, "bf16"),
                                         log=log, timeout_s=3600)
    measured = sdxl_real_size.read_records(record, warmup_steps=1, label=label)
    if code != 0 or not measured.peak_bytes:
        raise SystemExit(f"{label} failed (exit {code}):\n{log.read_text(errors='replace')[-3000:]}")
    return measured.peak - measured.loaded_bytes


def least_squares(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(slope, intercept) of bytes against sample-megapixels; the slope alone through 0 with one distinct x."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return mean_y / mean_x, 0.0
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return slope, mean_y - slope * mean_x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("piece", help="internal: one no-grad piece in this process")
    run.add_argument("--piece", choices=("forward", "encode", "decode"), required=True)
    run.add_argument("--model", type=Path, required=True)
    run.add_argument("--device", default="cpu")
    run.add_argument("--resolution", type=int, required=True)
    run.add_argument("--batch-size", type=int, required=True)
    run.add_argument("--record", required=True)
    parser.add_argument("--fit", action="store_true", help="print least-squares coefficients per piece")
    parser.add_argument("--quick", action="store_true", help="only cases up to 512 px and batch 2")
    parser.add_argument("--pieces", default="step,forward,encode,decode", help="which pieces to measure")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default=None)
    parser.add_argument("--measured", type=Path, default=None,
                        help="JSON lines this script printed before: use them instead of measuring")
    args = parser.parse_args()
    if args.command == "piece":
        piece(args)
        return

    cases = [case for case in (QUICK_CASES if args.quick else CASES) if case.piece in args.pieces.split(",")]
    if args.measured:
        by_name = {case.name: case for case in CASES}
        records = [json.loads(line) for line in args.measured.read_text().splitlines() if line.startswith("{")]
        results = [(by_name[record["case"]], record["measured_gib"] * GIB) for record in records]
    else:
        from lcm_plugin.real_sdxl import ensure_real_sdxl

        model_dir = ensure_real_sdxl("bf16")
        work = Path(args.work or tempfile.mkdtemp(prefix="memory-fit-"))
        work.mkdir(parents=True, exist_ok=True)
        results = []
        for case in cases:
            measured = measure(case, model_dir, work, args.device)
            results.append((case, measured))
            print(json.dumps({"case": case.name, "measured_gib": measured / GIB}), flush=True)

    print(f"\nActivations on {args.device} (peak minus held; estimator's coefficients as committed)\n")
    print("| measurement | fit or held out | measured (GiB) | estimated (GiB) | error |")
    print("| --- | --- | --- | --- | --- |")
    for case, measured in results:
        estimate = estimated_bytes(case)
        print(f"| {case.name} | {'fit' if case.fit else 'held out'} | {measured / GIB:.2f} | {estimate / GIB:.2f} | "
              f"{(estimate - measured) / measured:+.0%} |")
    if args.fit:
        print()
        groups: dict[str, list[tuple[float, float]]] = {}
        for case, measured in results:
            if case.fit:
                key = case.piece + ("" if case.piece != "step" else
                                    " checkpointed" if case.gradient_checkpointing else " full")
                groups.setdefault(key, []).append((case.batch_size * case.megapixels, measured))
        for key, points in groups.items():
            slope, intercept = least_squares(points)
            print(f"{key}: ({slope / GIB:.3f} * GIB, {intercept / GIB:.3f} * GIB)")


if __name__ == "__main__":
    main()
