"""Quality-check patch Q1 (the table is in install.py's docstring; the logic is `lcm_plugin.quality_check`)."""

from __future__ import annotations

import functools
import logging
import weakref
from contextlib import nullcontext

from lcm_plugin.simpletuner.run_config import is_lcm_run
from lcm_plugin.simpletuner.surfaces import import_surface, require

logger = logging.getLogger("simpletuner-lcm")

# One lcm_plugin.quality_check.QualityCheck per Validation object (one per run): it keeps the teacher's sets.
_quality_checks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_skip_warned: weakref.WeakSet = weakref.WeakSet()  # the Validation objects whose run was told the check is skipped
SHARDED_SKIPPED = (
    "simpletuner-lcm: the LCM quality check is skipped under {sharding}: the trained network's parameters are "
    "sharded across the ranks, so each of its forwards needs every rank, and the check samples on rank 0 alone. Set "
    "distillation_config.lcm.quality_check.enabled to false to turn it off and silence this line."
)
UNCONDITIONAL_SHORTNAME = "unconditional"  # validation.prepare_validation_prompt_list's empty-prompt entry


def surfaces() -> dict:
    """The SimpleTuner objects Q1 uses or patches, checked (install() calls this before it changes anything)."""
    validation_module = "simpletuner.helpers.training.validation"
    validation = require(import_surface(validation_module), "Validation", validation_module)
    for name in ("finalize_validation", "_prepare_validation_work_items", "_gather_prompt_embeds"):
        require(validation, name, "Validation")
    images_module = "simpletuner.helpers.training.validation_images"
    images = import_surface(images_module)
    for name in ("save_validation_image", "log_images_to_trackers"):
        require(images, name, images_module)
    state_module = "simpletuner.helpers.training.state_tracker"
    state_tracker = require(import_surface(state_module), "StateTracker", state_module)
    require(state_tracker, "get_global_step", "StateTracker")
    return {"validation": validation, "images": images, "state_tracker": state_tracker}


def _finalize_with_quality_check(original, surfaces: dict):
    """Q1: `Validation.finalize_validation` first runs the LCM quality check, while validation's pipeline (with the
    trained weights on the inference device) still exists; then SimpleTuner's own clean-up."""

    @functools.wraps(original)
    def finalize_validation(self, validation_type):
        try:
            _run_quality_check(self, surfaces)
        except Exception as error:  # noqa: BLE001 - a failed measurement must not end a long training run
            logger.error("simpletuner-lcm: the LCM quality check failed (%s: %s); training goes on without it.",
                         type(error).__name__, error, exc_info=logger.isEnabledFor(logging.DEBUG))
        return original(self, validation_type)

    return finalize_validation


def _run_quality_check(validation, surfaces: dict) -> None:
    from lcm_plugin import quality_check
    from lcm_plugin.simpletuner.distiller import LcmDistiller, sharded_training

    config = validation.config
    pipeline = getattr(validation.model, "pipeline", None)
    if not (is_lcm_run(config) and isinstance(validation.distiller, LcmDistiller) and pipeline is not None):
        return
    settings = validation.distiller.lcm_config
    if not settings.quality_check.enabled:
        return
    main_process = getattr(validation.accelerator, "is_main_process", True)
    sharding = sharded_training(validation.accelerator)
    if sharding is not None:
        if main_process and validation not in _skip_warned:
            _skip_warned.add(validation)
            logger.warning(SHARDED_SKIPPED.format(sharding=sharding))
        return
    # Under plain DDP SimpleTuner calls finalize_validation on rank 0 only, or on every rank after a batch-parallel
    # validation (validation_multigpu's default). The check runs on rank 0 and uses no collective: the other ranks go
    # back to training and wait in its next collective until rank 0 joins them (SimpleTuner's process-group timeout,
    # SIMPLETUNER_PROCESS_GROUP_TIMEOUT_SECONDS, 5400 s by default, bounds that wait).
    if not main_process:
        return
    # The user's text prompts; SimpleTuner's added empty-prompt sample ("unconditional") is not one of them.
    items = [item for item in validation._prepare_validation_work_items(
        (validation.validation_prompt_metadata or {}).get("validation_prompts"))
        if item.conditioning is None and item.shortname != UNCONDITIONAL_SHORTNAME]
    if not items:
        logger.info("simpletuner-lcm: no text-only validation prompt; the LCM quality check is skipped.")
        return
    check = _quality_checks.get(validation)
    if check is None:
        flow = getattr(validation.distiller, "is_flow_matching", False)
        check = _quality_checks[validation] = quality_check.QualityCheck(settings.quality_check,
                                                                         teacher_sampler="Euler" if flow else "DDIM")
    per_prompt = [
        validation._gather_prompt_embeds(item.prompt, item.shortname, None, cache_shortname=item.shortname)
        for item in items
    ]
    if any(embeds is None for embeds in per_prompt):
        logger.warning("simpletuner-lcm: a validation prompt has no cached text embedding; quality check skipped.")
        return
    # Rounded to a multiple of 16 as validate_prompt rounds its pipeline size.
    width, height = (max(16 * round(value / 16), 16) for value in validation.validation_resolutions[0])
    distiller = validation.distiller
    sample = quality_check.pipeline_sampler(
        pipeline,
        conditioning=quality_check.cycled_conditioning(per_prompt, settings.quality_check.samples),
        width=width,
        height=height,
        teacher_network=distiller._teacher,
        student_scheduler=distiller.get_scheduler,
        training_scheduler_config=distiller.noise_scheduler.config,
        **_guidance(config, settings),
    )
    step = surfaces["state_tracker"].get_global_step()
    with validation_autocast(validation):
        report = check.run(sample, step=step)
    for line in report.summary.splitlines():
        logger.info("simpletuner-lcm: %s", line)
    validation.accelerator.log(report.metrics, step=step)
    label = "lcm_quality_grid"
    images = surfaces["images"]
    path = images.save_validation_image(
        report.grid, validation.save_dir, f"step_{step}_{label}", config, label=label, index=0,
        resolution=f"{width}x{height}",
    )
    logger.info("simpletuner-lcm: LCM quality grid (rows: sampler, columns: sample) saved to %s", path)
    images.log_images_to_trackers(validation.accelerator, {label: [report.grid]}, [(width, height)], config)


def _guidance(config, settings) -> dict:
    """pipeline_sampler's guidance for the run's family."""
    from lcm_plugin.config.families import FLOW_FAMILIES

    # Flux: teacher, target and student all took flux_guidance_value as the model's guidance input.
    if FLOW_FAMILIES.get(getattr(config, "model_family", None)) == "embedded":
        return {"guidance_scale": float(config.flux_guidance_value), "embedded_guidance": True}
    # A student without a guidance input distils the teacher averaged over U[w_min, w_max]: CFG is linear in the
    # scale, so that is the teacher at the mean scale (as in the demo).
    return {"guidance_scale": (settings.w_min + settings.w_max) / 2.0}


def validation_autocast(validation):
    """The autocast SimpleTuner's own validation runs its pipeline under (`Validation.validate_prompt`): to the run's
    weight_dtype when the model family asks for it (`VALIDATION_USE_AUTOCAST`, SDXL's), else explicitly off. None on
    a CPU: CPU runs train in float32 (`mixed_precision: no`), a dtype CPU autocast refuses with a warning."""
    import torch

    device_type = torch.device(validation.inference_device).type
    if device_type == "cpu":
        return nullcontext()
    if validation.model.VALIDATION_USE_AUTOCAST:
        return torch.amp.autocast(device_type, dtype=validation.config.weight_dtype)
    return torch.amp.autocast(device_type, enabled=False)


def patch(surfaces: dict, saved: dict) -> None:
    validation = surfaces["validation"]
    saved["finalize_validation"] = validation.__dict__["finalize_validation"]
    validation.finalize_validation = _finalize_with_quality_check(saved["finalize_validation"], surfaces)


def restore(saved: dict) -> None:
    from simpletuner.helpers.training.validation import Validation

    Validation.finalize_validation = saved["finalize_validation"]
