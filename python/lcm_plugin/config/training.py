"""config.json: the keys that govern an LCM run, typed; every other key checked against SimpleTuner's catalogue.

`TrainingConfig` types what an LCM run depends on (ranges, relations, descriptions for editors).
`check_training_config` checks the whole file: unknown keys (with a suggestion), values SimpleTuner's
argument parser would reject (type, choices), required keys, and the typed model's ranges.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lcm_plugin.config.argv import (
    Dropped,
    Passed,
    map_config,
    parse_text,
    prefix_matches,
    preprocess_value,
    resolve_option,
    training_folder,
)
from lcm_plugin.config.catalogue import load_catalogue
from lcm_plugin.config.families import flow_refusal_reason, is_flow_family, refusal_line
from lcm_plugin.config.lcm import LcmConfig, settings_at
from lcm_plugin.config.problems import Problem, did_you_mean, pointer

SCHEMA_KEY = "$schema"
# What the LCM distiller trains (the same tuple the SimpleTuner adapter enforces at distiller creation).
SUPPORTED_MODEL_TYPES = ("lora", "full")


class TrainingConfig(BaseModel):
    """config.json keys that shape an LCM run: ranges and meaning on top of SimpleTuner's own typing.

    Defaults are SimpleTuner's and live in its catalogue (None here), so they cannot drift from it.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    schema_uri: str | None = Field(
        None,
        alias=SCHEMA_KEY,
        description="JSON Schema of this file, for editors. Read by simpletuner-lcm only: remove it before "
        "handing the file to a bare SimpleTuner, whose parser rejects unknown keys.",
    )
    distillation_method: str | None = Field(
        None, description="Distillation method; 'lcm' selects Latent Consistency Distillation.", examples=["lcm"]
    )
    distillation_config: dict[str, Any] | str | None = Field(
        None,
        description='Settings of the distillation method: {"lcm": {...}} (see the lcm block schema), the block '
        "itself, or SimpleTuner's string form (a JSON/Python literal, or the path of a JSON file).",
        examples=[{"lcm": {"num_ddim_timesteps": 50, "w_min": 1.0, "w_max": 12.0, "loss_type": "l2"}}],
    )
    model_family: str | None = Field(None, description="Model architecture to train.", examples=["sdxl"])
    model_type: Literal["full", "lora"] | None = Field(
        None,
        description="'lora' distils an LCM-LoRA (teacher = the base model with adapters off); 'full' trains every "
        "weight against an EMA target network (distillation_config.lcm.ema_decay).",
    )
    output_dir: str | None = Field(None, description="Folder for checkpoints, the LoRA and logs.")
    data_backend_config: str | None = Field(
        None,
        description="Path of multidatabackend.json, as seen from where training starts.",
        examples=["config/multidatabackend.json"],
    )
    pretrained_model_name_or_path: str | None = Field(None, description="The teacher: a hub id or a local folder.")
    lora_rank: int | None = Field(None, ge=1, description="LoRA rank; LCM-LoRA uses 64 for SDXL.", examples=[64])
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; the LoRA scale is lora_alpha / lora_rank.")
    lora_dropout: float | None = Field(None, ge=0.0, lt=1.0, description="Dropout inside the LoRA layers.")
    learning_rate: float | None = Field(None, gt=0.0, description="Peak learning rate; LCM-LoRA uses 1e-4.")
    train_batch_size: int | None = Field(None, ge=1, description="Samples per device per step.")
    gradient_accumulation_steps: int | None = Field(None, ge=1, description="Steps accumulated per optimizer update.")
    max_train_steps: int | None = Field(None, ge=0, description="Stop after this many optimizer steps (0: use epochs).")
    lr_warmup_steps: int | None = Field(None, ge=0, description="Warm-up steps of the learning rate.")
    resolution: int | None = Field(None, gt=0, description="Training resolution (resolution_type units).")
    resolution_type: Literal["pixel", "area", "pixel_area"] | None = Field(
        None, description="How resolution and the image-size limits are read."
    )
    minimum_image_size: int | None = Field(None, ge=0, description="Skip smaller images (resolution_type units).")
    maximum_image_size: int | None = Field(
        None, gt=0, description="Downsample larger images; needs target_downsample_size."
    )
    target_downsample_size: int | None = Field(None, gt=0, description="Size images above maximum_image_size go to.")
    caption_dropout_probability: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Fraction of captions dropped. For SDXL the dropped samples also get zeroed time_ids; LCM "
        "distillation makes its own unconditional branch, so 0 is usual.",
    )
    validation_guidance: float | None = Field(
        None, ge=0.0, description="CFG scale of validation images; an LCM student has guidance distilled in: use 0-2."
    )
    validation_num_inference_steps: int | None = Field(
        None, ge=1, description="Sampling steps of validation images; LCM students are judged at 1-8 steps."
    )
    validation_resolution: str | int | None = Field(
        None, description="Validation sizes: '1024', '1024x1024' or a comma-separated list.", examples=["1024x1024"]
    )
    validation_step_interval: int | None = Field(None, ge=1, description="Validate every N steps.")
    validation_prompt: str | None = Field(None, description="Prompt of the validation images.")
    validation_negative_prompt: str | None = Field(
        None, description="Negative prompt; it only acts when validation_guidance > 1."
    )


def canonical_key(key: str) -> str:
    """SimpleTuner's key without its `--` prefix (its JSON-to-argv mapping strips every leading dash)."""
    return key.lstrip("-")


def effective_settings(config: dict) -> dict[str, Any]:
    """What a run uses, by option name: the value SimpleTuner's parser ends up with for each key config.json
    passes (after its JSON-to-argv mapping: dropped values, last list item, `{env:...}`, config/examples
    paths), else SimpleTuner's default. Values the parser would refuse are left at the default."""
    known = load_catalogue()["keys"]
    settings = {name: entry["default"] for name, entry in known.items()}
    passed, _ = map_config({key: value for key, value in config.items() if key != SCHEMA_KEY})
    for item in passed:
        entry = known.get(item.option)
        if entry is None:
            continue
        ok, value = parse_text(entry, item.texts[-1])
        if ok:
            settings[entry.get("alias_of", item.option)] = _normalise_choice(item.option, value)
    return settings


def check_training_config(config: Any, file: str, config_dir: Path | None = None) -> list[Problem]:
    """Every problem of a parsed config.json. `config_dir` resolves a distillation_config file path.

    Errors are what SimpleTuner's JSON-to-argv mapping, argument parser and post-parse rules refuse (or what
    crashes later), and an invalid lcm block; what SimpleTuner silently drops or ignores is a warning.
    """
    if not isinstance(config, dict):
        return [Problem(file, "", f"expected a JSON object of SimpleTuner options, got {type(config).__name__}")]
    known = load_catalogue()["keys"]
    passed, dropped = map_config({key: value for key, value in config.items() if key != SCHEMA_KEY})
    problems = [_dropped_problem(item, file) for item in dropped]
    problems = [problem for problem in problems if problem is not None]
    landed: dict[str, str] = {}
    for item in passed:
        problems += _passed_problems(item, file, known)
        option = known[item.option].get("alias_of", item.option) if item.option in known else None
        if option is None:
            continue
        if option in landed:
            problems.append(
                Problem(
                    file,
                    pointer(item.key),
                    f"duplicates {landed[option]!r}: both set {option!r}, SimpleTuner keeps this later one",
                    "warning",
                )
            )
        landed[option] = item.key
    for name, entry in known.items():
        if entry["required"] and name not in landed and name != "data_backend_config" and "alias_of" not in entry:
            problems.append(Problem(file, "", f"missing required key {name!r} ({entry['help']})"))
    flagged = {problem.pointer for problem in problems if problem.severity == "error"}
    settings = effective_settings(config)
    problems += _typed_problems(settings, landed, file, flagged)
    problems += _relation_problems(settings, landed, file, flagged, config_dir or Path("."))
    problems += _lcm_block_problems(settings, landed, file, config_dir, config)
    return problems


def _dropped_problem(item: Dropped, file: str) -> Problem | None:
    """A warning for what SimpleTuner drops that the user probably meant to set."""
    name = canonical_key(item.key)
    known = load_catalogue()["keys"]
    if item.reason == "legacy":
        return Problem(file, pointer(item.key), "legacy key: SimpleTuner translates or ignores it", "warning")
    if item.reason == "dataset_field":
        return Problem(
            file, pointer(item.key), "a dataset setting: SimpleTuner ignores it in config.json; set it in "
            "multidatabackend.json", "warning"
        )
    if item.reason == "object":
        return Problem(
            file, pointer(item.key), "SimpleTuner drops an object here (it takes a single value)", "warning"
        )
    if name not in known and resolve_option(name) is None:
        why = {"null": "null", "false": '"false"', "empty": "empty"}[item.reason]
        return Problem(
            file,
            pointer(item.key),
            f"unknown key{did_you_mean(name, known)}; SimpleTuner drops it because its value is {why}",
            "warning",
        )
    return None


def _passed_problems(item: Passed, file: str, known: dict) -> list[Problem]:
    name = canonical_key(item.key)
    where = pointer(item.key)
    if item.option not in known:
        matches = prefix_matches(name)
        if len(matches) > 1:
            return [Problem(file, where, f"ambiguous: SimpleTuner's parser cannot tell {', '.join(matches[:4])} apart")]
        return [Problem(file, where, "unknown key" + did_you_mean(name, known))]
    problems = []
    if name not in known and name not in load_catalogue()["legacy_keys"]:
        problems.append(
            Problem(
                file,
                where,
                f"SimpleTuner's parser reads this abbreviation as {item.option!r}: write the full name",
                "warning",
            )
        )
    message = _value_problem(item.option, item.texts, known[item.option])
    if message:
        problems.append(Problem(file, where, message))
    return problems


def _value_problem(name: str, texts: tuple[str | None, ...], entry: dict) -> str | None:
    """Why SimpleTuner's argument parser would refuse what config.json passes for `name`, or None."""
    kind, choices = entry["kind"], entry["choices"]
    meaning = f" ({_first_sentence(entry['help'])})" if entry["help"] else ""
    expected = {
        "integer": "an integer",
        "number": "a number",
        "boolean": "true or false",
        "report_to": "a tracker name",
    }.get(kind, "a string")
    for text in texts:
        shown = "true" if text is None else repr(text)
        ok, value = parse_text(entry, text)
        if not ok:
            return f"expected {expected}, got {shown}" + (meaning if kind in ("integer", "number", "string") else "")
        if kind == "report_to":
            bad = [token for token in value if token not in choices]
            if bad:
                return f"{bad[0]!r} is not a tracker; choose from {choices}" + did_you_mean(bad[0], choices)
            if "none" in value and len(value) > 1:
                return "'none' cannot be combined with other trackers"
            continue
        live = _live_choices(name) or choices
        if live and kind not in ("boolean", "boolean_or_string") and _normalise_choice(name, value) not in live:
            if kind != "string":  # a near-miss between numbers means nothing: say what the key is for instead
                return f"{value!r} is not one of {live}{meaning}" + _value_of_sibling_key(name, value)
            return f"{value!r} is not one of {live}" + did_you_mean(str(value), live)
    return None


# Keys whose values users put under each other (the SDXL LCM quickstart writes aspect_bucket_rounding: 64).
SIBLING_KEYS = {"aspect_bucket_rounding": "aspect_bucket_alignment"}


def _value_of_sibling_key(name: str, value: Any) -> str:
    sibling = SIBLING_KEYS.get(name)
    if sibling is None or str(value) not in [str(c) for c in load_catalogue()["keys"][sibling]["choices"] or ()]:
        return ""
    return f"; {value!r} is a valid {sibling} (did you mean \"{sibling}\": {value}?)"


def _live_choices(name: str) -> list | None:
    """Inside a training process SimpleTuner's optimizer table is loaded: it lists the optimizers of the
    optional packages installed there (bitsandbytes, torchao, ...), which the catalogue may lack."""
    table = sys.modules.get("simpletuner.helpers.training.optimizer_param")
    if name != "optimizer" or table is None:
        return None
    return sorted(getattr(table, "optimizer_choices", {})) or None


def _first_sentence(text: str, limit: int = 100) -> str:
    sentence = text.split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[: limit - 3].rstrip() + "..."


def _normalise_choice(name: str, value: Any) -> Any:
    # parse_cmdline_args lower-cases model_family and maps the lr_scheduler alias before argparse sees them.
    if name == "model_family" and isinstance(value, str):
        return value.strip().lower()
    if name == "lr_scheduler" and isinstance(value, str) and value.strip().lower() == "cosine_with_warmup":
        return "cosine"
    return value


# TrainingConfig ranges whose violation crashes SimpleTuner (PEFT refuses rank 0, the bucket sampler a batch of
# 0); the other ranges flag likely mistakes SimpleTuner runs with, so they are warnings.
CRASHING_RANGES = {"lora_rank", "train_batch_size", "gradient_accumulation_steps"}


def _typed_problems(settings: dict, landed: dict[str, str], file: str, flagged: set[str]) -> list[Problem]:
    """Ranges of the LCM-governing keys (TrainingConfig), on the values SimpleTuner parsed, at the keys' pointers."""
    typed = {
        name: settings[name] for name in landed if name in TrainingConfig.model_fields and settings[name] is not None
    }
    problems = []
    try:
        TrainingConfig.model_validate(typed)
    except ValidationError as error:
        for issue in error.errors():
            if issue["type"] == "missing":
                continue  # required keys are reported from SimpleTuner's catalogue
            name = str(issue["loc"][0])
            where = pointer(landed.get(name, name), *issue["loc"][1:])
            if where in flagged or pointer(landed.get(name, name)) in flagged:
                continue
            severity = "error" if name in CRASHING_RANGES else "warning"
            problems.append(Problem(file, where, _pydantic_message(issue), severity))
    return problems


# validation_guidance_skip_layers: the model families parse_cmdline_args allows it for (4.10.1).
SKIP_LAYER_GUIDANCE_FAMILIES = ("sd3", "wan", "wan_s2v", "zlab_i1", "moss_image")


def _relation_problems(
    settings: dict, landed: dict[str, str], file: str, flagged: set[str], config_dir: Path
) -> list[Problem]:
    """Rules across keys that SimpleTuner's parse_cmdline_args enforces after parsing (4.10.1)."""
    value = settings.get

    def at(*names: str) -> str:
        return next((pointer(landed[name]) for name in names if name in landed), "")

    problems = []
    if (value("max_train_steps") or 0) > 0 and (value("num_train_epochs") or 0) > 0:
        problems.append(
            Problem(
                file,
                at("num_train_epochs", "max_train_steps"),
                "max_train_steps is set, so "
                'num_train_epochs must be 0 (SimpleTuner\'s default is 1): add "num_train_epochs": 0',
            )
        )
    maximum, target, resolution_type = (
        value("maximum_image_size"),
        value("target_downsample_size"),
        value("resolution_type"),
    )
    if maximum is not None and not target:
        problems.append(Problem(file, at("maximum_image_size"), "maximum_image_size requires target_downsample_size"))
    override = os.environ.get("SIMPLETUNER_MAXIMUM_IMAGE_SIZE_OVERRIDE")
    for name, size in (("maximum_image_size", maximum), ("target_downsample_size", target)):
        if size is None or at(name) in flagged:
            continue
        if resolution_type == "area" and size > 5 and not override:
            problems.append(
                Problem(
                    file,
                    at(name),
                    f"{size} megapixels with resolution_type 'area': must be <= 5 (pixels entered by mistake?)",
                )
            )
        elif resolution_type == "pixel" and size < 512:
            problems.append(
                Problem(
                    file,
                    at(name),
                    f"{size} pixels with resolution_type 'pixel': must be >= 512 (megapixels entered by mistake?)",
                )
            )
    if (value("metadata_update_interval") or 60) < 60:
        problems.append(Problem(file, at("metadata_update_interval"), "must be at least 60 (seconds)"))
    if (value("gradient_accumulation_steps") or 1) < 1:
        problems.append(Problem(file, at("gradient_accumulation_steps"), "must be at least 1"))
    for name in ("validate_after_step", "validate_after_epoch"):
        if (value(name) or 0) < 0:
            problems.append(Problem(file, at(name), "must be >= 0"))
    if value("validation_num_video_frames") is not None and value("validation_num_video_frames") < 1:
        problems.append(Problem(file, at("validation_num_video_frames"), "must be at least 1"))
    if (value("optimizer_beta1") is None) != (value("optimizer_beta2") is None):
        problems.append(
            Problem(
                file,
                at("optimizer_beta1", "optimizer_beta2"),
                "set both optimizer_beta1 and optimizer_beta2, or neither",
            )
        )
    portion = value("timestep_bias_portion")
    if portion is not None and not 0.0 <= portion <= 1.0:
        problems.append(Problem(file, at("timestep_bias_portion"), "must be between 0 and 1"))
    if value("quantization_config") is not None and value("model_type") != "lora":
        problems.append(Problem(file, at("quantization_config"), "quantization_config needs model_type 'lora'"))
    skip_layers = value("validation_guidance_skip_layers")
    if skip_layers is not None and at("validation_guidance_skip_layers") not in flagged:
        if value("model_family") not in SKIP_LAYER_GUIDANCE_FAMILIES:
            problems.append(
                Problem(
                    file,
                    at("validation_guidance_skip_layers"),
                    f"skip-layer guidance is only supported for {', '.join(SKIP_LAYER_GUIDANCE_FAMILIES)} "
                    f"(model_family is {value('model_family')!r})",
                )
            )
        elif not _is_json(skip_layers):
            problems.append(
                Problem(
                    file,
                    at("validation_guidance_skip_layers"),
                    f"SimpleTuner reads {skip_layers!r} as JSON and cannot (a list becomes its last item: "
                    'write it as a string, e.g. "[7, 8, 9]")',
                )
            )
    for name in ("webhook_config", "publishing_config"):
        text = str(value(name) or "").strip()
        if not text or text == "None" or text.startswith(("{", "[")) or at(name) in flagged:
            continue  # JSON forms are parsed by SimpleTuner; a dict in config.json arrives JSON-encoded
        path = Path(text).expanduser()
        found = path if path.is_absolute() else training_folder(config_dir) / path
        if not found.is_file():
            problems.append(
                Problem(
                    file,
                    at(name),
                    f"no such file: {found} (SimpleTuner opens {text!r} from where training starts, "
                    f"{training_folder(config_dir)})",
                )
            )
    if str(value("lora_type") or "").lower() == "lycoris":
        lycoris = Path(str(value("lycoris_config") or "")).expanduser()
        places = [lycoris] if lycoris.is_absolute() else [config_dir / lycoris, config_dir.parent / lycoris]
        if not value("lycoris_config") or not any(place.is_file() for place in places):
            problems.append(
                Problem(
                    file,
                    at("lycoris_config", "lora_type"),
                    f"lora_type 'lycoris' needs a lycoris_config "
                    f"JSON file; {str(lycoris)!r} not found (looked in {config_dir} and its parent)",
                )
            )
    return [problem for problem in problems if problem.pointer not in flagged]


def _is_json(text: Any) -> bool:
    try:
        json.loads(str(text))
    except ValueError:
        return False
    return True


def _pydantic_message(issue: dict) -> str:
    message = issue["msg"].removeprefix("Value error, ")
    if issue["type"] == "extra_forbidden":
        return "unknown key"
    return f"{message} (got {issue['input']!r})" if not isinstance(issue["input"], (dict, list)) else message


def parse_distillation_config(raw: Any, config_dir: Path | None) -> dict | str:
    """distillation_config as SimpleTuner reads it: a dict, a JSON/Python literal, or a JSON file path.

    Returns the dict, or a message saying why it cannot be read.
    """
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        return f"expected an object or a string, got {raw!r}"
    text = raw.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError) as error:
                return f"could not parse the string as JSON or a Python literal: {error}"
        return parsed if isinstance(parsed, dict) else f"expected an object, got {parsed!r}"
    path = Path(text).expanduser()
    if not path.is_absolute() and config_dir is not None:
        path = config_dir / path
    if not path.is_file():
        return f"not a JSON object and no such file: {text!r}"
    try:
        parsed = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        return f"could not read {path}: {error}"
    return parsed if isinstance(parsed, dict) else f"{path} holds {type(parsed).__name__}, expected an object"


def lcm_block_of(distillation_config: dict) -> tuple[Any, tuple[str, ...]]:
    """The lcm block and its path inside distillation_config: `["lcm"]` if present, else the whole object."""
    if "lcm" in distillation_config:
        return distillation_config["lcm"], ("lcm",)
    return distillation_config, ()


def sharded_by(settings: dict, folder: Path) -> tuple[str, str] | None:
    """(the key, in words) of the parameter sharding a run asks for in config.json: FSDP (`fsdp_enable`) or DeepSpeed
    ZeRO stage 3 (`deepspeed_config`: an object, its JSON or Python-literal text, or a JSON file's path from where
    training starts, read as SimpleTuner's Trainer reads it). None otherwise, or when it cannot be read (SimpleTuner
    then reports it)."""
    if str(settings.get("fsdp_enable")).lower() in ("true", "1"):
        return "fsdp_enable", "FSDP (fsdp_enable)"
    raw = settings.get("deepspeed_config")
    if isinstance(raw, str) and raw.strip() and raw.strip() != "None":
        text = raw.strip()
        try:
            if text.startswith(("{", "[")):
                try:
                    raw = json.loads(text)
                except json.JSONDecodeError:
                    raw = ast.literal_eval(text)
            else:
                path = folder / os.path.expanduser(text)
                raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (ValueError, SyntaxError, OSError):
            return None
    if not isinstance(raw, dict):
        return None
    zero = raw.get("zero_optimization")
    for stage in (raw.get("zero_stage"), zero.get("stage") if isinstance(zero, dict) else None):
        if stage is None:
            continue
        try:
            stage = int(stage)
        except (TypeError, ValueError):
            continue
        return ("deepspeed_config", "DeepSpeed ZeRO stage 3 (deepspeed_config)") if stage == 3 else None
    return None


def _lcm_block_problems(
    settings: dict, landed: dict[str, str], file: str, config_dir: Path | None, config: dict
) -> list[Problem]:
    if str(settings.get("distillation_method") or "").lower() != "lcm":
        return []
    problems = []
    if settings.get("model_type") not in SUPPORTED_MODEL_TYPES:
        problems.append(
            Problem(
                file,
                pointer(landed["model_type"]) if "model_type" in landed else "",
                f"distillation_method 'lcm' trains model_type {' or '.join(map(repr, SUPPORTED_MODEL_TYPES))}, "
                f"not {settings.get('model_type')!r}",
            )
        )
    sharding = sharded_by(settings, training_folder(config_dir) if config_dir else Path("."))
    if settings.get("model_type") == "full" and sharding is not None:
        name, why = sharding
        problems.append(
            Problem(
                file,
                pointer(landed[name]) if name in landed else "",
                f"model_type 'full' cannot distil under {why}: the LCM teacher and target copies of the UNet are "
                "made before accelerate shards the model, so they would stay whole (and ZeRO-3's partitioned "
                "weights cannot be averaged into the target); use model_type 'lora', or train without it",
            )
        )
    key = landed.get("distillation_config", "distillation_config")
    raw = config.get(key)
    if raw is None:
        where = pointer(key) if key in config else ""
        message = "distillation_config is not set: the LCM distiller uses LcmConfig's defaults"
        return problems + [Problem(file, where, message, severity="warning")]
    # A file path opens from where training starts, after SimpleTuner's config/examples and {env:...} handling.
    parsed = parse_distillation_config(preprocess_value(raw), training_folder(config_dir) if config_dir else None)
    if isinstance(parsed, str):
        return problems + [Problem(file, pointer(key), parsed)]
    block, inner = lcm_block_of(parsed)
    # A string form has no JSON pointer inside it: point at the key itself.
    base = (key, *inner) if isinstance(raw, dict) else (key,)
    if not isinstance(block, dict):
        return problems + [Problem(file, pointer(*base), f"expected an object of LCM settings, got {block!r}")]
    try:
        lcm = LcmConfig.model_validate(block)
    except ValidationError as error:
        for issue in error.errors():
            where = pointer(*base, *issue["loc"]) if isinstance(raw, dict) else pointer(*base)
            name = ".".join(map(str, issue["loc"]))
            if issue["type"] == "extra_forbidden":
                key = str(issue["loc"][-1])
                message = f"unknown LCM setting {name!r}" + did_you_mean(key, settings_at(issue["loc"]))
            else:
                message = (f"{name}: " if not isinstance(raw, dict) else "") + _pydantic_message(issue)
            problems.append(Problem(file, where, message))
        return problems
    variant_at = pointer(*base, "variant") if isinstance(raw, dict) else pointer(*base)
    return problems + _flow_family_problems(settings, landed, file, lcm, variant_at)


def _flow_family_problems(settings: dict, landed: dict[str, str], file: str, lcm: LcmConfig,
                          variant_at: str) -> list[Problem]:
    """The trainer's refusal of a flow-matching run it cannot distil, before the model loads (config.families).
    `variant_at`: the pointer of the lcm block's variant."""
    family = settings.get("model_family")
    if not is_flow_family(family):
        return []
    reason = flow_refusal_reason(lcm, settings.get)
    if reason is None:
        return []
    setting, why = reason
    where = variant_at if setting == "variant" else pointer(landed[setting]) if setting in landed else ""
    return [Problem(file, where, refusal_line(why))]
