"""lcm_plugin.quality_check: its numbers are lcm_plugin.quality's on the same samples; the teacher's sets are sampled
once; a broken student scores above the floor's range; the settings in the lcm block."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from lcm_plugin import quality, quality_check
from lcm_plugin.config import LcmConfig
from lcm_plugin.config.lcm import QualityCheckConfig
from lcm_plugin.demo import shapes
from lcm_plugin.demo.run import TEACHER_DIR
from lcm_plugin.inference import lcm_scheduler
from lcm_plugin.quality_check import METRIC_PREFIX, Sampler


class RecordingSampler:
    """Distinct, deterministic images per (sampler, noise seed); remembers every call and what it returned."""

    def __init__(self, samples: int, size: int = 16):
        self.samples, self.size, self.calls = samples, size, []

    def __call__(self, sampler: Sampler, noise_seed: int) -> np.ndarray:
        self.calls.append((sampler, noise_seed))
        rng = np.random.default_rng([noise_seed, sampler.steps, sampler.model == "student"])
        # Smoother images for more steps: the features (colour and gradient histograms) then differ per row.
        images = rng.integers(0, 256, (self.samples, self.size, self.size, 3)) // (1 + sampler.steps)
        return images.astype(np.uint8)

    def images(self, sampler: Sampler, noise_seed: int) -> np.ndarray:
        return RecordingSampler(self.samples, self.size)(sampler, noise_seed)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_logged_values_are_quality_functions_of_the_same_samples():
    settings = QualityCheckConfig(steps=[1, 4], samples=24, reference_steps=6)
    sampler = RecordingSampler(settings.samples)
    report = quality_check.QualityCheck(settings).run(sampler, step=10)

    # Independent path: features and Fréchet distances straight from lcm_plugin.quality on the images sampled.
    reference_sampler = Sampler("teacher", 6)
    reference = quality.image_features(sampler.images(reference_sampler, quality_check.REFERENCE_NOISE_SEED))
    floor = quality.image_features(sampler.images(reference_sampler, quality_check.EVALUATION_NOISE_SEED))
    rows = [Sampler(model, steps) for model in ("teacher", "student") for steps in (1, 4)]
    features = {row: quality.image_features(sampler.images(row, quality_check.EVALUATION_NOISE_SEED)) for row in rows}
    assert report.metrics[f"{METRIC_PREFIX}floor"] == pytest.approx(quality.frechet_distance(floor, reference))
    for row in rows:
        assert report.metrics[row.metric] == pytest.approx(quality.frechet_distance(features[row], reference))
    expected = quality.compare_to_reference(reference, floor, {row.metric: features[row] for row in rows},
                                            seed=quality_check.BOOTSTRAP_SEED)
    assert report.metrics[f"{METRIC_PREFIX}floor_low"] == expected[rows[0].metric].floor.low
    assert report.metrics[f"{METRIC_PREFIX}floor_high"] == expected[rows[0].metric].floor.high
    for row in rows:
        assert (report.metrics[f"{row.metric}_low"], report.metrics[f"{row.metric}_high"]) == (
            expected[row.metric].fd.low, expected[row.metric].fd.high)
    assert {f"{METRIC_PREFIX}student_fd_1step", f"{METRIC_PREFIX}teacher_fd_4step"} <= set(report.metrics)
    assert all(np.isfinite(value) for value in report.metrics.values())


def test_teacher_sets_are_sampled_once_and_cost_share_is_check_time_over_time_since_the_previous_check():
    settings = QualityCheckConfig(steps=[2], samples=8, reference_steps=4)
    clock = Clock()
    sampler = RecordingSampler(settings.samples)

    def timed(row, seed):
        clock.now += 1.0 if row.model == "teacher" else 0.5  # seconds per sampled set
        return sampler(row, seed)

    check = quality_check.QualityCheck(settings, clock=clock)
    first = check.run(timed, step=100)
    assert [call[0].model for call in sampler.calls] == ["teacher", "teacher", "teacher", "student"]
    assert first.metrics[f"{METRIC_PREFIX}teacher_seconds"] == pytest.approx(3.0)
    assert first.metrics[f"{METRIC_PREFIX}seconds"] == pytest.approx(3.5)
    assert f"{METRIC_PREFIX}cost_share" not in first.metrics  # no previous check to measure training time from

    sampler.calls.clear()
    clock.now += 20.0  # training between the checks
    second = check.run(timed, step=200)
    assert sampler.calls == [(Sampler("student", 2), quality_check.EVALUATION_NOISE_SEED)]
    assert second.metrics[f"{METRIC_PREFIX}seconds"] == pytest.approx(0.5)
    assert second.metrics[f"{METRIC_PREFIX}cost_share"] == pytest.approx(0.5 / 20.0)
    assert f"{METRIC_PREFIX}teacher_seconds" not in second.metrics
    assert second.metrics[f"{METRIC_PREFIX}teacher_fd_2step"] == first.metrics[f"{METRIC_PREFIX}teacher_fd_2step"]
    assert "100 step(s) since the previous check" in second.summary


def test_grid_has_one_row_per_sampler_and_one_column_per_sample():
    settings = QualityCheckConfig(steps=[1, 2, 4], samples=12, reference_steps=4)
    report = quality_check.QualityCheck(settings).run(RecordingSampler(settings.samples, size=16), step=1)
    rows = 1 + 2 * 3  # the reference sampler, then teacher and student at each step count
    columns = quality_check.GRID_COLUMNS
    assert report.grid.size == (quality_check.GRID_LABEL_WIDTH + columns * 16, rows * 16)
    pixels = np.asarray(report.grid)
    first_cell = pixels[0:16, quality_check.GRID_LABEL_WIDTH:quality_check.GRID_LABEL_WIDTH + 16]
    floor = RecordingSampler(12, 16).images(Sampler("teacher", 4), quality_check.EVALUATION_NOISE_SEED)
    np.testing.assert_array_equal(first_cell, floor[0])


def test_grid_shrinks_large_samples_by_an_integer_factor():
    images = np.zeros((3, 1024, 768, 3), np.uint8)
    grid = quality_check.comparison_grid([("a", images), ("b", images)])
    assert grid.size == (quality_check.GRID_LABEL_WIDTH + 3 * 192, 2 * 256)  # 1024 x 768 shrunk 4x


def test_cycled_conditioning_gives_sample_i_the_prompt_i_mod_count():
    per_prompt = [{"prompt_embeds": torch.full((1, 2, 3), float(i)), "pooled_prompt_embeds": torch.full((1, 4), float(i))}
                  for i in range(3)]
    batched = quality_check.cycled_conditioning(per_prompt, 7)
    assert batched["prompt_embeds"].shape == (7, 2, 3) and batched["pooled_prompt_embeds"].shape == (7, 4)
    assert batched["pooled_prompt_embeds"][:, 0].tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_cycled_conditioning_keeps_per_sample_lists_as_lists():
    """Z-Image's pipeline takes prompt_embeds as a list of each prompt's masked tokens, of different lengths; the
    unconditional input is zeros of each sample's shape."""
    per_prompt = [{"prompt_embeds": [torch.full((2 + i, 3), float(i + 1))]} for i in range(2)]
    batched = quality_check.cycled_conditioning(per_prompt, 3)
    assert isinstance(batched["prompt_embeds"], list)
    assert [tuple(t.shape) for t in batched["prompt_embeds"]] == [(2, 3), (3, 3), (2, 3)]
    assert [t[0, 0].item() for t in batched["prompt_embeds"][1:3]] == [2.0, 1.0]  # slicing a list: samples 1 and 2
    zeros = quality_check._zeros_like(batched["prompt_embeds"][1:3])
    assert [tuple(t.shape) for t in zeros] == [(3, 3), (2, 3)] and not any(t.any() for t in zeros)


def test_cycled_conditioning_passes_an_input_without_batch_axis_whole():
    """LongCat-Image's pipeline takes text_ids, the text's rope positions [L, 3], once for the whole batch."""
    positions = torch.arange(15.0).reshape(5, 3)
    per_prompt = [{"prompt_embeds": torch.full((1, 5, 2), float(i)), "text_ids": positions} for i in range(2)]
    batched = quality_check.cycled_conditioning(per_prompt, 3)
    assert batched["prompt_embeds"].shape == (3, 5, 2)
    assert isinstance(batched["text_ids"], quality_check.SharedInput) and batched["text_ids"].value is positions


@pytest.fixture(scope="module")
def demo_teacher():
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    pipeline = StableDiffusionXLPipeline.from_pretrained(str(TEACHER_DIR))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _conditioning(pipeline, samples: int) -> dict:
    per_prompt = []
    for prompt in shapes.PROMPTS:
        prompt_embeds, _, pooled, _ = pipeline.encode_prompt(prompt, do_classifier_free_guidance=False)
        per_prompt.append({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled})
    return quality_check.cycled_conditioning(per_prompt, samples)


@contextmanager
def _noise_output(unet):
    """The UNet (or transformer) predicts Gaussian noise whatever its input: a student that learnt nothing useful."""
    generator = torch.Generator().manual_seed(5)
    handle = unet.register_forward_hook(
        lambda module, args, output: (torch.randn(output[0].shape, generator=generator),) + tuple(output[1:])
    )
    try:
        yield
    finally:
        handle.remove()


def test_a_student_that_outputs_noise_scores_above_the_floor_with_the_real_pipeline(demo_teacher):
    lcm = LcmConfig(w_min=1.0, w_max=12.0, quality_check={"steps": [1, 2], "samples": 12, "reference_steps": 2})
    settings = lcm.quality_check
    sample = quality_check.pipeline_sampler(
        demo_teacher,
        conditioning=_conditioning(demo_teacher, settings.samples),
        width=shapes.IMAGE_SIZE,
        height=shapes.IMAGE_SIZE,
        teacher_network=lambda: nullcontext(demo_teacher.unet),
        student_scheduler=lambda: lcm_scheduler(demo_teacher.scheduler.config, num_ddim_timesteps=50,
                                                timestep_scaling=10.0),
        training_scheduler_config=demo_teacher.scheduler.config,
        guidance_scale=(lcm.w_min + lcm.w_max) / 2,
    )

    def broken_student(row: Sampler, seed: int) -> np.ndarray:
        if row.model == "teacher":
            return sample(row, seed)
        with _noise_output(demo_teacher.unet):
            return sample(row, seed)

    report = quality_check.QualityCheck(settings).run(broken_student, step=0)
    floor_high = report.metrics[f"{METRIC_PREFIX}floor_high"]
    for steps in settings.steps:
        assert report.metrics[f"{METRIC_PREFIX}student_fd_{steps}step"] > floor_high, report.summary
        assert report.rows[Sampler("student", steps)].above_floor
    # Control: the row that is the reference sampler itself (DDIM at reference_steps) is within the floor; the
    # teacher's one-step DDIM is far from its samples too, but closer than noise.
    assert not report.rows[Sampler("teacher", settings.reference_steps)].above_floor, report.summary
    assert report.metrics[f"{METRIC_PREFIX}teacher_fd_1step"] < report.metrics[f"{METRIC_PREFIX}student_fd_1step"]


def test_sampler_draws_the_same_images_for_the_same_seed_and_other_images_for_another(demo_teacher):
    conditioning = _conditioning(demo_teacher, 2)
    sample = quality_check.pipeline_sampler(
        demo_teacher, conditioning=conditioning, width=64, height=64,
        teacher_network=lambda: nullcontext(demo_teacher.unet),
        student_scheduler=lambda: lcm_scheduler(demo_teacher.scheduler.config, num_ddim_timesteps=50,
                                                timestep_scaling=10.0),
        training_scheduler_config=demo_teacher.scheduler.config, guidance_scale=6.5,
    )
    scheduler_before = demo_teacher.scheduler
    first, again = sample(Sampler("student", 2), 7), sample(Sampler("student", 2), 7)
    assert first.shape == (2, 64, 64, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)  # the fresh noise between LCM steps is seeded too
    assert np.abs(first.astype(int) - sample(Sampler("student", 2), 8)).mean() > 1.0
    assert demo_teacher.scheduler is scheduler_before  # the pipeline is handed back as it was


def test_quality_check_settings_defaults_and_refusals():
    settings = LcmConfig().quality_check
    assert settings.enabled and settings.steps == [1, 2, 4, 8]
    assert LcmConfig(quality_check={"steps": [8, 2]}).quality_check.steps == [2, 8]
    assert not LcmConfig(quality_check={"enabled": False}).quality_check.enabled
    with pytest.raises(ValidationError, match="distinct"):
        LcmConfig(quality_check={"steps": [2, 2]})
    with pytest.raises(ValidationError, match=r"exceed num_ddim_timesteps \(4\)"):
        LcmConfig(num_ddim_timesteps=4)  # the default steps include 8
    with pytest.raises(ValidationError, match="extra"):
        LcmConfig(quality_check={"sample": 4})
    with pytest.raises(ValidationError):
        LcmConfig(quality_check={"steps": [0]})


def test_an_unknown_quality_check_key_names_the_valid_ones_of_its_block():
    from lcm_plugin.simpletuner.run_config import lcm_config_from_block

    valid = "enabled, steps, samples, reference_steps"
    with pytest.raises(ValueError, match=rf"quality_check\.sample: .*valid keys: {valid}"):
        lcm_config_from_block({"quality_check": {"sample": 4}})
