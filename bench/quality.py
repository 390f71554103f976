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
    OMP_NUM_THREADS=1 .venv/bin/python bench/quality.py --family sd3   # the flow rows (issue 21)

--family sd3 does the same on the demo's flow teacher (lcm_plugin/demo/assets/flow_teacher, a tiny SD3 trained on the
same shapes by scripts/train_demo_teacher.py --family sd3): the teacher's rows are its own sampler, Euler on its
shifted grid (FlowMatchEulerDiscreteScheduler), guided at the same CFG scale, its reference Euler-50; the students
are the flow variants (LCM, LCM + EMA target, PCM; TCD is refused on the flow path) sampled with their variant's
flow scheduler, trained on SimpleTuner's SD3 latents ((sample - shift_factor) * scaling_factor) and the SD3
transformer call of SimpleTuner's SD3 model class.

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
FLOW_EXACT_STEP_COUNTS = (2, 4, 8)  # FlowMatchLCMScheduler's 2 steps are nearly its 1 (its grid ends at sigma 0.009)
REFERENCE_NOISE_SEED, EVALUATION_NOISE_SEED = 100, 200
DEMO_TRAINING = demo_run.DEFAULT_TRAINING  # the bench trains as the demo does, in this process
DATASET_ROWS = demo_run.DATASET_SIZE
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

FLOW_VARIANTS = (
    Variant("LCM"),
    Variant("LCM + EMA target", {"lora_target_ema": True}),
    Variant("PCM (2 phases)", {"variant": "pcm", "pcm_phases": 2}),
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


class FlowBenchModel:
    """The parts of SimpleTuner's SD3 model object LcmDistiller and DistillationBase use."""

    def __init__(self, transformer):
        from simpletuner.helpers.models.common import PredictionTypes

        self.transformer = transformer
        self.PREDICTION_TYPE = PredictionTypes.FLOW_MATCHING
        self.config = SimpleNamespace(lora_type="standard", model_family="sd3")

    def get_trained_component(self):
        return self.transformer

    def model_predict(self, batch):
        # SimpleTuner's SD3._model_predict_single call.
        prediction = self.transformer(hidden_states=batch["noisy_latents"], timestep=batch["timesteps"],
                                      encoder_hidden_states=batch["encoder_hidden_states"],
                                      pooled_projections=batch["add_text_embeds"], return_dict=False)[0]
        return {"model_prediction": prediction}


def dataset_latents(vae):
    """The demo dataset's latents as SimpleTuner caches them: VAE posterior samples, (sample - shift) * scale."""
    import torch

    images, captions = shapes.sample_images(demo_run.DATASET_SIZE, demo_run.DATASET_SEED)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    generator = torch.Generator().manual_seed(demo_run.DATASET_SEED)
    with torch.no_grad():
        samples = torch.cat([vae.encode(chunk).latent_dist.sample(generator) for chunk in pixels.split(128)])
    return (samples - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor, captions


def encode_dataset(pipeline):
    """The demo dataset as SimpleTuner caches it for SDXL: latents and text embeds."""
    from lcm_plugin.demo import sampling

    latents, captions = dataset_latents(pipeline.vae)
    return latents, sampling.encode(pipeline, captions, shapes.IMAGE_SIZE)


def train_student(network, model_class, noise_scheduler, batch_of, variant: Variant, lcm_block: dict, *, steps: int,
                  seed: int, log):
    """A LoRA student of `variant` on a copy of `network` (the teacher's UNet or transformer, wrapped in
    `model_class`), trained for `steps` optimizer steps by LcmDistiller on `batch_of(index, generator)`; returns
    (network, distiller, s/step)."""
    import torch
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    from lcm_plugin.config import LcmConfig
    from lcm_plugin.simpletuner.distiller import LcmDistiller

    torch.manual_seed(seed)
    network = copy.deepcopy(network)
    network.requires_grad_(False)
    rank = DEMO_TRAINING.lora_rank
    network.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                   target_modules=list(variant.lora_targets)))
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=variant.learning_rate, weight_decay=0.01)
    # What SimpleTuner's get_lr_scheduler builds for the demo's lr_scheduler "linear": warm-up, then decay to 0.
    scheduler = get_scheduler(DEMO_TRAINING.lr_scheduler, optimizer, num_warmup_steps=max(steps // 10, 1),
                              num_training_steps=steps)
    model = model_class(network)
    distiller = LcmDistiller(model, noise_scheduler=noise_scheduler, config=LcmConfig.model_validate(lcm_block))
    generator = torch.Generator().manual_seed(seed)
    started = time.monotonic()
    for step in range(steps):
        batch = batch_of(torch.randint(0, DATASET_ROWS, (DEMO_TRAINING.train_batch_size,), generator=generator),
                         generator)
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
    network.requires_grad_(False)
    return network, distiller, (time.monotonic() - started) / steps


def cell(comparison) -> str:
    mark = " " if comparison.above_floor else "*"
    return f"{comparison.fd.value:7.1f} [{comparison.fd.low:6.1f},{comparison.fd.high:6.1f}]{mark}"


def sdxl_bench(args, seed_lcm: dict, guidance_scale: float, log):
    """The SDXL teacher's rows (DDIM, exact consistency) and its students' trainer and sampler."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    from lcm_plugin.demo import sampling

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(demo_config.TEACHER))
    pipeline.set_progress_bar_config(disable=True)
    latents, train_cond = encode_dataset(pipeline)
    prompts = [shapes.PROMPTS[i % len(shapes.PROMPTS)] for i in range(args.samples)]
    cond = sampling.encode(pipeline, prompts, shapes.IMAGE_SIZE)
    noise = noise_of(args.samples, pipeline.unet.config.in_channels)

    def teacher(seed: int, steps: int) -> np.ndarray:
        sampled = sampling.sample_ddim(pipeline.unet, pipeline.scheduler.config, noise(seed), cond, steps=steps,
                                       guidance_scale=guidance_scale)
        return quality.image_features(sampling.decode(pipeline.vae, sampled).numpy())

    reference, floor, rows = teacher_sets(teacher, "teacher DDIM", args.samples, guidance_scale, log)

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

    def batch_of(index, generator) -> dict:
        return {
            "latents": latents[index],
            "noise": torch.randn(latents[index].shape, generator=generator),
            "encoder_hidden_states": train_cond.prompt_embeds[index],
            "added_cond_kwargs": {"text_embeds": train_cond.pooled[index], "time_ids": train_cond.time_ids[index]},
        }

    def student(variant: Variant, seed: int):
        unet, distiller, seconds_per_step = train_student(
            pipeline.unet, lambda unet: BenchModel(unet, pipeline.scheduler.config.prediction_type),
            DDPMScheduler.from_config(pipeline.scheduler.config), batch_of, variant, {**seed_lcm, **variant.lcm},
            steps=args.steps, seed=seed, log=log,
        )

        def sample(steps: int) -> np.ndarray:
            sampled = sampling.sample_student(unet, distiller.get_scheduler(), noise(EVALUATION_NOISE_SEED), cond,
                                              steps=steps, generator=torch.Generator().manual_seed(EVALUATION_NOISE_SEED + 1))
            return quality.image_features(sampling.decode(pipeline.vae, sampled).numpy())

        return sample, seconds_per_step

    return Bench("DDIM", reference, floor, rows, ["teacher DDIM", *exact_samplers], VARIANTS, student)


def sd3_bench(args, seed_lcm: dict, guidance_scale: float, log):
    """The SD3 flow teacher's rows (Euler on its shifted grid) and its students' trainer and sampler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from lcm_plugin.config import LcmConfig
    from lcm_plugin.demo import flow_sampling, sampling
    from lcm_plugin.inference import variant_scheduler

    pipeline = StableDiffusion3Pipeline.from_pretrained(str(demo_config.FLOW_TEACHER))
    pipeline.set_progress_bar_config(disable=True)
    tokens = demo_config.FLOW_TEACHER_T5_TOKENS
    latents, captions = dataset_latents(pipeline.vae)
    train_cond = flow_sampling.encode(pipeline, captions, tokens)
    prompts = [shapes.PROMPTS[i % len(shapes.PROMPTS)] for i in range(args.samples)]
    cond = flow_sampling.encode(pipeline, prompts, tokens)
    noise = noise_of(args.samples, pipeline.transformer.config.in_channels)
    transformer, scheduler_config = pipeline.transformer, pipeline.scheduler.config

    def teacher(seed: int, steps: int) -> np.ndarray:
        sampled = flow_sampling.sample_euler(transformer, scheduler_config, noise(seed), cond, steps=steps,
                                             guidance_scale=guidance_scale)
        return quality.image_features(sampling.decode(pipeline.vae, sampled).numpy())

    reference, floor, rows = teacher_sets(teacher, "teacher Euler", args.samples, guidance_scale, log)

    # A perfect LCM student in FlowMatchLCMScheduler (a perfect PCM student in its phased Euler is the Euler-50).
    exact_label = "exact consistency, LCM sampler"
    for steps in FLOW_EXACT_STEP_COUNTS:
        sampled = flow_sampling.sample_exact_consistency(
            transformer, variant_scheduler(scheduler_config, LcmConfig.model_validate(seed_lcm)), scheduler_config,
            noise(EVALUATION_NOISE_SEED), cond, steps=steps, to_data=True, guidance_scale=guidance_scale,
            num_ddim_timesteps=seed_lcm["num_ddim_timesteps"],
            generator=torch.Generator().manual_seed(EVALUATION_NOISE_SEED + 1),
        )
        rows[f"{exact_label} {steps}"] = quality.image_features(sampling.decode(pipeline.vae, sampled).numpy())
    log(f"exact-consistency rows sampled ({exact_label})")

    def batch_of(index, generator) -> dict:
        return {
            "latents": latents[index],
            "noise": torch.randn(latents[index].shape, generator=generator),
            "encoder_hidden_states": train_cond.prompt_embeds[index],
            "add_text_embeds": train_cond.pooled[index],
        }

    def student(variant: Variant, seed: int):
        network, distiller, seconds_per_step = train_student(
            transformer, FlowBenchModel, FlowMatchEulerDiscreteScheduler.from_config(scheduler_config), batch_of,
            variant, {**seed_lcm, **variant.lcm}, steps=args.steps, seed=seed, log=log,
        )

        def sample(steps: int) -> np.ndarray:
            sampled = flow_sampling.sample_student(
                network, distiller.get_scheduler(), noise(EVALUATION_NOISE_SEED), cond, steps=steps,
                generator=torch.Generator().manual_seed(EVALUATION_NOISE_SEED + 1),
            )
            return quality.image_features(sampling.decode(pipeline.vae, sampled).numpy())

        return sample, seconds_per_step

    return Bench("Euler", reference, floor, rows, ["teacher Euler", exact_label], FLOW_VARIANTS, student)


def teacher_sets(teacher, label: str, samples: int, guidance_scale: float, log):
    """The features of `teacher(noise seed, steps)`: its 50-step reference and floor, and a row per step count."""
    reference = teacher(REFERENCE_NOISE_SEED, 50)
    floor = teacher(EVALUATION_NOISE_SEED, 50)
    rows = {f"{label} {steps}": teacher(EVALUATION_NOISE_SEED, steps) for steps in STEP_COUNTS}
    log(f"teacher sets sampled ({samples} samples each, CFG scale {guidance_scale:g})")
    return reference, floor, rows


@dataclass(frozen=True)
class Bench:
    """One family's table: the teacher's sampler name, its reference and floor features, its rows' features and
    labels, the variants to train and `student(variant, seed)` -> (sample(steps) -> features, s/step)."""

    sampler: str
    reference: np.ndarray
    floor: np.ndarray
    rows: dict
    teacher_labels: list[str]
    variants: tuple[Variant, ...]
    student: object


def noise_of(samples: int, channels: int):
    import torch

    size = shapes.IMAGE_SIZE // 8
    return lambda seed: torch.randn(samples, channels, size, size, generator=torch.Generator().manual_seed(seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sdxl", "sd3"), default="sdxl",
                        help="the demo's SDXL teacher, or its SD3 flow teacher (assets/flow_teacher)")
    parser.add_argument("--quick", action="store_true", help="60 steps, one seed, 48 samples: checks every row runs")
    parser.add_argument("--steps", type=int, default=DEMO_TRAINING.max_train_steps,
                        help="optimizer steps per student (default: the demo's); 10 students at 0.06-0.3 s/step here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument("--samples", type=int, default=144, help="samples per row (the demo's metric count)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.samples = 60, [0], 48

    import torch
    from diffusers.utils import logging as diffusers_logging

    from lcm_plugin.demo.run import teacher_guidance_scale

    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    wall_started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - wall_started:6.0f}s] {message}", flush=True)

    seed_lcm = json.loads(demo_config.SEED_CONFIG.read_text())["distillation_config"]["lcm"]
    guidance_scale = teacher_guidance_scale(seed_lcm)
    bench = (sdxl_bench if args.family == "sdxl" else sd3_bench)(args, seed_lcm, guidance_scale, log)
    rows = dict(bench.rows)
    timings = {}
    for variant in bench.variants:
        for seed in args.seeds:
            log(f"training {variant.label}, seed {seed}, {args.steps} steps")
            sample, timings[f"{variant.label} (seed {seed})"] = bench.student(variant, seed)
            for steps in STEP_COUNTS:
                rows[f"{variant.label} (seed {seed}) {steps}"] = sample(steps)
    comparisons = quality.compare_to_reference(bench.reference, bench.floor, rows)
    floor_estimate = next(iter(comparisons.values())).floor

    labels = bench.teacher_labels + [f"{v.label} (seed {s})" for v in bench.variants for s in args.seeds]
    header = f"{'sampler':<34}" + "".join(f"{f'{steps} step' + ('s' if steps > 1 else ''):^26}" for steps in STEP_COUNTS)
    reference_sampler = f"{bench.sampler}-50"
    lines = [
        f"{args.family}: FD to the teacher's {reference_sampler} samples (CFG {guidance_scale:g}, reference noise seed "
        f"{REFERENCE_NOISE_SEED}); {args.samples} samples per cell, every cell on noise seed {EVALUATION_NOISE_SEED}.",
        f"Floor ({reference_sampler} on the cells' noise): {floor_estimate.value:.1f}, a sampler matching the teacher "
        f"scores in [{floor_estimate.low:.1f}, {floor_estimate.high:.1f}]. * = within the floor's range.",
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
