"""The in-training quality check on a flow-matching teacher (issue 21): `quality_check.pipeline_sampler` over the SD3
pipeline samples the teacher's rows by Euler on its shifted grid and the student with its flow scheduler, each
sample's noise (the initial one and LCM's renoising) depending on its seed and index only."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from lcm_plugin import quality_check
from lcm_plugin.config import LcmConfig
from lcm_plugin.demo import config, shapes
from lcm_plugin.inference import variant_scheduler
from lcm_plugin.quality_check import METRIC_PREFIX, Sampler

from test_quality_check import _noise_output


@pytest.fixture(scope="module")
def flow_teacher():
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    pipeline = StableDiffusion3Pipeline.from_pretrained(str(config.FLOW_TEACHER))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sampler_over(pipeline, samples: int, lcm: LcmConfig):
    per_prompt = []
    for prompt in shapes.PROMPTS:
        prompt_embeds, _, pooled, _ = pipeline.encode_prompt(prompt, None, None, do_classifier_free_guidance=False,
                                                             max_sequence_length=config.FLOW_TEACHER_T5_TOKENS)
        per_prompt.append({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled})
    return quality_check.pipeline_sampler(
        pipeline,
        conditioning=quality_check.cycled_conditioning(per_prompt, samples),
        width=shapes.IMAGE_SIZE,
        height=shapes.IMAGE_SIZE,
        teacher_network=lambda: nullcontext(pipeline.transformer),
        student_scheduler=lambda: variant_scheduler(pipeline.scheduler.config, lcm),
        training_scheduler_config=pipeline.scheduler.config,
        guidance_scale=(lcm.w_min + lcm.w_max) / 2,
    )


def test_a_flow_student_that_outputs_noise_scores_above_the_floor(flow_teacher):
    lcm = LcmConfig(w_min=1.0, w_max=12.0, quality_check={"steps": [1, 2], "samples": 12, "reference_steps": 4})
    sample = sampler_over(flow_teacher, lcm.quality_check.samples, lcm)

    def broken_student(row: Sampler, seed: int) -> np.ndarray:
        if row.model == "teacher":
            return sample(row, seed)
        with _noise_output(flow_teacher.transformer):
            return sample(row, seed)

    report = quality_check.QualityCheck(lcm.quality_check, teacher_sampler="Euler").run(broken_student, step=0)
    floor_high = report.metrics[f"{METRIC_PREFIX}floor_high"]
    for steps in lcm.quality_check.steps:
        assert report.metrics[f"{METRIC_PREFIX}student_fd_{steps}step"] > floor_high, report.summary
    assert report.metrics[f"{METRIC_PREFIX}teacher_fd_2step"] < report.metrics[f"{METRIC_PREFIX}student_fd_2step"]
    assert "FD to the teacher Euler 4 steps teacher samples" in report.summary
    assert "teacher Euler 1 step" in report.summary


def test_each_flow_sample_depends_on_its_seed_and_index_only(flow_teacher, monkeypatch):
    """LCM's renoising between the steps comes from the sample's own generator: the same seed gives the same images
    (to the last bit of the kernels) whatever the batches, and another seed other images (torch's global generator, which the SD3 pipeline's own
    scheduler.step call would use, advances between the calls)."""
    lcm = LcmConfig()
    sample = sampler_over(flow_teacher, 10, lcm)
    scheduler_before = flow_teacher.scheduler
    row = Sampler("student", 2)
    first = sample(row, 7)  # batches of 8 and 2 (SAMPLE_BATCH)
    monkeypatch.setattr(quality_check, "SAMPLE_BATCH", 3)
    again = sample(row, 7)  # batches of 3, 3, 3 and 1
    assert first.shape == (10, 64, 64, 3) and first.dtype == np.uint8
    # Equal up to the last bit of the kernels, which the batch size changes (a level or two of 255).
    assert np.abs(first.astype(int) - again).max() <= 2
    assert np.abs(first.astype(int) - sample(row, 8)).mean() > 1.0
    teacher_row = Sampler("teacher", 2)
    np.testing.assert_array_equal(sample(teacher_row, 7), sample(teacher_row, 7))
    assert flow_teacher.scheduler is scheduler_before  # the pipeline is handed back as it was


def recorded_calls(pipeline_class, monkeypatch) -> list[dict]:
    """The keyword arguments of each call of `pipeline_class`'s pipelines, recorded as they run."""
    import functools

    calls = []
    original = pipeline_class.__call__

    @functools.wraps(original)  # its signature, which the sampler reads
    def recorded(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", recorded)
    return calls


def test_flux_is_sampled_at_its_guidance_input_without_an_unconditional_branch(tmp_path, monkeypatch):
    """Flux's guidance is a model input that teacher, target and student all took (flux_guidance_value): both rows
    pass it as the pipeline's guidance_scale and no negative prompt; an input SimpleTuner leaves None (prompt_mask
    without masked training) is left out."""
    from diffusers import FluxPipeline

    from lcm_plugin.tiny_flow import save_tiny_flux

    pipeline = FluxPipeline.from_pretrained(str(save_tiny_flux(tmp_path / "flux", vocabulary=shapes.VOCABULARY)))
    pipeline.set_progress_bar_config(disable=True)
    per_prompt = []
    for prompt in shapes.PROMPTS[:2]:
        prompt_embeds, pooled, _ = pipeline.encode_prompt(prompt, None, max_sequence_length=16)
        per_prompt.append({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "prompt_mask": None})
    calls = recorded_calls(FluxPipeline, monkeypatch)
    lcm = LcmConfig()
    sample = quality_check.pipeline_sampler(
        pipeline, conditioning=quality_check.cycled_conditioning(per_prompt, 3), width=64, height=64,
        teacher_network=lambda: nullcontext(pipeline.transformer),
        student_scheduler=lambda: variant_scheduler(pipeline.scheduler.config, lcm),
        training_scheduler_config=pipeline.scheduler.config, guidance_scale=3.5, embedded_guidance=True,
    )
    teacher_images = sample(Sampler("teacher", 2), 7)
    student_images = sample(Sampler("student", 2), 7)
    assert teacher_images.shape == student_images.shape == (3, 64, 64, 3)
    assert [call["guidance_scale"] for call in calls] == [3.5, 3.5]
    assert all(not key.startswith("negative_") and key != "prompt_mask" for call in calls for key in call)
    np.testing.assert_array_equal(student_images, sample(Sampler("student", 2), 7))


def test_simpletuners_flux2_pipeline_guides_the_teacher_with_its_real_cfg_from_the_first_step(tmp_path, monkeypatch):
    """SimpleTuner's own Flux 2 pipeline (what its validation samples FLUX.2-klein with) takes CFG as
    guidance_scale_real, skipped on the first no_cfg_until_timestep steps, and no attention mask: the teacher's rows
    guide every step at w with the LCM unconditional input (zero prompt embeddings), the student's not at all, and
    the mask SimpleTuner's Flux2.convert_text_embed_for_pipeline hands over is left out."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from simpletuner.helpers.models.flux2.pipeline import Flux2Pipeline
    from simpletuner.helpers.models.flux2.transformer import Flux2Transformer2DModel

    from lcm_plugin.tiny_flow import save_tiny_flux2_klein

    folder = save_tiny_flux2_klein(tmp_path / "flux2", vocabulary=shapes.VOCABULARY)
    pipeline = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
        vae=AutoencoderKLFlux2.from_pretrained(folder, subfolder="vae"), text_encoder=None, tokenizer=None,
        transformer=Flux2Transformer2DModel.from_pretrained(folder, subfolder="transformer"),
    )
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    width = pipeline.transformer.config.joint_attention_dim
    per_prompt = [{"prompt_embeds": torch.randn(1, 8, width, generator=generator),
                   "attention_mask": torch.ones(1, 8, dtype=torch.long)} for _ in range(2)]
    calls = recorded_calls(Flux2Pipeline, monkeypatch)
    lcm = LcmConfig()
    sample = quality_check.pipeline_sampler(
        pipeline, conditioning=quality_check.cycled_conditioning(per_prompt, 3), width=64, height=64,
        teacher_network=lambda: nullcontext(pipeline.transformer),
        student_scheduler=lambda: variant_scheduler(pipeline.scheduler.config, lcm),
        training_scheduler_config=pipeline.scheduler.config, guidance_scale=4.5,
    )
    assert sample(Sampler("teacher", 2), 7).shape == sample(Sampler("student", 2), 7).shape == (3, 64, 64, 3)
    teacher, student = calls
    assert (teacher["guidance_scale_real"], student["guidance_scale_real"]) == (4.5, 1.0)
    assert teacher["no_cfg_until_timestep"] == student["no_cfg_until_timestep"] == 0
    assert teacher["negative_prompt_embeds"].shape == teacher["prompt_embeds"].shape
    assert torch.count_nonzero(teacher["negative_prompt_embeds"]) == 0
    assert not any(key.startswith("negative_") for key in student)
    assert not any(key.endswith("attention_mask") for call in calls for key in call)


def test_simpletuners_sd3_pipeline_samples_the_teacher_with_plain_cfg(flow_teacher):
    """SimpleTuner's own SD3 pipeline (what its validation hands the check) applies CFG-Zero* by default; the teacher's
    rows are the distiller's plain CFG, which diffusers' StableDiffusion3Pipeline samples: the same images."""
    from simpletuner.helpers.models.sd3.pipeline import StableDiffusion3Pipeline as SimpleTunersSd3

    lcm = LcmConfig(w_min=3.0, w_max=9.0)
    theirs = SimpleTunersSd3(**{name: component for name, component in flow_teacher.components.items()
                                if name not in ("image_encoder", "feature_extractor")})  # IP-Adapter parts
    theirs.set_progress_bar_config(disable=True)
    row = Sampler("teacher", 2)
    expected = sampler_over(flow_teacher, 3, lcm)(row, 7)
    np.testing.assert_array_equal(sampler_over(theirs, 3, lcm)(row, 7), expected)
