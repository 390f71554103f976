"""One LCM-LoRA training step: ours (LcmDistiller in SimpleTuner's call order) vs diffusers' step.

Same tiny SDXL UNet, same LoRA, same batch, in one run; steps alternate so drift in machine load hits both.
The reference is the diffusers re-implementation that tests/unit/test_distiller_parity.py proves equal to
ours (separate cond / uncond teacher calls); ours makes one batched teacher call. Prints the median time
per step of each and the ratio ours / reference (target <= 0.85; must not exceed 1.0).

    OMP_NUM_THREADS=1 .venv/bin/python bench/step.py [--steps 30] [--batch-size 4] [--latent-size 8]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from lcm_plugin.config import LcmConfig
from lcm_plugin.simpletuner.distiller import LcmDistiller

PARITY_TEST = Path(__file__).resolve().parents[1] / "tests" / "unit" / "test_distiller_parity.py"


def load_parity_module():
    spec = importlib.util.spec_from_file_location("distiller_parity", PARITY_TEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sized_batch(parity, batch_size: int, latent_size: int) -> dict:
    batch = parity.family_batch(batch_size, torch.float32, seed=0)
    generator = torch.Generator().manual_seed(1)
    for key in ("latents", "noise"):
        batch[key] = torch.randn(batch_size, 4, latent_size, latent_size, generator=generator)
    return batch


def fresh(batch: dict) -> dict:
    """A per-step copy: both steps write into the batch."""
    return {**batch, "added_cond_kwargs": dict(batch["added_cond_kwargs"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--latent-size", type=int, default=8)
    args = parser.parse_args()

    parity = load_parity_module()
    cfg = LcmConfig()
    scheduler = parity.noise_scheduler("epsilon")
    unet = parity.tiny_lora_unet(torch.float32)
    model = parity.FakeUnetModel(unet, "epsilon")
    distiller = LcmDistiller(model, noise_scheduler=scheduler, config=cfg)
    batch = sized_batch(parity, args.batch_size, args.latent_size)

    def our_step() -> None:
        prepared = distiller.prepare_batch(fresh(batch), model, {})
        loss, _ = distiller.compute_distill_loss(prepared, model.model_predict(prepared), None)
        loss.backward()

    def reference_step() -> None:
        index = torch.randint(0, cfg.num_ddim_timesteps, (args.batch_size,))
        w = cfg.w_min - 1 + (cfg.w_max - cfg.w_min) * torch.rand(args.batch_size)
        parity.reference_step(unet, scheduler, fresh(batch), index, w, cfg)

    timings: dict[str, list[float]] = {"ours": [], "reference": []}
    for step in range(args.steps + 3):
        for name, step_fn in (("ours", our_step), ("reference", reference_step)):
            unet.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step_fn()
            elapsed = time.perf_counter() - start
            if step >= 3:  # warm-up
                timings[name].append(elapsed)

    ours, reference = statistics.median(timings["ours"]), statistics.median(timings["reference"])
    print(f"tiny SDXL UNet + LoRA r4, batch {args.batch_size}x4x{args.latent_size}x{args.latent_size}, "
          f"{args.steps} steps each, torch threads {torch.get_num_threads()}")
    print(f"ours (batched teacher):       {ours * 1e3:8.1f} ms/step")
    print(f"reference (diffusers script): {reference * 1e3:8.1f} ms/step")
    print(f"ratio ours / reference: {ours / reference:.3f}")


if __name__ == "__main__":
    main()
