"""Which SimpleTuner model families an LCM run can distil: one rule for `validate` and the trainer.

Torch-free, so that `simpletuner-lcm validate` can judge a config before anything heavy loads. A family's
parameterisation is SimpleTuner's own word for it, read from its shipped `helpers/models/model_metadata.json` (the
`prediction_type` its model registry lists) without importing SimpleTuner; the trainer asks the loaded model class.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

from lcm_plugin.config.lcm import LcmConfig

# Flow families the LCM step covers (LoRA and full), and how their teacher is guided: classifier-free guidance on a
# batch of cond and uncond rows ("cfg": SD3, Chroma, Lumina 2, AuraFlow), or the guidance embedding the model itself
# takes ("embedded", Flux: SimpleTuner passes flux_guidance_value to every call, so teacher, target and student share
# it).
FLOW_FAMILIES = {"sd3": "cfg", "flux": "embedded", "chroma": "cfg", "lumina2": "cfg", "auraflow": "cfg"}


def flow_refusal_reason(model_family, config: LcmConfig, flux_guidance_mode: str = "constant") -> tuple[str, str] | None:
    """(the setting to change, why) for an LCM run of a flow-matching model that cannot run yet, or None: the
    FLOW_FAMILIES with the LCM and PCM variants are covered, LoRA and full (Flux with one guidance value for every
    call of a step: flux_guidance_mode constant)."""
    if model_family not in FLOW_FAMILIES:
        return "model_family", f"model_family {model_family!r} is a flow-matching family it does not cover yet"
    if config.variant == "tcd":
        return "variant", ("variant 'tcd' is defined on a diffusion (epsilon / v) schedule, not on the flow path "
                           "(TCD's paper); use variant 'lcm' or 'pcm'")
    if model_family == "flux" and flux_guidance_mode != "constant":
        return "flux_guidance_mode", (
            "flux_guidance_mode 'random-range' draws a new guidance value at every forward, so the teacher, its "
            "target and the student would each see another; set flux_guidance_mode 'constant' (flux_guidance_value)")
    return None


def flow_refusal(model_family, config: LcmConfig, flux_guidance_mode: str = "constant") -> str | None:
    """`flow_refusal_reason` as the one line the trainer and `validate` print, or None."""
    reason = flow_refusal_reason(model_family, config, flux_guidance_mode)
    return None if reason is None else refusal_line(reason[1])


def refusal_line(why: str) -> str:
    """The refusal's one line around `why` (the second item of `flow_refusal_reason`)."""
    return (f"distillation_method 'lcm' (simpletuner-lcm): {why}; it covers LCM and PCM (LoRA and full) of "
            f"{', '.join(FLOW_FAMILIES)} among flow-matching families, and every epsilon / v_prediction family")


@functools.cache
def simpletuner_prediction_types() -> dict[str, str]:
    """model_family -> SimpleTuner's prediction_type for it, from the installed SimpleTuner's model metadata; empty
    when SimpleTuner is not installed (or ships no such file)."""
    spec = importlib.util.find_spec("simpletuner")
    if spec is None or not spec.submodule_search_locations:
        return {}
    metadata = Path(next(iter(spec.submodule_search_locations))) / "helpers" / "models" / "model_metadata.json"
    try:
        families = json.loads(metadata.read_text())
    except (OSError, ValueError):
        return {}
    return {name: str(entry.get("prediction_type")) for name, entry in families.items() if isinstance(entry, dict)}


def is_flow_family(model_family) -> bool:
    """Whether SimpleTuner trains `model_family` by flow matching (the covered flow families always are)."""
    return model_family in FLOW_FAMILIES or simpletuner_prediction_types().get(model_family) == "flow_matching"
