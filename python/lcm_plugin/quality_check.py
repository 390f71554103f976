"""The quality check run at each validation of an LCM run (issue 10; docs/quality.md, "During training").

At each validation the student samples at `steps` step counts with the distiller's validation scheduler, and its
samples are scored with `lcm_plugin.quality` against the teacher's many-step samples, beside the teacher's own DDIM at
the same step counts and the floor. The teacher never changes during a run (LoRA: the base with adapters off; full
model: a frozen copy), so its sets are sampled at the first check and reused: later checks only sample the student.

Noise follows the metric's protocol: the reference draws from REFERENCE_NOISE_SEED; the floor and every row from
EVALUATION_NOISE_SEED, the same at every check, so successive checks differ only by the student's weights. Each sample's
noise depends on its seed and index only, so the batch sizes, which follow the free accelerator memory
(`sampling_batches`), never change a sample.

This module knows diffusers pipelines, not SimpleTuner: the adapter (`simpletuner/quality_check_patches.py`) hands it
the validation pipeline, the teacher network, the scheduler, the prompt embeddings, and logs what it returns.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from lcm_plugin import quality
from lcm_plugin.config.lcm import QualityCheckConfig
from lcm_plugin.memory_estimate import INFERENCE_ACTIVATIONS, MEGAPIXEL, VAE_DECODE_ACTIVATIONS

METRIC_PREFIX = "lcm_quality/"
REFERENCE_NOISE_SEED = 100
EVALUATION_NOISE_SEED = 200
BOOTSTRAP_SEED = 0  # one resampling stream at every check: interval changes come from the samples only
GRID_COLUMNS = 8
GRID_CELL_MAX_EDGE = 256
GRID_LABEL_WIDTH = 170
SAMPLE_BATCH = 8  # samples per pipeline call and per VAE decode where the free memory is unknown (a CPU)
# The part of the free accelerator memory the batches are sized to fill; the rest absorbs the allocator's fragmentation
# and the error of the per-image costs.
FREE_MEMORY_SHARE = 0.8


@dataclass(frozen=True)
class Sampler:
    """One row: the teacher with its own sampler (CFG; `teacher_sampler`: DDIM with trailing spacing, or Euler on a
    flow teacher's shifted grid) or the student with its own scheduler, no CFG."""

    model: Literal["teacher", "student"]
    steps: int
    teacher_sampler: str = field(default="DDIM", compare=False)  # names the row; the metric stays the same

    @property
    def label(self) -> str:
        name = f"teacher {self.teacher_sampler}" if self.model == "teacher" else "student"
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
    teacher_sampler: str = "DDIM"  # "Euler" for a flow teacher (pipeline_sampler's teacher rows)
    _teacher: _TeacherSets | None = field(default=None, init=False)
    _previous: tuple[float, int] | None = field(default=None, init=False)  # (clock at its end, global step)

    @property
    def reference_sampler(self) -> Sampler:
        return Sampler("teacher", self.settings.reference_steps, self.teacher_sampler)

    @property
    def rows(self) -> tuple[Sampler, ...]:
        return tuple(Sampler(model, steps, self.teacher_sampler) for model in ("teacher", "student")
                     for steps in self.settings.steps)

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
    per_prompt: one dict of tensors [1, ...] per prompt (the pipeline's prompt_embeds, pooled_prompt_embeds, ...), or
    of one-item lists of per-sample tensors (Z-Image's prompt_embeds: each prompt's masked tokens, [L_i, D]), which
    stay lists; an input set to None (Flux's prompt_mask without masked training) is left to the pipeline's
    default; a tensor without the batch axis of 1 (LongCat-Image's text_ids: the text's rope positions, the same for
    every prompt) is one `SharedInput` for every sample."""
    import torch

    order = [per_prompt[i % len(per_prompt)] for i in range(samples)]
    return {key: [item for inputs in order for item in inputs[key]] if isinstance(value, list)
            else SharedInput(value) if value.ndim and value.shape[0] != 1
            else torch.cat([inputs[key] for inputs in order])
            for key, value in per_prompt[0].items() if value is not None}


@dataclass(frozen=True)
class SharedInput:
    """A pipeline input with no batch axis (`cycled_conditioning`): every pipeline call takes it whole."""

    value: object


def sampling_batches(free_bytes: int | None, width: int, height: int, dtype_bytes: int, *, guided: bool
                     ) -> tuple[int, int]:
    """(samples per pipeline call, latents per VAE decode call), each at least 1, for width x height images whose
    activations take dtype_bytes per element, with free_bytes of accelerator memory free; SAMPLE_BATCH for both where
    that is unknown (None: a CPU). guided: classifier-free guidance runs the UNet on twice the samples.

    The per-image costs are lcm_plugin.memory_estimate's fits of the real-size SDXL in bf16 (bench/memory_fit.py),
    scaled by dtype_bytes / 2: the UNet without grad 0.257 GiB per sample-megapixel + 0.063 GiB, the VAE decode
    1.988 GiB per image-megapixel + 0.035 GiB. Issue 20 puts the decode at about 1 GiB per 1024 x 1024 bf16 image; the
    fit, twice that, errs towards smaller chunks. The decode runs after the call's denoising has freed its activations,
    so each gets the whole budget.
    """
    if free_bytes is None:
        return SAMPLE_BATCH, SAMPLE_BATCH
    megapixels = width * height / MEGAPIXEL
    budget = FREE_MEMORY_SHARE * free_bytes * 2 / dtype_bytes  # in bytes of bf16 activations, the fits' unit
    sample_batch = max(1, _largest_batch(INFERENCE_ACTIVATIONS, budget, megapixels) // (2 if guided else 1))
    return sample_batch, max(1, min(sample_batch, _largest_batch(VAE_DECODE_ACTIVATIONS, budget, megapixels)))


def _largest_batch(coefficients: tuple[float, float], budget: float, megapixels: float) -> int:
    per_sample_megapixel, constant = coefficients
    return int((budget - constant) // (per_sample_megapixel * megapixels))


def free_accelerator_bytes(device) -> int | None:
    """What allocations on `device` can still get: the driver's free memory plus what torch's caching allocator holds
    unused (it releases that before it reports out of memory). None off CUDA: unknown."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _activation_dtype_bytes(pipeline, denoiser) -> int:
    """Bytes per activation element when sampling: the wider of the denoiser's (UNet or transformer) and the VAE's
    dtypes. The pipeline decodes a float16 VAE that sets `force_upcast` (SDXL's) in float32."""
    import torch

    vae = pipeline.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    return max(denoiser.dtype.itemsize, 4 if upcast else vae.dtype.itemsize)


def _chunked_decode(vae, batch: int) -> Callable:
    """`vae.decode` on at most `batch` latents per VAE call: a pipeline decodes all its call's latents in one, the
    check's largest allocation at high resolution."""
    import torch
    from diffusers.models.autoencoders.vae import DecoderOutput

    decode = vae.decode

    def chunked(latents, return_dict: bool = True, **kwargs):
        images = torch.cat([decode(chunk, return_dict=False, **kwargs)[0] for chunk in latents.split(batch)])
        return DecoderOutput(sample=images) if return_dict else (images,)

    return chunked


def _sample_generators(seed: int, samples: int) -> list:
    """One generator per sample for the fresh noise LCM (and TCD) adds between steps; a pipeline draws sample i's noise
    from generator i, so it does not depend on the batch the sample is drawn in."""
    import torch

    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
            for index in range(samples)]


@contextmanager
def _swapped(owner, **attributes) -> Iterator[None]:
    """Sets attributes for the duration; then the owner is as before: an attribute its class provided (a method) is
    deleted from the instance again, not pinned there."""
    saved = {name: vars(owner)[name] for name in attributes if name in vars(owner)}
    for name, value in attributes.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name in attributes:
            if name in saved:
                setattr(owner, name, saved[name])
            else:
                delattr(owner, name)


def pipeline_sampler(
    pipeline,
    *,
    conditioning: Mapping[str, object],
    width: int,
    height: int,
    teacher_network: Callable[[], AbstractContextManager],
    student_scheduler: Callable[[], object],
    training_scheduler_config,
    guidance_scale: float,
    embedded_guidance: bool = False,
) -> SampleFunction:
    """A SampleFunction over a diffusers text-to-image pipeline (SDXL, SD 1.x/2.x, and the flow families').

    conditioning: batched prompt embeddings for every sample (`cycled_conditioning`). teacher_network: a context that
    yields the teacher network (the LoRA run's UNet or transformer with adapters off, or the full-model run's frozen
    copy). student_scheduler: a fresh validation scheduler of the distiller. The teacher uses classifier-free guidance
    with the LCM unconditional input (zero embeddings; attention masks stay the prompt's), the student none: guidance
    was distilled into it. `embedded_guidance` (Flux): `guidance_scale` is the model's own guidance input, which
    teacher and student both take (the student was distilled at it), with no unconditional branch. The
    teacher's sampler is DDIM (trailing spacing) on an epsilon / v teacher, Euler on its own shifted grid
    (`FlowMatchEulerDiscreteScheduler`, the flow pipelines') on a flow teacher.
    Each set is sampled in pipeline calls and VAE decodes sized by `sampling_batches` to the memory free at its start.
    """
    import torch

    from lcm_plugin.inference import is_flow_matching

    flow = is_flow_matching(training_scheduler_config)
    denoiser = "transformer" if flow else "unet"

    def teacher_scheduler():
        if flow:
            from diffusers import FlowMatchEulerDiscreteScheduler

            return FlowMatchEulerDiscreteScheduler.from_config(training_scheduler_config)
        from diffusers import DDIMScheduler

        # Trailing spacing starts every step count at t = 999 (SDXL's "leading" starts DDIM-1 at t = 1).
        return DDIMScheduler.from_config(training_scheduler_config, timestep_spacing="trailing")

    def sample(sampler: Sampler, noise_seed: int) -> np.ndarray:
        network_in_place = getattr(pipeline, denoiser)
        samples = len(next(iter(conditioning.values())))
        generators = _sample_generators(noise_seed, samples)
        noise = None
        if not flow:  # sample i: its slice i (a flow pipeline draws sample i's noise from generator i, packed or not)
            shape = (samples, network_in_place.config.in_channels, height // pipeline.vae_scale_factor,
                     width // pipeline.vae_scale_factor)
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed))
        if sampler.model == "teacher":
            scheduler, network, scale = teacher_scheduler(), teacher_network(), guidance_scale
        else:
            scheduler, network = student_scheduler(), nullcontext(network_in_place)
            scale = guidance_scale if embedded_guidance else 1.0
        guided = scale > 1.0 and not embedded_guidance  # classifier-free guidance: an unconditional half
        sample_batch, decode_batch = sampling_batches(free_accelerator_bytes(network_in_place.device), width, height,
                                                      _activation_dtype_bytes(pipeline, network_in_place), guided=guided)
        images = []
        with (network as model, _swapped(pipeline, **{denoiser: model}, scheduler=scheduler),
              _swapped(pipeline.vae, decode=_chunked_decode(pipeline.vae, decode_batch)), torch.no_grad()):
            for start in range(0, samples, sample_batch):
                batch = slice(start, start + sample_batch)
                inputs = {key: value.value if isinstance(value, SharedInput) else value[batch]
                          for key, value in conditioning.items()}
                if guided:  # masks by either name: prompt_attention_mask, prompt_embeds_mask (Qwen-Image, Krea 2)
                    inputs |= {f"negative_{key}": _zeros_like(value) if key.endswith("embeds") else value
                               for key, value in inputs.items()
                               if key.endswith(("embeds", "attention_mask", "embeds_mask"))}
                if noise is not None:
                    inputs["latents"] = noise[batch].to(network_in_place.device, network_in_place.dtype)
                with _fresh_noise_from(scheduler, generators[batch]) if flow else nullcontext():
                    output = pipeline(
                        prompt=None,
                        num_inference_steps=sampler.steps,
                        width=width,
                        height=height,
                        generator=generators[batch],
                        output_type="np",
                        **_guidance_arguments(pipeline, scale, embedded=embedded_guidance),
                        **_call_arguments(pipeline, inputs),
                    ).images
                images.append((np.clip(np.asarray(output, dtype=np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8))
        return np.concatenate(images)

    return sample


def _guidance_arguments(pipeline, scale: float, *, embedded: bool) -> dict:
    """The pipeline call's guidance for `scale`: the model's own guidance input (`embedded`), else a CFG scale w (1:
    unguided). SimpleTuner's own Flux and Flux 2 pipelines take CFG as `guidance_scale_real` (their `guidance_scale`
    feeds the guidance embedding, which a model without one ignores) and skip it on the first `no_cfg_until_timestep`
    steps: here it guides every step, as the distiller's teacher does. SimpleTuner's SD3, AuraFlow, Z-Image and Krea 2
    pipelines apply CFG-Zero* by default (the guided velocity rescaled, the first steps zeroed): turned off, so that
    the teacher's rows are the plain CFG the distiller's teacher takes."""
    import inspect

    from lcm_plugin.inference import pipeline_cfg_scale

    if embedded:
        return {"guidance_scale": scale}
    parameters = inspect.signature(pipeline.__call__).parameters
    if "guidance_scale_real" in parameters:
        return {"guidance_scale_real": scale, "no_cfg_until_timestep": 0}
    plain = {"use_cfg_zero_star": False} if "use_cfg_zero_star" in parameters else {}
    return {"guidance_scale": pipeline_cfg_scale(type(pipeline), scale), **plain}


def _call_arguments(pipeline, inputs: dict) -> dict:
    """`inputs` less what the pipeline's call does not take (SimpleTuner's Flux 2 pipeline: the text cache's attention
    mask, which its transformer never reads), as SimpleTuner's validation filters its own call's arguments."""
    import inspect

    parameters = inspect.signature(pipeline.__call__).parameters
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return inputs
    return {key: value for key, value in inputs.items() if key in parameters}


def _zeros_like(value):
    """The LCM unconditional input for a prompt input: zeros of its shape (per sample for a list of tensors)."""
    import torch

    return [torch.zeros_like(item) for item in value] if isinstance(value, list) else torch.zeros_like(value)


def _fresh_noise_from(scheduler, generators: list):
    """The scheduler's steps draw their fresh noise (FlowMatchLCMScheduler's renoising) from `generators`, one per
    sample: flow pipelines call `scheduler.step` without their generator, so it would come from torch's global one,
    which the batch sizes and everything else drawing from it would change."""
    import inspect

    step = scheduler.step
    if "generator" not in inspect.signature(step).parameters:
        return nullcontext()
    return _swapped(scheduler, step=functools.partial(step, generator=generators))
