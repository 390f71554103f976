"""`simpletuner-lcm demo`: distil the shipped tiny shapes teacher into an LCM-LoRA with the stock SimpleTuner
trainer, fully offline on a CPU, then compare teacher DDIM and student samples (grid.png + a table)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HELP = "offline demo: LCM-LoRA of a tiny SDXL shapes teacher with the real SimpleTuner trainer, then a comparison grid"


def add_arguments(parser) -> None:
    from lcm_plugin.demo.run import DEFAULT_TRAINING

    parser.add_argument("--output", type=Path, default=Path("demo-output"),
                        help="folder for the dataset, config, SimpleTuner output, grid.png and metrics.txt "
                        "(default: ./demo-output; regenerated on each run)")
    parser.add_argument("--steps", type=int, default=DEFAULT_TRAINING.max_train_steps,
                        help=f"LCM-LoRA training steps (default: {DEFAULT_TRAINING.max_train_steps})")


def run(args) -> int:
    from dataclasses import replace

    if args.steps < 1:
        print(f"simpletuner-lcm demo: --steps must be at least 1 (got {args.steps})", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from lcm_plugin.demo import run as demo

    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:5.0f}s] {message}", flush=True)

    training = replace(demo.DEFAULT_TRAINING, max_train_steps=args.steps)
    output = args.output.resolve()
    log(f"writing {demo.DATASET_SIZE} shape images and a SimpleTuner config (seed-derived) to {output}")
    demo.prepare(output, training)
    log("running the stock `simpletuner train` (log: simpletuner.log)")
    try:
        lora = demo.train(output, training.max_train_steps)
    except RuntimeError as error:
        print(f"simpletuner-lcm demo: {error}", file=sys.stderr)
        return 1
    log(f"LoRA written: {lora}")
    log("sampling the teacher (DDIM, trailing spacing) and the student (its variant's scheduler) on fresh noise, "
        "scored against an independent teacher DDIM-50 reference (docs/quality.md)")
    _, table = demo.evaluate(output, log=log)
    print(table)
    log(f"done: grid {output / 'grid.png'}, table {output / 'metrics.txt'}")
    return 0
