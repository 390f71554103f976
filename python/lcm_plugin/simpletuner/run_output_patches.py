"""Run-output patches R1-R3 (the table is in install.py's docstring; the content is `lcm_plugin.outputs`)."""

from __future__ import annotations

import functools
import json
import logging
import os

from lcm_plugin.simpletuner.run_config import is_lcm_run, run_lcm_config
from lcm_plugin.simpletuner.surfaces import import_surface, require

logger = logging.getLogger("simpletuner-lcm")



LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default, what SimpleTuner writes


def _validation_scheduler_config(model) -> dict:
    """The config of the scheduler `LcmDistiller.get_scheduler()` gives validation: the same function and inputs
    (SimpleTuner's training noise schedule, which the trainer hands the distiller, and the run's LCM block)."""
    from lcm_plugin import outputs

    return outputs.validation_scheduler_config(model.noise_schedule.config, run_lcm_config(model.config))


def _flow_card_settings(model, args) -> dict:
    """A flow family's card: its distilled component is a transformer (SimpleTuner's own class, named as diffusers'
    class of the same weights and config, which is what a user loads), and Flux samples at the guidance input it was
    distilled with; where diffusers has no pipeline of SimpleTuner's name (FLUX.3's), the card loads the base model
    with SimpleTuner's own; a pipeline that guides at scale 1 (Krea 2's) is called unguided at its own scale. Empty for
    the UNet families."""
    from lcm_plugin.config.families import FLOW_FAMILIES
    from lcm_plugin.inference import pipeline_cfg_scale

    family = getattr(args, "model_family", None)
    if family not in FLOW_FAMILIES:
        return {}
    import diffusers
    from simpletuner.helpers.models.common import PipelineTypes

    settings = {"denoiser": ("transformer", type(model.get_trained_component()).__name__)}
    # The class a card's `DiffusionPipeline.from_pretrained` gives: diffusers' of SimpleTuner's name (SimpleTuner
    # vendors its own copies under the same names), else SimpleTuner's own.
    pipeline = (getattr(model, "PIPELINE_CLASSES", None) or {}).get(PipelineTypes.TEXT2IMG)
    if pipeline is not None and not hasattr(diffusers, pipeline.__name__):
        settings["pipeline_class"] = (pipeline.__module__, pipeline.__name__)
    elif pipeline is not None:
        pipeline = getattr(diffusers, pipeline.__name__)
    if pipeline is not None and not hasattr(pipeline, "load_lora_weights"):
        settings["lora_into_denoiser"] = True
    unguided_scale = pipeline_cfg_scale(pipeline, 1.0) if pipeline is not None else 1.0
    if unguided_scale != 1.0:
        settings["unguided_scale"] = unguided_scale
    if FLOW_FAMILIES[family] == "embedded":
        settings["guidance_scale"] = float(getattr(args, "flux_guidance_value", 1.0))
    return settings


def _base_scheduler_config(model) -> dict | None:
    """The base model's own scheduler config (what the card's `pipeline.scheduler.config` will be), None if it
    cannot be read here (the card then spells out every scheduler setting)."""
    from diffusers import LCMScheduler

    try:
        return LCMScheduler.load_config(model._model_config_path(), subfolder="scheduler")
    except (OSError, ValueError) as error:
        logger.info("simpletuner-lcm: base scheduler config unreadable (%s); the card lists every setting.", error)
        return None


def _lcm_code_example(original):
    """R1: the card's inference section for LCM runs."""

    @functools.wraps(original)
    def code_example(args, repo_id=None, model=None, base_model=None):
        lora = "lora" in args.model_type
        # LyCORIS adapters load through lycoris, not diffusers: upstream's card code stays (not covered here).
        lycoris = lora and str(getattr(args, "lora_type", "")).lower() == "lycoris"
        if not is_lcm_run(args) or model is None or lycoris:
            return original(args, repo_id, model=model, base_model=base_model)
        from lcm_plugin import outputs

        published = repo_id if args.push_to_hub and repo_id else None
        base = getattr(args, "model_card_base_model", None) or args.pretrained_model_name_or_path
        # A full model's saved pipeline carries its scheduler (R2); a LoRA's card rebuilds it on the base model's.
        scheduler_config = _validation_scheduler_config(model)
        overrides = outputs.scheduler_overrides(scheduler_config, _base_scheduler_config(model)) if lora else {}
        width, height = outputs.first_resolution(args.validation_resolution)
        lcm = run_lcm_config(args)
        settings = outputs.CardSettings(
            model_id=base if lora else published or os.path.join(args.output_dir, "pipeline"),
            base_model_id=None if lora or args.save_text_encoder else base,
            adapter_id=(published or args.output_dir) if lora else None,
            lcm=lcm,
            scheduler_overrides=overrides,
            scheduler_class=scheduler_config["_class_name"],
            eta=outputs.pipeline_eta(model.noise_schedule.config, lcm),
            sigmas=outputs.pipeline_sigmas(model.noise_schedule.config, lcm),
            prompt=args.validation_prompt or outputs.DEFAULT_PROMPT,
            seed=args.validation_seed or args.seed or 42,
            width=width,
            height=height,
            comfyui_lora=lora and str(getattr(args, "lora_format", "") or "").lower() == "comfyui",
            **_flow_card_settings(model, args),
        )
        return outputs.inference_section(settings)

    return code_example


def _lcm_save_model_card(original):
    """R2: validation's scheduler in a saved full-model pipeline before the card is written and pushed; tags after."""

    @functools.wraps(original)
    def save_model_card(model, *args, repo_folder=None, **kwargs):
        config = getattr(model, "config", None)
        if not is_lcm_run(config) or repo_folder is None:
            return original(model, *args, repo_folder=repo_folder, **kwargs)
        from pathlib import Path

        from lcm_plugin import outputs

        lora = "lora" in config.model_type
        pipeline_dir = Path(repo_folder)
        if not lora and (pipeline_dir / "model_index.json").is_file():
            outputs.write_pipeline_scheduler(pipeline_dir, _validation_scheduler_config(model))
            if _plain_unet_under_simpletuner_name(pipeline_dir):
                outputs.name_diffusers_unet(pipeline_dir)
        result = original(model, *args, repo_folder=repo_folder, **kwargs)
        card = Path(repo_folder) / "README.md"
        card.write_text(outputs.add_card_tags(card.read_text(), outputs.LORA_TAGS if lora else outputs.FULL_MODEL_TAGS))
        return result

    return save_model_card


def _plain_unet_under_simpletuner_name(pipeline_dir) -> bool:
    """SimpleTuner saves SDXL's UNet as its `FlowMapUNet2DConditionModel`, which plain diffusers cannot import;
    with flow-map time conditioning off (no `deltatime_type` in its config) it is diffusers' UNet2DConditionModel
    with the same weights and config keys."""
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    unet_config = pipeline_dir / "unet" / "config.json"
    return (
        str((index.get("unet") or [""])[0]).startswith("simpletuner.")
        and unet_config.is_file()
        and json.loads(unet_config.read_text()).get("deltatime_type") is None
    )


def _lcm_save_lora_weights(original):
    """R3: the LCM settings in the metadata of every LoRA file SimpleTuner writes."""

    @functools.wraps(original)
    def save_lora_weights(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if is_lcm_run(self.config):
            from pathlib import Path

            from lcm_plugin import __version__, outputs

            save_directory = args[0] if args else kwargs["save_directory"]
            path = Path(save_directory) / (kwargs.get("weight_name") or LORA_WEIGHT_NAME)
            if path.is_file():  # diffusers writes nothing on a non-main process
                metadata = outputs.lora_metadata(
                    run_lcm_config(self.config), _validation_scheduler_config(self), plugin_version=__version__
                )
                outputs.add_safetensors_metadata(path, metadata)
        return result

    return save_lora_weights


def surfaces() -> dict:
    """The SimpleTuner objects R1-R3 patch, checked (install() calls this before it changes anything)."""
    metadata = import_surface("simpletuner.helpers.publishing.metadata")
    huggingface = import_surface("simpletuner.helpers.publishing.huggingface")
    model_foundation = require(import_surface("simpletuner.helpers.models.common"), "ModelFoundation",
                                "simpletuner.helpers.models.common")
    require(metadata, "code_example", "simpletuner.helpers.publishing.metadata")
    require(huggingface, "save_model_card", "simpletuner.helpers.publishing.huggingface")
    require(require(huggingface, "HubManager", "simpletuner.helpers.publishing.huggingface"), "upload_model",
             "HubManager")
    for name in ("save_lora_weights", "_model_config_path"):
        require(model_foundation, name, "ModelFoundation")
    return {"metadata": metadata, "huggingface": huggingface, "model_foundation": model_foundation}


def patch(surfaces: dict, saved: dict) -> None:
    saved["run_outputs"] = {
        "code_example": surfaces["metadata"].code_example,
        "save_model_card": surfaces["huggingface"].save_model_card,
        "save_lora_weights": surfaces["model_foundation"].__dict__["save_lora_weights"],
    }
    surfaces["metadata"].code_example = _lcm_code_example(surfaces["metadata"].code_example)
    surfaces["huggingface"].save_model_card = _lcm_save_model_card(surfaces["huggingface"].save_model_card)
    surfaces["model_foundation"].save_lora_weights = _lcm_save_lora_weights(
        surfaces["model_foundation"].save_lora_weights
    )


def restore(saved: dict) -> None:
    from simpletuner.helpers.models.common import ModelFoundation
    from simpletuner.helpers.publishing import huggingface, metadata

    originals = saved["run_outputs"]
    metadata.code_example = originals["code_example"]
    huggingface.save_model_card = originals["save_model_card"]
    ModelFoundation.save_lora_weights = originals["save_lora_weights"]
