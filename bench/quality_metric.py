"""Does the quality metric separate the demo teacher's few-step DDIM from its 50-step samples? (docs/quality.md)

Samples the demo teacher once (DDIM 50 on reference noise; DDIM 50, 1, 2, 4, 8 on independent evaluation
noise), caches the images in --cache, then prints lcm_plugin.quality's comparison for several feature
sets and sample counts. Not a test: a measurement that chose the metric's features.

    OMP_NUM_THREADS=2 .venv/bin/python bench/quality_metric.py --samples 384
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from lcm_plugin import quality
from lcm_plugin.demo import config, shapes

REFERENCE_SEED, EVALUATION_SEED = 100, 200
STEP_COUNTS = (1, 2, 4, 8)


def sample_sets(samples: int, cache: Path) -> dict[str, np.ndarray]:
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    from lcm_plugin.demo import sampling
    from lcm_plugin.demo.run import teacher_guidance_scale

    diffusers_logging.set_verbosity_error()
    seed_lcm = json.loads((config.ASSETS / "seed_config.json").read_text())["distillation_config"]["lcm"]
    guidance_scale = teacher_guidance_scale(seed_lcm)
    pipeline = StableDiffusionXLPipeline.from_pretrained(str(config.ASSETS / "teacher"))
    prompts = [shapes.PROMPTS[i % len(shapes.PROMPTS)] for i in range(samples)]
    cond = sampling.encode(pipeline, prompts, shapes.IMAGE_SIZE)
    latent = shapes.IMAGE_SIZE // 8

    def noise(seed: int) -> torch.Tensor:
        return torch.randn(samples, 4, latent, latent, generator=torch.Generator().manual_seed(seed))

    def ddim(seed: int, steps: int) -> np.ndarray:
        started = time.monotonic()
        latents = sampling.sample_ddim(pipeline.unet, pipeline.scheduler.config, noise(seed), cond, steps=steps,
                                       guidance_scale=guidance_scale)
        images = sampling.decode(pipeline.vae, latents).numpy()
        print(f"  DDIM-{steps} x {samples} (noise seed {seed}): {time.monotonic() - started:.0f}s", flush=True)
        return images

    plan = {"reference": (REFERENCE_SEED, 50), "floor": (EVALUATION_SEED, 50)}
    plan.update({f"DDIM-{steps}": (EVALUATION_SEED, steps) for steps in STEP_COUNTS})
    cache.mkdir(parents=True, exist_ok=True)
    for label, (seed, steps) in plan.items():
        path = cache / f"{label}-{samples}.npy"
        if not path.is_file():  # one file per set: an interrupted run resumes
            np.save(path, ddim(seed, steps))
    return {label: np.load(cache / f"{label}-{samples}.npy") for label in plan}


FEATURES = {
    "thumbnail 4x4 (48)": lambda images: quality.thumbnail_features(images, 4),
    "thumbnail 8x8 (192)": lambda images: quality.thumbnail_features(images, 8),
    "colour histogram 3x8 (24)": quality.colour_histogram_features,
    "gradient histogram (8)": quality.gradient_histogram_features,
    "image_features (colour + gradient histograms, 32)": quality.image_features,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=384)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lcm_quality_sets"),
                        help="folder of sampled image sets (reused when present)")
    parser.add_argument("--subsets", type=int, nargs="*", default=[48, 96, 144, 192, 256])
    parser.add_argument("--features", nargs="*", default=list(FEATURES))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    sets = sample_sets(args.samples, args.cache)
    total = len(sets["reference"])
    for name in args.features:
        features = {label: FEATURES[name](images) for label, images in sets.items()}
        for count in [c for c in args.subsets if c < total] + [total]:
            started = time.monotonic()
            rows = quality.compare_to_reference(
                features["reference"][:count], features["floor"][:count],
                {label: f[:count] for label, f in features.items() if label.startswith("DDIM")},
            )
            floor = next(iter(rows.values())).floor
            print(f"{name}, N={count}: floor {floor.value:.1f} [{floor.low:.1f}, {floor.high:.1f}]"
                  f" ({time.monotonic() - started:.1f}s)")
            for label, row in rows.items():
                verdict = "above floor" if row.above_floor else "within floor"
                print(f"  {label:<8} FD {row.fd.value:8.1f} [{row.fd.low:8.1f}, {row.fd.high:8.1f}]  {verdict}")


if __name__ == "__main__":
    main()
