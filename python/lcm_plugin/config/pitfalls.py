"""Warnings for settings SimpleTuner accepts but that spoil an LCM run (or silently do nothing)."""

from __future__ import annotations

from typing import Any

from lcm_plugin.config.problems import Problem, pointer
from lcm_plugin.config.training import canonical_key, effective_settings

# LCM samples with guidance distilled in: the LCM-LoRA report uses 0-2; more over-saturates and burns.
MAX_LCM_VALIDATION_GUIDANCE = 2.0
# An LCM student is meant for 1-8 steps; validating at more hides whether distillation worked.
MAX_LCM_VALIDATION_STEPS = 8
# resolution_type 'pixel' sizes below this are almost surely megapixels.
MIN_PLAUSIBLE_PIXELS = 64


def lcm_pitfalls(config: dict, file: str) -> list[Problem]:
    """Warnings for a config.json whose distillation_method is 'lcm' (nothing otherwise)."""
    keys = {canonical_key(key): key for key, raw in config.items() if raw is not None}
    value = effective_settings(config).__getitem__

    def at(name: str) -> str:
        return pointer(keys[name]) if name in keys else ""

    def warn(name: str, message: str) -> Problem:
        """`message` with {value} and {source}; an unset key is named, since the pointer is then the root."""
        source = "" if name in keys else " (SimpleTuner's default)"
        text = message.format(value=value(name), source=source)
        return Problem(file, at(name), text if name in keys else f"{name} = {text}", severity="warning")

    if str(value("distillation_method") or "").lower() != "lcm":
        if "distillation_config" in keys and "lcm" in str(config[keys["distillation_config"]]):
            return [warn("distillation_config", "an lcm block is ignored unless distillation_method is 'lcm'")]
        return []
    warnings = sd2x_family_refused(config, file)
    guidance = _number(value("validation_guidance"))
    flux = str(value("model_family")).lower() == "flux"
    trained_guidance = _number(value("flux_guidance_value"))
    if flux and guidance is not None and trained_guidance is not None and guidance != trained_guidance:
        # Flux takes its guidance as a model input: the student was distilled at flux_guidance_value.
        warnings.append(
            warn(
                "validation_guidance",
                "{value}{source} is Flux's guidance input at validation; the LCM student was distilled at "
                f"flux_guidance_value {trained_guidance:g}: validate at that value",
            )
        )
    elif not flux and guidance is not None and guidance > MAX_LCM_VALIDATION_GUIDANCE:
        warnings.append(
            warn(
                "validation_guidance",
                "{value}{source} washes an LCM student out: it has guidance "
                f"distilled in; validate at 0-{MAX_LCM_VALIDATION_GUIDANCE:g}",
            )
        )
    steps = _number(value("validation_num_inference_steps"))
    if steps is not None and steps > MAX_LCM_VALIDATION_STEPS:
        warnings.append(
            warn(
                "validation_num_inference_steps",
                "{value}{source} steps: an LCM student is meant for "
                f"1-{MAX_LCM_VALIDATION_STEPS} steps, so validation would not show what distillation bought",
            )
        )
    dropout = _number(value("caption_dropout_probability"))
    if dropout and str(value("model_family")).lower() == "sdxl":
        warnings.append(
            warn(
                "caption_dropout_probability",
                "{value}{source}: SimpleTuner zeroes SDXL time_ids of the "
                "dropped samples, so the teacher sees no size conditioning for them; set 0 for LCM "
                "(the distiller makes its own unconditional branch)",
            )
        )
    if "validation_negative_prompt" in keys and guidance is not None and guidance <= 1:
        warnings.append(
            warn(
                "validation_negative_prompt",
                "ignored: a negative prompt only acts when "
                "validation_guidance > 1, and LCM validates without guidance",
            )
        )
    if str(value("resolution_type")) == "pixel":
        for name in ("minimum_image_size", "maximum_image_size", "target_downsample_size"):
            size = _number(value(name)) if name in keys else None
            if size is not None and 0 < size < MIN_PLAUSIBLE_PIXELS:
                warnings.append(
                    warn(
                        name,
                        "{value} reads as pixels with resolution_type 'pixel' (megapixels intended? "
                        "they are for resolution_type 'area')",
                    )
                )
    return warnings


def sd2x_family_refused(config: dict, file: str) -> list[Problem]:
    """SimpleTuner 4.10.1 registers `sd2x` (StableDiffusion2) only after its argument parser has fixed the
    model_family choices, so the parser refuses it; name the family that trains an SD 2.x checkpoint instead.

    At the document root: a warning at /model_family would hide behind the parser's own error there."""
    key = next((key for key in config if canonical_key(key) == "model_family"), None)
    if key is None or str(config[key]).strip().lower() != "sd2x":
        return []
    return [Problem(file, "", "model_family 'sd2x': SimpleTuner 4.10.1's parser refuses it; for an SD 2.x checkpoint "
                    "use model_family 'sd1x' with prediction_type 'v_prediction' (768-v models; 'epsilon' for -base)",
                    severity="warning")]


def _number(raw: Any) -> float | None:
    if isinstance(raw, bool):
        return None
    try:
        return float(raw)
    except (TypeError, ValueError):
        return None
