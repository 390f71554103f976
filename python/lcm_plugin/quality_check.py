"""The quality check run at each validation of an LCM run (issue 10; docs/quality.md, "During training").

At each validation the student samples at `steps` step counts with the distiller's validation scheduler, and its
samples are scored with `lcm_plugin.quality` against the teacher's many-step samples, beside the teacher's own DDIM at
the same step counts and the floor. The teacher never changes during a run (LoRA: the base with adapters off; full
model: a frozen copy), so its sets are sampled at the first check and reused: later checks only sample the student.

Noise follows the metric's protocol: the reference draws from REFERENCE_NOISE_SEED; the floor and every row from
EVALUATION_NOISE_SEED, the same at every check, so successive checks differ only by the student's weights.

This module knows diffusers pipelines, not SimpleTuner: the adapter (`simpletuner/quality_check_patches.py`) hands it
the validation pipeline, the teacher network, the scheduler, the prompt embeddings, and logs what it returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from lcm_plugin import quality
from lcm_plugin.config.lcm import QualityCheckConfig

METRIC_PREFIX = "lcm_quality/"
REFERENCE_NOISE_SEED = 100
EVALUATION_NOISE_SEED = 200
BOOTSTRAP_SEED = 0  # one resampling stream at every check: interval changes come from the samples only
GRID_COLUMNS = 8
GRID_CELL_MAX_EDGE = 256
GRID_LABEL_WIDTH = 170
SAMPLE_BATCH = 8  # samples per pipeline call; CFG doubles the UNet batch


@dataclass(frozen=True)
class Sampler:
    """One row: the teacher with DDIM (trailing spacing, CFG) or the student with its own scheduler, no CFG."""

    model: Literal["teacher", "student"]
    steps: int

    @property
    def label(self) -> str:
        name = "teacher DDIM" if self.model == "teacher" else "student"
        return f"{name} {self.steps} step{'s' if self.steps > 1 else ''}"

    @property
    def metric(self) -> str:
        return f"{METRIC_PREFIX}{self.model}_fd_{self.steps}step"


# sample(sampler, noise_seed) -> uint8 images [samples, H, W, 3], sample i drawn with prompt i % len(prompts).
SampleFunction = Callable[[Sampler, int], np.ndarray]


@dataclass(frozen=True)
class QualityReport:
    metrics: dict[str, float]  # tracker values, all under METRIC_PREFIX
    grid: object  # PIL.Image: one row per sampler, one column per sample
    rows: dict[Sampler, quality.Comparison]
    summary: str  # the log lines


@dataclass
class _TeacherSets:
    reference: np.ndarray  # features
    floor: np.ndarray
    rows: dict[Sampler, np.ndarray]
    grid_images: dict[Sampler, np.ndarray]  # the first grid columns of the floor (reference sampler) and each row
    seconds: float


@dataclass
class QualityCheck:
    """The check of one run; keeps the teacher's sets and the time of the previous check between validations."""

    settings: QualityCheckConfig
    clock: Callable[[], float] = time.monotonic
    _teacher: _TeacherSets | None = field(default=None, init=False)
    _previous: tuple[float, int] | None = field(default=None, init=False)  # (clock at its end, global step)

    @property
    def reference_sampler(self) -> Sampler:
        return Sampler("teacher", self.settings.reference_steps)

    @property
    def rows(self) -> tuple[Sampler, ...]:
        return tuple(Sampler(model, steps) for model in ("teacher", "student") for steps in self.settings.steps)

    def run(self, sample: SampleFunction, *, step: int) -> QualityReport:
        """Sample what is missing, score every row against the reference, and time it all."""
        started = self.clock()
        teacher_seconds = None
        if self._teacher is None:
            self._teacher = self._sample_teacher(sample)
            teacher_seconds = self._teacher.seconds
        images = {row: sample(row, EVALUATION_NOISE_SEED) for row in self.rows if row.model == "student"}
        features = {**self._teacher.rows, **{row: quality.image_features(images[row]) for row in images}}
        comparisons = quality.compare_to_reference(
            self._teacher.reference, self._teacher.floor, {row.metric: features[row] for row in self.rows},
            seed=BOOTSTRAP_SEED,
        )
        rows = {row: comparisons[row.metric] for row in self.rows}
        grid_images = {**self._teacher.grid_images, **{row: images[row][:GRID_COLUMNS] for row in images}}
        grid = comparison_grid(
            [(f"{self.reference_sampler.label} (ref.)", grid_images[self.reference_sampler])]
            + [(row.label, grid_images[row]) for row in self.rows]
        )
        ended = self.clock()
        seconds = ended - started
        metrics = score_metrics(rows)
        metrics[f"{METRIC_PREFIX}seconds"] = seconds
        if teacher_seconds is not None:
            metrics[f"{METRIC_PREFIX}teacher_seconds"] = teacher_seconds
        cost = ""
        if self._previous is not None:
            previous_end, previous_step = self._previous
            # What the check adds to training: its time over the run's wall time since the previous check.
            metrics[f"{METRIC_PREFIX}cost_share"] = seconds / max(started - previous_end, 1e-9)
            cost = (f"; {100 * metrics[f'{METRIC_PREFIX}cost_share']:.1f}% of the {started - previous_end:.1f} s the "
                    f"{step - previous_step} step(s) since the previous check took")
        self._previous = (ended, step)
        summary = format_summary(rows, step=step, samples=self.settings.samples, reference=self.reference_sampler)
        teacher = f", {teacher_seconds:.1f} s of it the teacher's sets (once per run)" if teacher_seconds else ""
        summary += f"\ncheck took {seconds:.1f} s{teacher}{cost}"
        return QualityReport(metrics, grid, rows, summary)

    def _sample_teacher(self, sample: SampleFunction) -> _TeacherSets:
        started = self.clock()
        reference = sample(self.reference_sampler, REFERENCE_NOISE_SEED)
        floor = sample(self.reference_sampler, EVALUATION_NOISE_SEED)
        rows = {row: sample(row, EVALUATION_NOISE_SEED) for row in self.rows if row.model == "teacher"}
        return _TeacherSets(
            reference=quality.image_features(reference),
            floor=quality.image_features(floor),
            rows={row: quality.image_features(images) for row, images in rows.items()},
            grid_images={self.reference_sampler: floor[:GRID_COLUMNS],
                         **{row: images[:GRID_COLUMNS] for row, images in rows.items()}},
            seconds=self.clock() - started,
        )


def score_metrics(rows: Mapping[Sampler, quality.Comparison]) -> dict[str, float]:
    """Tracker values: the floor with its range, and each row's FD with its interval."""
    floor = next(iter(rows.values())).floor
    metrics = {
        f"{METRIC_PREFIX}floor": floor.value,
        f"{METRIC_PREFIX}floor_low": floor.low,
        f"{METRIC_PREFIX}floor_high": floor.high,
    }
    for sampler, comparison in rows.items():
        metrics[sampler.metric] = comparison.fd.value
        metrics[f"{sampler.metric}_low"] = comparison.fd.low
        metrics[f"{sampler.metric}_high"] = comparison.fd.high
    return metrics


def format_summary(rows: Mapping[Sampler, quality.Comparison], *, step: int, samples: int, reference: Sampler) -> str:
    floor = next(iter(rows.values())).floor
    lines = [
        f"LCM quality at step {step} ({samples} samples per row; FD to the {reference.label} teacher samples, "
        f"lower is closer): floor {floor.value:.1f}, a matching sampler scores in [{floor.low:.1f}, {floor.high:.1f}]"
    ]
    for sampler, comparison in rows.items():
        fd = comparison.fd
        verdict = "above floor" if comparison.above_floor else "within floor"
        lines.append(f"  {sampler.label:<22} {fd.value:10.1f} [{fd.low:.1f}, {fd.high:.1f}]  {verdict}")
    return "\n".join(lines)


def comparison_grid(rows: list[tuple[str, np.ndarray]]):
    """PIL image: one labelled row per sampler, one column per sample (uint8 [C, H, W, 3] each, same C, H, W).
    Cells larger than GRID_CELL_MAX_EDGE are shrunk by an integer factor."""
    from PIL import Image, ImageDraw

    columns, height, width = rows[0][1].shape[:3]
    shrink = -(-max(height, width) // GRID_CELL_MAX_EDGE)  # ceil
    cell_h, cell_w = height // shrink, width // shrink
    canvas = Image.new("RGB", (GRID_LABEL_WIDTH + columns * cell_w, len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (label, images) in enumerate(rows):
        if images.shape[:3] != (columns, height, width):
            raise ValueError(f"grid row {label!r} has images {images.shape}, the first row {rows[0][1].shape}")
        top = index * cell_h
        draw.text((6, top + cell_h // 2 - 6), label, fill="black")
        for column, image in enumerate(images):
            tile = Image.fromarray(image)
            if shrink > 1:
                tile = tile.resize((cell_w, cell_h), Image.Resampling.LANCZOS)
            canvas.paste(tile, (GRID_LABEL_WIDTH + column * cell_w, top))
    return canvas


def cycled_conditioning(per_prompt: list[Mapping[str, object]], samples: int) -> dict[str, object]:
    """Batched pipeline inputs for `samples` samples, sample i with prompt i % len(per_prompt).
    per_prompt: one dict of tensors [1, ...] per prompt (the pipeline's prompt_embeds, pooled_prompt_embeds, ...)."""
    import torch

    order = [per_prompt[i % len(per_prompt)] for i in range(samples)]
    return {key: torch.cat([inputs[key] for inputs in order]) for key in per_prompt[0]}


@contextmanager
def _swapped(pipeline, **components) -> Iterator[None]:
    saved = {name: getattr(pipeline, name) for name in components}
    for name, value in components.items():
        setattr(pipeline, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(pipeline, name, value)


def pipeline_sampler(
    pipeline,
    *,
    conditioning: Mapping[str, object],
    width: int,
    height: int,
    teacher_unet: Callable[[], AbstractContextManager],
    student_scheduler: Callable[[], object],
    training_scheduler_config,
    guidance_scale: float,
) -> SampleFunction:
    """A SampleFunction over a diffusers text-to-image pipeline (SDXL, SD 1.x/2.x).

    conditioning: batched prompt embeddings for every sample (`cycled_conditioning`). teacher_unet: a context that
    yields the teacher network (the LoRA run's UNet with adapters off, or the full-model run's frozen copy).
    student_scheduler: a fresh validation scheduler of the distiller. The teacher uses classifier-free guidance
    with the LCM unconditional input (zero embeddings), the student none: guidance was distilled into it.
    """
    import torch
    from diffusers import DDIMScheduler

    def sample(sampler: Sampler, noise_seed: int) -> np.ndarray:
        unet = pipeline.unet
        samples = len(next(iter(conditioning.values())))
        shape = (samples, unet.config.in_channels, height // pipeline.vae_scale_factor, width // pipeline.vae_scale_factor)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed))
        # LCM's fresh noise between steps; one stream across batches.
        generator = torch.Generator().manual_seed(noise_seed + 1)
        if sampler.model == "teacher":
            # Trailing spacing starts every step count at t = 999 (SDXL's "leading" starts DDIM-1 at t = 1).
            scheduler = DDIMScheduler.from_config(training_scheduler_config, timestep_spacing="trailing")
            network, scale = teacher_unet(), guidance_scale
        else:
            scheduler, network, scale = student_scheduler(), nullcontext(unet), 1.0
        images = []
        with network as model, _swapped(pipeline, unet=model, scheduler=scheduler), torch.no_grad():
            for start in range(0, samples, SAMPLE_BATCH):
                batch = {key: value[start:start + SAMPLE_BATCH] for key, value in conditioning.items()}
                if scale > 1.0:
                    batch |= {f"negative_{key}": torch.zeros_like(value)
                              for key, value in batch.items() if key.endswith("embeds")}
                output = pipeline(
                    prompt=None,
                    latents=noise[start:start + SAMPLE_BATCH].to(unet.device, unet.dtype),
                    num_inference_steps=sampler.steps,
                    guidance_scale=scale,
                    width=width,
                    height=height,
                    generator=generator,
                    output_type="np",
                    **batch,
                ).images
                images.append((np.clip(np.asarray(output, dtype=np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8))
        return np.concatenate(images)

    return sample
