"""The quality check on accelerators and several processes (issue 20, item 5), seen from a CPU: batches sized from the
free memory, samples that do not depend on those batches, the VAE decoded in chunks, SimpleTuner's autocast, and what
each rank does under DDP and DeepSpeed ZeRO-3."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_quality_check import demo_teacher  # noqa: F401 - the fixture (the demo's teacher pipeline)

from lcm_plugin import quality_check
from lcm_plugin.config import LcmConfig
from lcm_plugin.demo import shapes
from lcm_plugin.demo.run import TEACHER_DIR
from lcm_plugin.inference import lcm_scheduler
from lcm_plugin.memory_estimate import GIB
from lcm_plugin.quality_check import Sampler
from lcm_plugin.simpletuner import quality_check_patches
from lcm_plugin.simpletuner.distiller import LcmDistiller

SIZE = 32  # pixels: the demo teacher's latents are 4 x 4


@pytest.mark.parametrize(("free", "width", "dtype_bytes", "guided", "expected"), [
    (None, 1024, 2, True, (8, 8)),  # a CPU: today's batch
    (64 * 2**20, 1024, 2, True, (1, 1)),  # 64 MiB: at least one sample and one image
    # 24 GiB at 1024 x 1024 in bf16: 0.8 x 24 = 19.2 GiB; UNet (19.2 - 0.063) / 0.257 = 74.5 samples, halved by CFG;
    # decode (19.2 - 0.035) / 1.988 = 9.6 images.
    (24 * GIB, 1024, 2, True, (37, 9)),
    (24 * GIB, 1024, 2, False, (74, 9)),
    # float32: half the room. UNet (9.6 - 0.063) / 0.257 = 37.1, halved; decode (9.6 - 0.035) / 1.988 = 4.8.
    (24 * GIB, 1024, 4, True, (18, 4)),
    # 512 x 512 is 0.25 MP: UNet (19.2 - 0.063) / 0.0643 = 297.9, halved; decode (19.2 - 0.035) / 0.497 = 38.6.
    (24 * GIB, 512, 2, True, (148, 38)),
    # 0.07 GiB of room at 64 x 64: UNet 0.007 / 0.001004 = 6.97, halved to 3; decode 0.035 / 0.00777 = 4.5, but a decode
    # never holds more than its call's samples.
    (int(0.07 / 0.8 * GIB), 64, 2, True, (3, 3)),
])
def test_sampling_batches_by_hand(free, width, dtype_bytes, guided, expected):
    assert quality_check.sampling_batches(free, width, width, dtype_bytes, guided=guided) == expected


def test_free_accelerator_bytes_counts_what_the_allocator_holds_unused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 30 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 26 * GIB)
    assert quality_check.free_accelerator_bytes(torch.device("cuda", 0)) == 14 * GIB
    assert quality_check.free_accelerator_bytes(torch.device("cpu")) is None


def _embeds(pipeline, prompt: str) -> dict:
    prompt_embeds, _, pooled, _ = pipeline.encode_prompt(prompt, do_classifier_free_guidance=False)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}


def _student_scheduler(pipeline):
    return lambda: lcm_scheduler(pipeline.scheduler.config, num_ddim_timesteps=50, timestep_scaling=10.0)


def _sampler(pipeline, samples: int):
    per_prompt = [_embeds(pipeline, prompt) for prompt in shapes.PROMPTS[:3]]
    return quality_check.pipeline_sampler(
        pipeline, conditioning=quality_check.cycled_conditioning(per_prompt, samples), width=SIZE, height=SIZE,
        teacher_network=lambda: nullcontext(pipeline.unet), student_scheduler=_student_scheduler(pipeline),
        training_scheduler_config=pipeline.scheduler.config, guidance_scale=6.5,
    )


@pytest.fixture
def batch_sizes(demo_teacher):
    """The UNet's batch at each forward and the VAE decoder's at each call."""
    seen = {"unet": [], "decoder": []}
    handles = [demo_teacher.unet.register_forward_pre_hook(lambda module, args: seen["unet"].append(len(args[0]))),
               demo_teacher.vae.decoder.register_forward_pre_hook(
                   lambda module, args: seen["decoder"].append(len(args[0])))]
    yield seen
    for handle in handles:
        handle.remove()


def test_samples_do_not_depend_on_the_batch_sizes_and_decodes_are_chunked(demo_teacher, batch_sizes, monkeypatch):
    sample = _sampler(demo_teacher, 8)
    rows = (Sampler("student", 4), Sampler("teacher", 2))  # 4 LCM steps add fresh noise three times
    images = {}
    for batches in ((8, 8), (3, 2), (1, 1)):
        monkeypatch.setattr(quality_check, "sampling_batches", lambda *args, guided, batches=batches: batches)
        for seen in batch_sizes.values():
            seen.clear()
        images[batches] = [sample(row, quality_check.EVALUATION_NOISE_SEED) for row in rows]
        if batches == (3, 2):
            # Calls of 3, 3 and 2 samples: the student's 4 steps, then the teacher's 2 at twice the batch (CFG); each
            # call's latents decoded 2 at a time.
            assert batch_sizes["unet"] == [3] * 4 + [3] * 4 + [2] * 4 + [6] * 2 + [6] * 2 + [4] * 2
            assert batch_sizes["decoder"] == [2, 1, 2, 1, 2] * 2
    for batches in ((3, 2), (1, 1)):
        for row, expected, got in zip(rows, images[8, 8], images[batches]):
            # The same images, up to the rounding of batched kernels: at most one level, in under 0.1 % of the values.
            difference = np.abs(expected.astype(int) - got)
            assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, (row, batches, difference.max())
    assert "decode" not in vars(demo_teacher.vae)  # the VAE's own decode again


def test_each_set_is_sized_from_the_free_memory_of_the_unets_device(demo_teacher, monkeypatch):
    calls, devices = [], []
    monkeypatch.setattr(quality_check, "free_accelerator_bytes", lambda device: devices.append(device) or 5 * GIB)
    sizing = quality_check.sampling_batches
    monkeypatch.setattr(quality_check, "sampling_batches",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or sizing(*args, **kwargs))
    sample = _sampler(demo_teacher, 2)
    sample(Sampler("teacher", 1), 1)
    sample(Sampler("student", 1), 1)
    assert devices == [demo_teacher.unet.device] * 2
    # The demo teacher is float32; classifier-free guidance for the teacher only.
    assert calls == [((5 * GIB, SIZE, SIZE, 4), {"guided": True}), ((5 * GIB, SIZE, SIZE, 4), {"guided": False})]
    assert sizing(5 * GIB, SIZE, SIZE, 4, guided=True)[0] >= 2  # so one call here


class FakeAccelerator:
    """accelerate's Accelerator as the check sees it on one rank; its collectives fail the test if called."""

    def __init__(self, *, rank: int = 0, zero_stage: int | None = None, fsdp: bool = False):
        from accelerate.utils import DeepSpeedPlugin

        self.is_main_process = rank == 0
        # The plugin as SimpleTuner's Trainer._load_deepspeed_plugin builds it from a deepspeed_config.
        plugin = None if zero_stage is None else DeepSpeedPlugin(
            hf_ds_config={"zero_optimization": {"stage": zero_stage}, "train_micro_batch_size_per_gpu": 1},
            zero_stage=zero_stage)
        self.state = SimpleNamespace(deepspeed_plugin=plugin, fsdp_plugin=object() if fsdp else None)
        self.logged = []

    def log(self, values, step):
        self.logged.append(step)

    def _collective(self, *args, **kwargs):
        raise AssertionError("a collective: the other ranks are not in the check")

    wait_for_everyone = gather = gather_for_metrics = reduce = _collective


class FakeValidation:
    """What the check reads of SimpleTuner's Validation, over the demo teacher (a class: the check is kept per
    Validation object, by weak reference)."""

    def __init__(self, pipeline, accelerator, save_dir, *, device: str = "cpu", autocast: bool = True):
        distiller = LcmDistiller.__new__(LcmDistiller)  # the attributes the check reads, not a trained distiller
        distiller.lcm_config = LcmConfig(w_min=1.0, w_max=12.0,
                                         quality_check={"steps": [1], "samples": 4, "reference_steps": 2})
        distiller.noise_scheduler = pipeline.scheduler
        distiller._teacher = lambda: nullcontext(pipeline.unet)
        distiller.get_scheduler = _student_scheduler(pipeline)
        self.distiller, self.accelerator, self.save_dir = distiller, accelerator, str(save_dir)
        self.config = SimpleNamespace(distillation_method="lcm", weight_dtype=torch.bfloat16)
        self.model = SimpleNamespace(pipeline=pipeline, VALIDATION_USE_AUTOCAST=autocast)
        self.inference_device = torch.device(device)
        self.validation_prompt_metadata = {"validation_prompts": list(shapes.PROMPTS[:2])}
        self.validation_resolutions = [(SIZE, SIZE)]
        self._pipeline = pipeline

    def _prepare_validation_work_items(self, prompts):
        return [SimpleNamespace(prompt=prompt, shortname=f"p{index}", conditioning=None)
                for index, prompt in enumerate(prompts)]

    def _gather_prompt_embeds(self, prompt, shortname, _conditioning, *, cache_shortname):
        return _embeds(self._pipeline, prompt)


SURFACES = {
    "state_tracker": SimpleNamespace(get_global_step=lambda: 7),
    "images": SimpleNamespace(save_validation_image=lambda *args, **kwargs: "grid.png",
                              log_images_to_trackers=lambda *args, **kwargs: None),
}


@pytest.fixture
def unet_calls(demo_teacher):
    calls = []
    handle = demo_teacher.unet.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    yield calls
    handle.remove()


@pytest.fixture
def no_collectives(monkeypatch):
    """torch.distributed's collectives fail the test: one rank calling one alone would wait for the others forever."""
    def collective(*args, **kwargs):
        raise AssertionError("a torch.distributed collective: the other ranks are not in the check")

    for name in ("barrier", "all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list",
                 "gather_object", "reduce", "scatter"):
        monkeypatch.setattr(torch.distributed, name, collective)


def test_under_ddp_rank_0_checks_alone_and_the_other_ranks_return_at_once(demo_teacher, unet_calls, no_collectives,
                                                                           tmp_path, caplog):
    other = FakeAccelerator(rank=1)
    with caplog.at_level(logging.INFO, logger="simpletuner-lcm"):
        quality_check_patches._run_quality_check(FakeValidation(demo_teacher, other, tmp_path), SURFACES)
    assert unet_calls == [] and other.logged == [] and caplog.text == ""

    main = FakeAccelerator(rank=0)
    with caplog.at_level(logging.INFO, logger="simpletuner-lcm"):
        quality_check_patches._run_quality_check(FakeValidation(demo_teacher, main, tmp_path), SURFACES)
    assert unet_calls and main.logged == [7]
    assert "LCM quality at step 7" in caplog.text


@pytest.mark.parametrize(("rank", "sharding"), [(0, "zero3"), (1, "zero3"), (0, "fsdp"), (1, "fsdp")])
def test_when_sharded_every_rank_skips_and_rank_0_says_why_once(demo_teacher, unet_calls, rank, sharding, tmp_path,
                                                                caplog):
    accelerator = (FakeAccelerator(rank=rank, zero_stage=3) if sharding == "zero3"
                   else FakeAccelerator(rank=rank, fsdp=True))
    validation = FakeValidation(demo_teacher, accelerator, tmp_path)
    with caplog.at_level(logging.INFO, logger="simpletuner-lcm"):
        for _ in range(2):  # two validations of one run
            quality_check_patches._run_quality_check(validation, SURFACES)
    assert unet_calls == [] and accelerator.logged == []
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == (1 if rank == 0 else 0), warnings
    if rank == 0:
        assert ("ZeRO stage 3" if sharding == "zero3" else "FSDP") in warnings[0]
        assert "distillation_config.lcm.quality_check.enabled" in warnings[0]


def test_under_zero2_rank_0_checks(demo_teacher, unet_calls, tmp_path):
    accelerator = FakeAccelerator(rank=0, zero_stage=2)  # whole parameters on every rank
    quality_check_patches._run_quality_check(FakeValidation(demo_teacher, accelerator, tmp_path), SURFACES)
    assert unet_calls and accelerator.logged == [7]


class RecordingAutocast:
    """Stands in for torch.amp.autocast (a CPU has no CUDA autocast): records its arguments and whether it is entered."""

    def __init__(self):
        self.calls, self.active = [], False

    def __call__(self, device_type, dtype=None, enabled=True):
        self.calls.append((device_type, dtype, enabled))
        return self

    def __enter__(self):
        self.active = True

    def __exit__(self, *exc):
        self.active = False


@pytest.mark.parametrize(("device", "use_autocast", "expected"), [
    ("cuda", True, [("cuda", torch.bfloat16, True)]),  # SimpleTuner: autocast(device, dtype=weight_dtype)
    ("cuda", False, [("cuda", None, False)]),  # a family without VALIDATION_USE_AUTOCAST: autocast explicitly off
    ("cpu", True, []),  # CPU runs: no autocast
])
def test_sampling_runs_under_simpletuners_validation_autocast(demo_teacher, device, use_autocast, expected, tmp_path,
                                                              monkeypatch):
    autocast = RecordingAutocast()
    monkeypatch.setattr(torch.amp, "autocast", autocast)
    inside = []
    handle = demo_teacher.unet.register_forward_pre_hook(lambda module, args: inside.append(autocast.active))
    try:
        validation = FakeValidation(demo_teacher, FakeAccelerator(), tmp_path, device=device, autocast=use_autocast)
        quality_check_patches._run_quality_check(validation, SURFACES)
    finally:
        handle.remove()
    assert autocast.calls == expected
    assert inside and set(inside) == {bool(expected)}  # every UNet forward of the check, inside it or none
    assert not autocast.active

