"""Which consistency variant gets closest to the teacher's many-step samples? (issue 10, item 4; docs/quality.md)

On the demo's teacher (lcm_plugin/demo/assets/teacher) and data (its generated shapes dataset), trains an LCM-LoRA
student per variant and training seed, then prints one table: lcm_plugin.quality's FD to the teacher's DDIM-50
samples at 1, 2, 4 and 8 steps, with each value's interval and the floor (the DDIM-50 sampler against itself),
beside the teacher's own DDIM at those step counts, and beside a perfect student (the teacher's guided ODE as the
consistency function) in LCM's and TCD's samplers at 2 and 4 steps: what the sampler alone costs. Not a test: a
measurement.

Training runs in this process with the plugin's LcmDistiller (the same prepare_batch / compute_distill_loss /
post_training_step the trainer calls, exact to diffusers' step: tests/unit/test_distiller_parity.py and
test_distiller_variants.py) and the demo's settings (LoRA rank 32, AdamW lr 1e-3 with 10 % warm-up and linear
decay to 0, batch 8, the seed config's lcm block; lcm_plugin.demo.run.DEFAULT_TRAINING), skipping SimpleTuner's
start-up. Latents are the VAE posterior's samples, as SimpleTuner caches them.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quality.py            # the full table
    OMP_NUM_THREADS=1 .venv/bin/python bench/quality.py --quick    # a smoke run of every row

One torch thread by default (OMP_NUM_THREADS): on a busy 2-core machine two threads spin against each other and
a forward of the demo UNet takes 5 s instead of 0.1 s.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from lcm_plugin import quality
from lcm_plugin.demo import config as demo_config
from lcm_plugin.demo import shapes
from lcm_plugin.demo import run as demo_run

STEP_COUNTS = (1, 2, 4, 8)
# The exact-consistency rows: at 1 step they are the teacher's DDIM-50 itself, and 8 steps cost ~200 guided calls.
EXACT_STEP_COUNTS = (2, 4)
REFERENCE_NOISE_SEED, EVALUATION_NOISE_SEED = 100, 200
DEMO_TRAINING = demo_run.DEFAULT_TRAINING  # the bench trains as the demo does, in this process
ATTENTION_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # SimpleTuner's default for lora_type standard on SDXL
# SimpleTuner's peft_lora_target_modules can name these: attention, feed-forward, ResNet and the UNet's in/out convs.
EVERY_LAYER_LORA_TARGETS = (*ATTENTION_LORA_TARGETS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                            "conv2", "time_emb_proj", "conv_in", "conv_out")


@dataclass(frozen=True)
class Variant:
    label: str
    lcm: dict = field(default_factory=dict)  # overrides of the seed config's lcm block
    lora_targets: tuple[str, ...] = ATTENTION_LORA_TARGETS
    learning_rate: float = DEMO_TRAINING.learning_rate


VARIANTS = (
    Variant("LCM"),
    Variant("LCM + EMA target", {"lora_target_ema": True}),
    Variant("TCD", {"variant": "tcd"}),
    Variant("TCD + EMA target", {"variant": "tcd", "lora_target_ema": True}),
    Variant("PCM (2 phases)", {"variant": "pcm", "pcm_phases": 2}),
    # lr 3e-4: closer at 4 steps than at the demo's 1e-3 (341 / 320 against 405 / 390, docs/quality.md).
    Variant("TCD + EMA, every layer", {"variant": "tcd", "lora_target_ema": True},
            lora_targets=EVERY_LAYER_LORA_TARGETS, learning_rate=3e-4),
)


class BenchModel:
    """The parts of SimpleTuner's SDXL model object LcmDistiller and DistillationBase use."""

    def __init__(self, unet, prediction_type: str):
        from simpletuner.helpers.models.common import PredictionTypes

        self.unet = unet
        self.PREDICTION_TYPE = PredictionTypes.from_str(prediction_type)
        self.config = SimpleNamespace(lora_type="standard")

    def get_trained_component(self):
        return self.unet

    def model_predict(self, batch):
        # SimpleTuner's SDXL._model_predict_single call.
        prediction = self.unet(batch["noisy_latents"], batch["timesteps"], batch["encoder_hidden_states"],
                               added_cond_kwargs=batch["added_cond_kwargs"], return_dict=False)[0]
        return {"model_prediction": prediction}


def encode_dataset(pipeline):
    """The demo dataset as SimpleTuner caches it: VAE posterior samples times the scaling factor, text embeds."""
    import torch

    from lcm_plugin.demo import sampling

    images, captions = shapes.sample_images(demo_run.DATASET_SIZE, demo_run.DATASET_SEED)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    generator = torch.Generator().manual_seed(demo_run.DATASET_SEED)
    with torch.no_grad():
        latents = torch.cat([
            pipeline.vae.encode(chunk).latent_dist.sample(generator) for chunk in pixels.split(128)
        ]) * pipeline.vae.config.scaling_factor
    return latents, sampling.encode(pipeline, captions, shapes.IMAGE_SIZE)


def train_student(pipeline, latents, cond, variant: Variant, lcm_block: dict, *, steps: int, seed: int, log):
    """A LoRA student of `variant` trained for `steps` optimizer steps by LcmDistiller; returns (unet, distiller,
    s/step)."""
    import torch
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    from lcm_plugin.config import LcmConfig
    from lcm_plugin.simpletuner.distiller import LcmDistiller

    torch.manual_seed(seed)
    unet = copy.deepcopy(pipeline.unet)
    unet.requires_grad_(False)
    rank = DEMO_TRAINING.lora_rank
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(variant.lora_targets)))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=variant.learning_rate, weight_decay=0.01)
    # What SimpleTuner's get_lr_scheduler builds for the demo's lr_scheduler "linear": warm-up, then decay to 0.
    scheduler = get_scheduler(DEMO_TRAINING.lr_scheduler, optimizer, num_warmup_steps=max(steps // 10, 1),
                              num_training_steps=steps)
    lcm = LcmConfig.model_validate(lcm_block)
    model = BenchModel(unet, pipeline.scheduler.config.prediction_type)
    from diffusers import DDPMScheduler

    distiller = LcmDistiller(model, noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config), config=lcm)
    generator = torch.Generator().manual_seed(seed)
    started = time.monotonic()
    for step in range(steps):
        index = torch.randint(0, len(latents), (DEMO_TRAINING.train_batch_size,), generator=generator)
        batch = {
            "latents": latents[index],
            "noise": torch.randn(latents[index].shape, generator=generator),
            "encoder_hidden_states": cond.prompt_embeds[index],
            "added_cond_kwargs": {"text_embeds": cond.pooled[index], "time_ids": cond.time_ids[index]},
        }
        prepared = distiller.prepare_batch(batch, model, {"global_step": step})
        loss, _ = distiller.compute_distill_loss(prepared, model.model_predict(prepared), None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        distiller.post_training_step(model, step)
        if (step + 1) % max(steps // 4, 1) == 0:
            log(f"    step {step + 1}/{steps}: lcm_loss {loss.item():.3e}")
    unet.requires_grad_(False)
    return unet, distiller, (time.monotonic() - started) / steps


def cell(comparison) -> str:
    mark = " " if comparison.above_floor else "*"
    return f"{comparison.fd.value:7.1f} [{comparison.fd.low:6.1f},{comparison.fd.high:6.1f}]{mark}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 steps, one seed, 48 samples: checks every row runs")
    parser.add_argument("--steps", type=int, default=DEMO_TRAINING.max_train_steps,
                        help="optimizer steps per student (default: the demo's); 10 students at 0.06-0.3 s/step here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument("--samples", type=int, default=144, help="samples per row (the demo's metric count)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.samples = 60, [0], 48

    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    from lcm_plugin.demo import sampling
    from lcm_plugin.demo.run import teacher_guidance_scale

    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    wall_started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - wall_started:6.0f}s] {message}", flush=True)

    seed_lcm = json.loads(demo_config.SEED_CONFIG.read_text())["distillation_config"]["lcm"]
    guidance_scale = teacher_guidance_scale(seed_lcm)
    pipeline = StableDiffusionXLPipeline.from_pretrained(str(demo_config.ASSETS / "teacher"))
    pipeline.set_progress_bar_config(disable=True)
    latents, train_cond = encode_dataset(pipeline)
    prompts = [shapes.PROMPTS[i % len(shapes.PROMPTS)] for i in range(args.samples)]
    cond = sampling.encode(pipeline, prompts, shapes.IMAGE_SIZE)
    size = shapes.IMAGE_SIZE // 8

    def noise(seed: int):
        return torch.randn(args.samples, 4, size, size, generator=torch.Generator().manual_seed(seed))

    def teacher(seed: int, steps: int) -> np.ndarray:
        sampled = sampling.sample_ddim(pipeline.unet, pipeline.scheduler.config, noise(seed), cond, steps=steps,
                                       guidance_scale=guidance_scale)
        return quality.image_features(sampling.decode(pipeline.vae, sampled).numpy())

    reference = teacher(REFERENCE_NOISE_SEED, 50)
    floor = teacher(EVALUATION_NOISE_SEED, 50)
    rows = {f"teacher DDIM {steps}": teacher(EVALUATION_NOISE_SEED, steps) for steps in STEP_COUNTS}
    log(f"teacher sets sampled ({args.samples} samples each, CFG scale {guidance_scale:g})")

    exact_samplers = {"exact consistency, LCM sampler": 1.0, "exact consistency, TCD 0.3": 0.3}
    for label, gamma in exact_samplers.items():
        for steps in EXACT_STEP_COUNTS:
            sampled = sampling.sample_exact_consistency(
                pipeline.unet, pipeline.scheduler.config, noise(EVALUATION_NOISE_SEED), cond, steps=steps, gamma=gamma,
                guidance_scale=guidance_scale, num_ddim_timesteps=seed_lcm["num_ddim_timesteps"],
                generator=torch.Generator().manual_seed(EVALUATION_NOISE_SEED + 1),
            )
            rows[f"{label} {steps}"] = quality.image_features(sampling.decode(pipeline.vae, sampled).numpy())
    log(f"exact-consistency rows sampled ({', '.join(exact_samplers)})")

    timings = {}
    for variant in VARIANTS:
        for seed in args.seeds:
            log(f"training {variant.label}, seed {seed}, {args.steps} steps")
            unet, distiller, seconds_per_step = train_student(
                pipeline, latents, train_cond, variant, {**seed_lcm, **variant.lcm}, steps=args.steps, seed=seed,
                log=log,
            )
            timings[f"{variant.label} (seed {seed})"] = seconds_per_step
            for steps in STEP_COUNTS:
                sampled = sampling.sample_student(unet, distiller.get_scheduler(), noise(EVALUATION_NOISE_SEED), cond,
                                                  steps=steps, generator=torch.Generator().manual_seed(EVALUATION_NOISE_SEED + 1))
                rows[f"{variant.label} (seed {seed}) {steps}"] = quality.image_features(
                    sampling.decode(pipeline.vae, sampled).numpy()
                )
    comparisons = quality.compare_to_reference(reference, floor, rows)
    floor_estimate = next(iter(comparisons.values())).floor

    labels = ["teacher DDIM", *exact_samplers] + [f"{v.label} (seed {s})" for v in VARIANTS for s in args.seeds]
    header = f"{'sampler':<34}" + "".join(f"{f'{steps} step' + ('s' if steps > 1 else ''):^26}" for steps in STEP_COUNTS)
    lines = [
        f"FD to the teacher's DDIM-50 samples (CFG {guidance_scale:g}, reference noise seed {REFERENCE_NOISE_SEED}); "
        f"{args.samples} samples per cell, every cell on noise seed {EVALUATION_NOISE_SEED}.",
        f"Floor (DDIM-50 on the cells' noise): {floor_estimate.value:.1f}, a sampler matching the teacher scores in "
        f"[{floor_estimate.low:.1f}, {floor_estimate.high:.1f}]. * = within the floor's range.",
        f"Students: {args.steps} LoRA steps per training seed; cells: FD [95% bootstrap interval].",
        header,
    ]
    for label in labels:
        lines.append(f"{label:<34}" + "".join(
            f"{cell(comparisons[f'{label} {steps}']) if f'{label} {steps}' in comparisons else '-':>26}"
            for steps in STEP_COUNTS
        ))
    lines.append("Training s/step: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    lines.append(f"Wall time: {time.monotonic() - wall_started:.0f}s")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
