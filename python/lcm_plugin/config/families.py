"""Which SimpleTuner model families an LCM run can distil: one rule for `validate` and the trainer.

Torch-free, so that `simpletuner-lcm validate` can judge a config before anything heavy loads. A family's
parameterisation is SimpleTuner's own word for it, read from its shipped `helpers/models/model_metadata.json` (the
`prediction_type` its model registry lists) without importing SimpleTuner; the trainer asks the loaded model class.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

from lcm_plugin.config.lcm import LcmConfig

# Flow families the LCM step covers (LoRA and full), and how their teacher is guided: classifier-free guidance on a
# batch of cond and uncond rows ("cfg": SD3, Chroma, Lumina 2, AuraFlow, Z-Image, Z-Image Omni, Qwen-Image,
# LongCat-Image, FLUX.3 Image Klein base, ERNIE-Image, MOSS-Image, Krea 2 raw, FLUX.2-klein base), or the guidance
# embedding the model itself takes ("embedded", Flux: SimpleTuner passes flux_guidance_value to every call, so
# teacher, target and student share it).
FLOW_FAMILIES = {"sd3": "cfg", "flux": "embedded", "chroma": "cfg", "lumina2": "cfg", "auraflow": "cfg",
                 "z_image": "cfg", "z_image_omni": "cfg", "qwen_image": "cfg", "longcat_image": "cfg",
                 "flux3_image": "cfg", "ernie": "cfg", "flux2": "cfg", "moss_image": "cfg", "krea2": "cfg"}
# Flavours (SimpleTuner's model_flavour) of a covered family that are not covered, and why. Qwen-Image: v1.0
# (Qwen/Qwen-Image) and v2.0 (Qwen-Image-2512) are, the text-to-image models with a Qwen2.5-VL encoder, the 16-channel
# VAE and 2 x 2 packed latents (SimpleTuner's QwenImage class with model_flavour unset and a model path runs them).
_QWEN_IMAGE_EDIT = ("is an image-editing flavour: its reference images reach the transformer as per-sample control "
                    "latents that the teacher's doubled cond / uncond batch does not repeat")
UNCOVERED_FLAVOURS = {
    "qwen_image": {
        "v2.1": ("is Qwen-Image-2.1 (Qwen3-VL, 64-channel VAE, 1 x 1 patches: its resolution-dependent shift counts "
                 "4x the tokens of the 2 x 2 packing the LCM grid counts, and SimpleTuner adds a hub assistant LoRA "
                 "to LoRA runs that the teacher, adapters off, would lose)"),
        "edit-v1": _QWEN_IMAGE_EDIT, "edit-v2": _QWEN_IMAGE_EDIT, "edit-v2+": _QWEN_IMAGE_EDIT,
        "edit-v3": _QWEN_IMAGE_EDIT,
    },
    # LongCat-Image: "final" (meituan-longcat/LongCat-Image) and "dev" (LongCat-Image-Dev) are text-to-image; "edit"
    # feeds its reference image's latents to the transformer per sample, as Qwen-Image's edit flavours.
    "longcat_image": {"edit": _QWEN_IMAGE_EDIT},
    # FLUX.3 Image Klein: "klein-base" (black-forest-labs/flux-3-image-klein-base) is the flow-matching model.
    "flux3_image": {
        "klein": ("is the distilled flow-map checkpoint (SimpleTuner trains it as PredictionTypes.FLOW_MAP: its "
                  "transformer predicts towards a destination time it is given, and it samples at guidance 1), not a "
                  "flow-matching velocity model a CFG teacher can guide; SimpleTuner also adds its hub assistant LoRA "
                  "to LoRA runs, which the teacher, adapters off, would lose"),
    },
    # MOSS-Image: "base" and "sft" (OpenMOSS-Team/MOSS-Image-Base, -SFT) are text-to-image; the edit flavours (the same
    # checkpoints) give the transformer each sample's reference latents, and the text encoder its reference images.
    "moss_image": {"base-edit": _QWEN_IMAGE_EDIT, "sft-edit": _QWEN_IMAGE_EDIT},
    # FLUX.2: "klein-4b" / "klein-9b" (the FLUX.2-klein base models: Qwen3, no guidance embedding) take the CFG teacher.
    "flux2": {
        "dev": ("is FLUX.2-dev, guidance-distilled: its transformer takes the guidance scale as an input (diffusers' "
                "Flux2Pipeline runs no CFG), so its teacher would need Flux's embedded guidance, not the CFG teacher "
                "of the klein flavours (one per family), and SimpleTuner's Flux2.check_user_config pins "
                "flux_guidance_value to 1.0 for every flavour: an embedded teacher would be guided at 1.0, not at the "
                "4.0 FLUX.2-dev samples at"),
    },
    # Krea 2: "raw" (krea/Krea-2-Raw) is the flow-matching base; SimpleTuner's class has no flavour-specific code, so
    # a model path to Turbo with model_flavour unset runs it unnoticed.
    "krea2": {
        "turbo": ("is Krea-2-Turbo, the few-step TDM-distilled checkpoint: it samples unguided (guidance_scale 0) on "
                  "a fixed shift (its pipeline's is_distilled: mu 1.15), so a CFG teacher's Euler steps on the "
                  "resolution-shifted grid are not its trajectory"),
    },
}
COVERED_FLAVOURS = {"qwen_image": ("v1.0", "v2.0"), "longcat_image": ("final", "dev"),
                     "flux3_image": ("klein-base",), "moss_image": ("base", "sft"), "flux2": ("klein-4b", "klein-9b"),
                     "krea2": ("raw",)}
# Families whose card pipeline (diffusers' class of SimpleTuner's text-to-image pipeline, else SimpleTuner's own) takes
# no `sigmas`: a PCM student, sampled on its phase edges passed as sigmas, cannot be sampled there.
PCM_UNSAMPLED = {"moss_image": "SimpleTuner's MOSSImagePipeline", "flux3_image": "SimpleTuner's Flux3ImagePipeline",
                 "ernie": "diffusers' ErnieImagePipeline"}
# The flavour SimpleTuner runs when model_flavour is unset and a model path is given, where its class picks a code path
# by flavour alone: Flux2 runs anything not named klein as dev (its Mistral-3 encoder, from the hub).
PATH_FLAVOURS = {"flux2": "dev"}
# SimpleTuner's DEFAULT_MODEL_FLAVOUR, which it takes only when pretrained_model_name_or_path is unset.
DEFAULT_FLAVOURS = {"qwen_image": "v2.1", "z_image": "turbo-ostris-v2", "z_image_omni": "base", "flux": "krea",
                    "longcat_image": "final", "flux3_image": "klein-base", "ernie": "base", "moss_image": "sft",
                    "flux2": "klein-9b", "krea2": "raw"}
# Flavours whose LoRA runs SimpleTuner gives a fixed "assistant" adapter inside the trained network (its
# `_maybe_load_assistant_lora`: the family's ASSISTANT_LORA_FLAVOURS, from assistant_lora_path or the flavour's default
# repo; `disable_assistant_lora` turns it off): family -> (flavours, those with a default repo). The LCM teacher is
# that network with its adapters off, so it would lose the assistant while the student keeps it.
ASSISTANT_LORA_FLAVOURS = {
    "flux": (("schnell",), ("schnell",)),
    "z_image": (("turbo", "turbo-ostris-v2"), ("turbo", "turbo-ostris-v2")),
    "qwen_image": (("v2.0", "v2.1"), ("v2.1",)),
    "flux3_image": (("klein",), ("klein",)),
    # ERNIE-Image-Turbo: SimpleTuner names no default repo (ASSISTANT_LORA_PATH ""), so only an assistant_lora_path
    # given for it loads one.
    "ernie": (("turbo",), ()),
}


def effective_flavour(model_family, model_flavour=None, model_path=None) -> str | None:
    """The flavour SimpleTuner runs: `model_flavour`, else its default for the family when no model path is given
    (ModelFoundation.setup_model_flavour), else the flavour its code runs then (PATH_FLAVOURS) or None (the family's
    base code path)."""
    if model_flavour:
        return str(model_flavour)
    return PATH_FLAVOURS.get(model_family) if model_path else DEFAULT_FLAVOURS.get(model_family)


def loads_assistant_lora(setting: Callable[[str], object]) -> str | None:
    """The flavour whose assistant adapter SimpleTuner loads into this run's trained network, or None."""
    family = setting("model_family")
    flavours, with_default = ASSISTANT_LORA_FLAVOURS.get(family, ((), ()))
    flavour = effective_flavour(family, setting("model_flavour"), setting("pretrained_model_name_or_path"))
    if str(setting("model_type") or "").lower() != "lora" or setting("disable_assistant_lora") or flavour not in flavours:
        return None
    return flavour if setting("assistant_lora_path") or flavour in with_default else None


def flow_refusal_reason(config: LcmConfig, setting: Callable[[str], object]) -> tuple[str, str] | None:
    """(the setting to change, why) for an LCM run of a flow-matching model that cannot run yet, or None. `setting`:
    the run's SimpleTuner setting of a name (config.json's value or the trainer's argument; None where unset). The
    FLOW_FAMILIES with the LCM and PCM variants are covered, LoRA and full (Flux with one guidance value for every call
    of a step: flux_guidance_mode constant), except the UNCOVERED_FLAVOURS (`model_flavour`, or SimpleTuner's default
    flavour where pretrained_model_name_or_path is unset) and LoRA runs that load an assistant adapter."""
    model_family = setting("model_family")
    if model_family not in FLOW_FAMILIES:
        return "model_family", f"model_family {model_family!r} is a flow-matching family it does not cover yet"
    flavour = effective_flavour(model_family, setting("model_flavour"), setting("pretrained_model_name_or_path"))
    if flavour in UNCOVERED_FLAVOURS.get(model_family, {}):
        covered = " or ".join(repr(name) for name in COVERED_FLAVOURS[model_family])
        why = UNCOVERED_FLAVOURS[model_family][flavour]
        unset = "" if model_family in PATH_FLAVOURS else " (or leave it unset with a model path)"
        if not setting("model_flavour") and model_family in PATH_FLAVOURS:
            why += " (SimpleTuner runs it with model_flavour unset and a model path)"
        return "model_flavour", f"{model_family} model_flavour {flavour!r} {why}; set model_flavour {covered}{unset}"
    assisted = loads_assistant_lora(setting)
    if assisted is not None:
        return "model_flavour", (
            f"a LoRA run of {model_family} model_flavour {assisted!r} gets SimpleTuner's assistant adapter inside the "
            "trained network, which the LCM teacher (the network with its adapters off) would lose while the student "
            "keeps it; distil the base (undistilled) flavour, or set disable_assistant_lora: true")
    if config.variant == "tcd":
        return "variant", ("variant 'tcd' is defined on a diffusion (epsilon / v) schedule, not on the flow path "
                           "(TCD's paper); use variant 'lcm' or 'pcm'")
    if config.variant == "pcm" and model_family in PCM_UNSAMPLED:
        return "variant", (f"variant 'pcm' ships a student sampled on its phase edges, passed to the pipeline as "
                           f"sigmas, and {PCM_UNSAMPLED[model_family]} takes no sigmas; use variant 'lcm'")
    if model_family == "flux" and (setting("flux_guidance_mode") or "constant") != "constant":
        return "flux_guidance_mode", (
            "flux_guidance_mode 'random-range' draws a new guidance value at every forward, so the teacher, its "
            "target and the student would each see another; set flux_guidance_mode 'constant' (flux_guidance_value)")
    return None


def flow_refusal(config: LcmConfig, setting: Callable[[str], object]) -> str | None:
    """`flow_refusal_reason` as the one line the trainer and `validate` print, or None."""
    reason = flow_refusal_reason(config, setting)
    return None if reason is None else refusal_line(reason[1])


def refusal_line(why: str) -> str:
    """The refusal's one line around `why` (the second item of `flow_refusal_reason`)."""
    return (f"distillation_method 'lcm' (simpletuner-lcm): {why}; it covers LCM (LoRA and full) of "
            f"{', '.join(FLOW_FAMILIES)} among flow-matching families (PCM too, but for {', '.join(PCM_UNSAMPLED)}), "
            "and every epsilon / v_prediction family")


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
