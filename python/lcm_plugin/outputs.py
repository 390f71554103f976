"""What an LCM run hands the user: the sampler saved with a full model, the settings recorded in a LoRA file, and
the model card's inference section and tags.

Pure logic and file writes, no SimpleTuner import: `lcm_plugin.simpletuner.run_output_patches` calls these from
SimpleTuner's save and model-card code (install.py's "Run outputs" section). Every sampler setting comes from
`lcm_plugin.inference.variant_scheduler`, the function validation samples with (LCMScheduler for LCM,
TCDScheduler for TCD and PCM), so what a user runs is what validation showed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lcm_plugin.config import LcmConfig

METADATA_PREFIX = "lcm."
# Safetensors metadata key holding the full scheduler config (JSON, its `_class_name` naming the diffusers class).
METADATA_SCHEDULER_KEY = METADATA_PREFIX + "scheduler_config"
METADATA_VERSION_KEY = METADATA_PREFIX + "plugin_version"
LORA_TAGS = ("lcm", "lcm-lora")
FULL_MODEL_TAGS = ("lcm",)
CARD_STEPS = 4
# ComfyUI's "lcm" model sampling hard-codes LCM's defaults: a 50-step original grid and timestep scaling 10.
COMFYUI_ORIGINAL_STEPS = 50
COMFYUI_TIMESTEP_SCALING = 10.0
DEFAULT_RESOLUTION = 1024
DEFAULT_PROMPT = "An astronaut is riding a horse through the jungles of Thailand."


def _diffusers_class(scheduler) -> type:
    """The diffusers class of a validation scheduler (TCD's fixed-gamma subclass is diffusers' TCDScheduler)."""
    return next(cls for cls in type(scheduler).__mro__ if cls.__module__.startswith("diffusers."))


def validation_scheduler_config(training_scheduler_config, lcm: LcmConfig) -> dict:
    """The config of the scheduler validation samples with (as scheduler_config.json holds it, `_class_name` naming
    the diffusers class: LCMScheduler or TCDScheduler).

    training_scheduler_config: SimpleTuner's training noise scheduler config (its betas and prediction type).
    """
    from lcm_plugin.inference import variant_scheduler

    scheduler = variant_scheduler(training_scheduler_config, lcm)
    config = json.loads(scheduler.to_json_string())
    config["_class_name"] = _diffusers_class(scheduler).__name__
    return config


def pipeline_eta(training_scheduler_config, lcm: LcmConfig) -> float | None:
    """The `eta` a diffusers pipeline call needs to sample as validation does: TCD's gamma (plain TCDScheduler takes
    it from the pipeline's `eta`), None for LCMScheduler, which has no gamma."""
    from lcm_plugin.inference import variant_scheduler

    return getattr(variant_scheduler(training_scheduler_config, lcm), "gamma", None)


def pipeline_sigmas(training_scheduler_config, lcm: LcmConfig, steps: int = CARD_STEPS) -> list[float] | None:
    """The `sigmas` a diffusers pipeline call needs to sample a flow PCM student at `steps` as validation does (its
    phase edges on the training grid, unshifted as the pipeline's FlowMatchEulerDiscreteScheduler takes them); None
    for every other sampler, which finds its steps itself."""
    from lcm_plugin.inference import variant_scheduler

    scheduler = variant_scheduler(training_scheduler_config, lcm)
    return scheduler.phase_sigmas(steps) if hasattr(scheduler, "phase_sigmas") else None


def scheduler_class(scheduler_config: dict) -> type:
    """The diffusers scheduler class a config's `_class_name` names."""
    import diffusers

    return getattr(diffusers, scheduler_config["_class_name"])


def scheduler_settings(scheduler_config: dict) -> dict:
    """The settings the config's scheduler class takes, out of a config that may also carry other schedulers' keys
    (SDXL's config passes `use_karras_sigmas` and the like through; LCMScheduler and TCDScheduler ignore them)."""
    import inspect

    accepted = inspect.signature(scheduler_class(scheduler_config).__init__).parameters
    return {key: value for key, value in scheduler_config.items() if key in accepted and key != "self"}


def scheduler_overrides(scheduler_config: dict, base_scheduler_config: dict | None) -> dict:
    """Keyword arguments so that `<its class>.from_config(base_scheduler_config, **overrides)` equals
    `scheduler_config`: `original_inference_steps` and `timestep_scaling` always where the class has them (a wrong
    value silently moves the timesteps), plus every setting the base model's config would get wrong. With no base
    config known, every setting is spelled out."""
    settings = scheduler_settings(scheduler_config)
    # The flow schedulers have neither: their grid is the base model's own shifted schedule.
    overrides = {key: settings[key] for key in ("original_inference_steps", "timestep_scaling") if key in settings}
    if base_scheduler_config is None:
        return {**overrides, **settings}
    rebuilt_from_base = scheduler_class(scheduler_config).from_config(dict(base_scheduler_config))
    from_base = scheduler_settings({**json.loads(rebuilt_from_base.to_json_string()),
                                    "_class_name": scheduler_config["_class_name"]})
    overrides.update({key: value for key, value in settings.items() if from_base.get(key) != value})
    return overrides


def lora_metadata(lcm: LcmConfig, scheduler_config: dict, *, plugin_version: str) -> dict[str, str]:
    """Safetensors metadata recording how the LoRA was distilled and how to sample it (string values, JSON-encoded)."""
    metadata = {METADATA_PREFIX + key: json.dumps(value) for key, value in lcm.model_dump().items()}
    metadata[METADATA_SCHEDULER_KEY] = json.dumps(scheduler_config, sort_keys=True)
    metadata[METADATA_VERSION_KEY] = plugin_version
    return metadata


def lcm_settings_from_metadata(metadata: dict[str, str]) -> tuple[LcmConfig, dict]:
    """Read back what `lora_metadata` wrote: the LCM settings and the scheduler config."""
    fields = {
        key.removeprefix(METADATA_PREFIX): json.loads(value)
        for key, value in metadata.items()
        if key.startswith(METADATA_PREFIX) and key.removeprefix(METADATA_PREFIX) in LcmConfig.model_fields
    }
    return LcmConfig.model_validate(fields), json.loads(metadata[METADATA_SCHEDULER_KEY])


def add_safetensors_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Merge `metadata` into a safetensors file's header (existing keys kept unless overwritten), atomically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        merged = {**(handle.metadata() or {}), **metadata}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=merged)
    os.replace(partial, path)


def write_pipeline_scheduler(pipeline_dir: Path, scheduler_config: dict) -> None:
    """Make a saved diffusers pipeline folder sample with the scheduler `scheduler_config` describes: the scheduler's
    config file and model_index.json's scheduler entry, which `DiffusionPipeline.from_pretrained` reads."""
    pipeline_dir = Path(pipeline_dir)
    index_file = pipeline_dir / "model_index.json"
    index = json.loads(index_file.read_text())
    scheduler_class(scheduler_config).from_config(scheduler_config).save_pretrained(str(pipeline_dir / "scheduler"))
    index["scheduler"] = ["diffusers", scheduler_config["_class_name"]]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def name_diffusers_unet(pipeline_dir: Path) -> None:
    """Record diffusers' `UNet2DConditionModel` as the class of a saved pipeline's UNet (model_index.json and
    unet/config.json), so plain diffusers loads it. For a subclass saved under its own name that has the same
    weights and config keys; the caller decides that."""
    pipeline_dir = Path(pipeline_dir)
    index_file, config_file = pipeline_dir / "model_index.json", pipeline_dir / "unet" / "config.json"
    index, config = json.loads(index_file.read_text()), json.loads(config_file.read_text())
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    config["_class_name"] = "UNet2DConditionModel"
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def add_card_tags(card: str, tags: tuple[str, ...]) -> str:
    """`card` (a README.md with YAML front matter holding a `tags:` list) with `tags` added once each."""
    match = re.match(r"---\n(.*?\n)---\n", card, flags=re.DOTALL)
    tags_line = re.search(r"^tags:\n", match.group(1), flags=re.MULTILINE) if match else None
    if tags_line is None:
        raise ValueError("model card: no YAML front matter with a `tags:` list")
    present = set(re.findall(r"^  - (.+)$", match.group(1), flags=re.MULTILINE))
    added = "".join(f"  - {tag}\n" for tag in tags if tag not in present)
    insert_at = match.start(1) + tags_line.end()
    return card[:insert_at] + added + card[insert_at:]


def first_resolution(value) -> tuple[int, int]:
    """(width, height) of SimpleTuner's `validation_resolution` ("1024", "1024x768", "1024,768x1024", 1024):
    the first entry; 1024 square when unset, as SimpleTuner's own card does."""
    if value in (None, ""):
        return DEFAULT_RESOLUTION, DEFAULT_RESOLUTION
    first = str(value).split(",")[0].strip()
    width, _, height = first.partition("x")
    return int(float(width)), int(float(height or width))


@dataclass(frozen=True)
class CardSettings:
    """What the card's inference section needs from the run.

    model_id: the base model (LoRA) or the saved pipeline (full model), a hub id or a local path.
    adapter_id: where the LoRA is (hub repo or output folder); None for a full model.
    base_model_id: full model saved without text encoders (SimpleTuner's default): the base model they come from.
    scheduler_overrides: LoRA only, from `scheduler_overrides` (the pipeline of a full model carries its scheduler).
    scheduler_class: the validation scheduler's diffusers class name (`validation_scheduler_config`'s `_class_name`).
    eta: from `pipeline_eta`: passed to the pipeline call (TCD's gamma); None for LCM.
    denoiser: the pipeline component that was distilled and its diffusers class (a UNet, or a flow family's
        transformer), for a full model saved without text encoders.
    guidance_scale: the pipeline call's; 0: guidance distilled in (the card passes unguided_scale, no CFG), or a
        guidance-embedding model's trained value (Flux: flux_guidance_value).
    unguided_scale: the pipeline's scale for no CFG: 1, CFG's identity (uncond + 1 (cond - uncond) = cond), or 0 in
        a pipeline that guides at every scale above 0 (its cond + g (cond - uncond): Krea 2's;
        inference.pipeline_cfg_scale).
    sigmas: from `pipeline_sigmas`: passed to the pipeline call instead of a step count (a flow PCM student's phase
        edges); None otherwise.
    lora_into_denoiser: the diffusers pipeline of the base model has no LoRA loader (LongCat-Image's): the card loads
        and fuses the adapter in the denoiser itself.
    pipeline_class: (module, class) of the base model's pipeline where diffusers has none of its name (SimpleTuner's
        own, FLUX.3's): the card imports it as DiffusionPipeline, as SimpleTuner's own card does; None: diffusers'.
    """

    model_id: str
    adapter_id: str | None
    lcm: LcmConfig
    scheduler_overrides: dict
    prompt: str
    seed: int
    width: int
    height: int
    comfyui_lora: bool = False
    base_model_id: str | None = None
    scheduler_class: str = "LCMScheduler"
    eta: float | None = None
    denoiser: tuple[str, str] = ("unet", "UNet2DConditionModel")
    guidance_scale: float = 0.0
    unguided_scale: float = 1.0
    sigmas: tuple[float, ...] | None = None
    lora_into_denoiser: bool = False
    pipeline_class: tuple[str, str] | None = None

    @property
    def flow(self) -> bool:
        """Whether the sampler is a flow-matching one, whose grid is the base model's own shifted schedule."""
        from lcm_plugin.inference import is_flow_matching

        return is_flow_matching({"_class_name": self.scheduler_class})


def _python_literal(value) -> str:
    return repr(value) if not isinstance(value, str) else json.dumps(value)


def inference_snippet(settings: CardSettings) -> str:
    """The Python code block of the card: validation's sampler at 4 steps, no guidance, no negative prompt."""
    lora = settings.adapter_id is not None
    components = not lora and settings.base_model_id is not None
    scheduler = settings.scheduler_class
    sampler = scheduler.removesuffix("Scheduler")
    denoiser, denoiser_class = settings.denoiser
    imports = (["AutoencoderKL", "DiffusionPipeline", scheduler, denoiser_class] if components
               else ["DiffusionPipeline", scheduler] if lora else ["DiffusionPipeline"])
    if settings.pipeline_class is not None:
        imports.remove("DiffusionPipeline")
    lines = ["import torch", *([f"from diffusers import {', '.join(imports)}"] if imports else [])]
    if settings.pipeline_class is not None:
        lines.append(f"from {settings.pipeline_class[0]} import {settings.pipeline_class[1]} as DiffusionPipeline")
    lines += ["", f"model_id = {_python_literal(settings.model_id)}"]
    if lora:
        lines.append(f"adapter_id = {_python_literal(settings.adapter_id)}")
    if components:
        lines.append(f"base_model_id = {_python_literal(settings.base_model_id)}")
    lines += [
        "device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'",
        "dtype = torch.bfloat16 if device == 'cuda' else torch.float32",
    ]
    if components:
        lines += [
            f"# The run saved the distilled {denoiser}, its VAE and its {scheduler};",
            "# the text encoders are the base model's.",
            "pipeline = DiffusionPipeline.from_pretrained(",
            "    base_model_id,",
            f'    {denoiser}={denoiser_class}.from_pretrained(model_id, subfolder="{denoiser}", torch_dtype=dtype),',
            '    vae=AutoencoderKL.from_pretrained(model_id, subfolder="vae", torch_dtype=dtype),',
            f'    scheduler={scheduler}.from_pretrained(model_id, subfolder="scheduler"),',
            "    torch_dtype=dtype,",
            ")",
        ]
    else:
        lines.append("pipeline = DiffusionPipeline.from_pretrained(model_id, torch_dtype=dtype)")
    if lora:
        lines += [
            *([f"# Sample with {sampler} on the base model's flow schedule, as the LoRA was trained."]
              if settings.flow else
              [f"# Sample with {sampler} on the grid the LoRA was trained on; another scheduler, or another",
               f"# original_inference_steps, gives non-{sampler} or shifted-timestep samples."]),
            f"pipeline.scheduler = {scheduler}.from_config(",
            "    pipeline.scheduler.config,",
            *(f"    {key}={_python_literal(value)}," for key, value in settings.scheduler_overrides.items()),
            ")",
            *([f"# This pipeline class has no LoRA loader: the adapter goes into its {denoiser}.",
               f'pipeline.{denoiser}.load_lora_adapter(adapter_id, weight_name="pytorch_lora_weights.safetensors",',
               f'                                         prefix="{denoiser}")']
              if settings.lora_into_denoiser else ["pipeline.load_lora_weights(adapter_id)"]),
            f"# Optional: merge the LoRA into the {denoiser} (same images, no LoRA cost per step).",
            f"pipeline.{denoiser}.fuse_lora()" if settings.lora_into_denoiser else "pipeline.fuse_lora()",
        ]
    elif not components:
        lines.append(f"# The saved pipeline's scheduler is the {scheduler} the model was distilled for.")
    lines += [
        "pipeline.to(device)",
        "",
        f"prompt = {_python_literal(settings.prompt)}",
        "image = pipeline(",
        "    prompt=prompt,",
        (f"    sigmas={list(settings.sigmas)!r},  # the phase edges of the training grid"
         if settings.sigmas else f"    num_inference_steps={CARD_STEPS},  # 1 to 8 steps work"),
        # 1, CFG's identity, runs no CFG in the pipelines that read their scale as CFG's w; 0 only in those that turn
        # CFG off below 1 (diffusers'), not in one that guides at any scale but 1 (SimpleTuner's MOSS-Image's); those
        # that read it as cond + g (cond - uncond) (Krea 2's) guide at any scale but 0 (unguided_scale).
        (f"    guidance_scale={settings.guidance_scale!r},  # the guidance input the model was distilled at"
         if settings.guidance_scale else
         f"    guidance_scale={settings.unguided_scale!r},  # guidance is distilled in; no CFG, so a negative prompt "
         "would have no effect"),
        *([f"    eta={settings.eta!r},  # TCD's gamma, as validation sampled (0 = deterministic)"]
          if settings.eta is not None else []),
        f"    generator=torch.Generator(device=device).manual_seed({settings.seed}),",
        f"    width={settings.width},",
        f"    height={settings.height},",
        ").images[0]",
        'image.save("output.png")',
    ]
    return "\n".join(lines) + "\n"


def inference_section(settings: CardSettings) -> str:
    """The card's text under "## Inference": how to sample the distilled model correctly."""
    lcm = settings.lcm
    kind = "an LCM-LoRA" if settings.adapter_id is not None else "a latent consistency model (LCM)"
    variant = "" if lcm.variant == "lcm" else f", variant {lcm.variant}"
    eta = "" if settings.eta is None else f" with `eta={settings.eta!r}` in the pipeline call (TCD's gamma)"
    grid = ("the base model's own flow schedule" if settings.flow else
            f"the training grid (`original_inference_steps={lcm.num_ddim_timesteps}`)")
    steps = (f"at the {len(settings.sigmas)} sigmas below (the phase edges of the training grid; the scheduler "
             "shifts them as it shifts its own)" if settings.sigmas else
             f"{CARD_STEPS} steps (1 to 8 work; more are not better)")
    text = (
        f"This is {kind} distilled with simpletuner-lcm (num_ddim_timesteps={lcm.num_ddim_timesteps}, "
        f"timestep_scaling_factor={lcm.timestep_scaling_factor:g}, teacher guidance scale "
        f"{lcm.w_min:g}-{lcm.w_max:g}{variant}). Sample it with diffusers' `{settings.scheduler_class}` on "
        f"{grid}{eta}, {steps}, guidance scale {settings.unguided_scale:g} (no CFG) and no negative prompt.\n\n"
        f"```python\n{inference_snippet(settings)}```\n"
    )
    if settings.comfyui_lora:
        text += "\n" + comfyui_note(lcm)
    return text


def comfyui_note(lcm: LcmConfig) -> str:
    """How to sample the ComfyUI-format LoRA in ComfyUI."""
    text = (
        "### ComfyUI\n\n"
        "This file uses ComfyUI's LoRA key names. Load the base checkpoint, apply this file with *Load LoRA*, add "
        "*ModelSamplingDiscrete* with sampling `lcm`, and in *KSampler* pick sampler **`lcm`**, scheduler "
        f"`sgm_uniform`, {CARD_STEPS} steps (1 to 8 work) and cfg 1.0 (ComfyUI's \"no guidance\"); leave the "
        "negative prompt empty.\n"
    )
    if (lcm.num_ddim_timesteps, lcm.timestep_scaling_factor) != (COMFYUI_ORIGINAL_STEPS, COMFYUI_TIMESTEP_SCALING):
        text += (
            f"\nComfyUI's `lcm` sampling assumes a {COMFYUI_ORIGINAL_STEPS}-step grid and timestep scaling "
            f"{COMFYUI_TIMESTEP_SCALING:g}; this LoRA was trained with {lcm.num_ddim_timesteps} and "
            f"{lcm.timestep_scaling_factor:g}, so ComfyUI samples it slightly off. The diffusers code above is exact.\n"
        )
    if lcm.variant != "lcm":
        text += (
            f"\nThis LoRA was distilled as {lcm.variant.upper()} and validated with TCDScheduler; ComfyUI's `lcm` "
            "sampler is LCM's, so it samples the LoRA differently. The diffusers code above is exact.\n"
        )
    return text
