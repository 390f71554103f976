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

from lcm_plugin.config.catalogue import load_catalogue
from lcm_plugin.config.lcm import LcmConfig
from lcm_plugin.config.problems import Problem, did_you_mean, pointer

SCHEMA_KEY = "$schema"
_BOOL_STRINGS = {"1", "true", "yes", "y", "on", "0", "false", "no", "n", "off"}


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
    """SimpleTuner's key without the optional `--` prefix."""
    return key[2:] if key.startswith("--") else key


def effective_settings(config: dict) -> dict[str, Any]:
    """What a run uses: config.json's values by canonical key (nulls skipped), else SimpleTuner's defaults."""
    defaults = {name: entry["default"] for name, entry in load_catalogue()["keys"].items()}
    return defaults | {canonical_key(key): value for key, value in config.items() if value is not None}


def check_training_config(config: Any, file: str, config_dir: Path | None = None) -> list[Problem]:
    """Every problem of a parsed config.json. `config_dir` resolves a distillation_config file path."""
    if not isinstance(config, dict):
        return [Problem(file, "", f"expected a JSON object of SimpleTuner options, got {type(config).__name__}")]
    catalogue = load_catalogue()
    known = catalogue["keys"]
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for key, value in config.items():
        name = canonical_key(key)
        if name in seen:
            problems.append(Problem(file, pointer(key), f"duplicates {seen[name]!r} (with and without '--')"))
            continue
        seen[name] = key
        if key == SCHEMA_KEY:
            continue
        if name in catalogue["legacy_keys"]:
            problems.append(
                Problem(file, pointer(key), "legacy key: SimpleTuner translates or ignores it", severity="warning")
            )
            continue
        if name not in known:
            problems.append(Problem(file, pointer(key), "unknown key" + did_you_mean(name, known)))
            continue
        message = _value_problem(name, value, known[name])
        if message:
            problems.append(Problem(file, pointer(key), message))
    for name, entry in known.items():
        if entry["required"] and name not in seen and name != "data_backend_config":
            problems.append(Problem(file, "", f"missing required key {name!r} ({entry['help']})"))
    flagged = {problem.pointer for problem in problems}
    problems += _typed_problems(config, seen, file, flagged)
    problems += _relation_problems(config, seen, file, flagged, config_dir or Path("."))
    problems += _lcm_block_problems(config.get(seen.get("distillation_config", "")), seen, file, config_dir, config)
    return problems


def _value_problem(name: str, value: Any, entry: dict) -> str | None:
    """Why SimpleTuner's argument parser would reject `value` for `name`, or None."""
    kind, choices = entry["kind"], entry["choices"]
    if value is None:
        return None  # SimpleTuner skips null values
    if kind == "json":
        return (
            None if isinstance(value, (dict, list, str)) else f"expected an object, a list or a string, got {value!r}"
        )
    if kind == "report_to":
        items = value if isinstance(value, list) else str(value).split(",")
        bad = [item for item in (str(i).strip() for i in items) if item and item not in choices]
        return f"{bad[0]!r} is not a tracker; choose from {choices}" + did_you_mean(bad[0], choices) if bad else None
    if isinstance(value, (dict, list)):
        return f"expected a single {kind} value, got {type(value).__name__} (SimpleTuner would drop or mangle it)"
    if kind in ("boolean", "boolean_or_string"):
        if isinstance(value, bool) or str(value).strip().lower() in _BOOL_STRINGS or kind == "boolean_or_string":
            return None
        return f"expected true or false, got {value!r}"
    meaning = f" ({_first_sentence(entry['help'])})" if entry["help"] else ""
    expected = {"integer": "an integer", "number": "a number"}.get(kind, "a string")
    if isinstance(value, bool):
        return f"expected {expected}, got {str(value).lower()}{meaning}"
    parsed = _parse_scalar(kind, value)
    if parsed is None:
        return f"expected {expected}, got {value!r}{meaning}"
    choices = _live_choices(name) or choices
    if choices and _normalise_choice(name, parsed) not in choices:
        if kind != "string":  # a near-miss between numbers means nothing: say what the key is for instead
            return f"{value!r} is not one of {choices}{meaning}" + _value_of_sibling_key(name, value)
        return f"{value!r} is not one of {choices}" + did_you_mean(str(value), choices)
    return None


# Keys whose values users put under each other (the SDXL LCM quickstart writes aspect_bucket_rounding: 64).
SIBLING_KEYS = {"aspect_bucket_rounding": "aspect_bucket_alignment"}


def _value_of_sibling_key(name: str, value: Any) -> str:
    sibling = SIBLING_KEYS.get(name)
    if sibling is None or str(value) not in (load_catalogue()["keys"][sibling]["choices"] or ()):
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


def _parse_scalar(kind: str, value: Any) -> Any:
    """The value as SimpleTuner's argparse type sees `str(value)`, or None when it would raise."""
    text = str(value).strip()
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return float(text)
    except ValueError:
        return None
    return text


def _normalise_choice(name: str, value: Any) -> Any:
    # SimpleTuner lower-cases model_family and maps the lr_scheduler alias before argparse sees them.
    if name == "model_family":
        return str(value).lower()
    if name == "lr_scheduler" and str(value).strip().lower() == "cosine_with_warmup":
        return "cosine"
    return value


def _typed_problems(config: dict, seen: dict[str, str], file: str, flagged: set[str]) -> list[Problem]:
    """Ranges of the LCM-governing keys (TrainingConfig), at the keys' own pointers."""
    typed = {
        name: config[key] for name, key in seen.items() if name in TrainingConfig.model_fields or key == SCHEMA_KEY
    }
    typed = {name: value for name, value in typed.items() if value is not None}
    problems = []
    try:
        TrainingConfig.model_validate(typed)
    except ValidationError as error:
        for issue in error.errors():
            if issue["type"] == "missing":
                continue  # required keys are reported from SimpleTuner's catalogue
            key = seen.get(str(issue["loc"][0]), str(issue["loc"][0]))
            where = pointer(key, *issue["loc"][1:])
            if where not in flagged and pointer(key) not in flagged:
                problems.append(Problem(file, where, _pydantic_message(issue)))
    return problems


def _relation_problems(
    config: dict, seen: dict[str, str], file: str, flagged: set[str], config_dir: Path
) -> list[Problem]:
    """Rules across keys that SimpleTuner's parse_cmdline_args enforces after parsing (4.10)."""
    defaults = load_catalogue()["keys"]

    def value(name: str) -> Any:
        raw = config.get(seen[name]) if name in seen else None
        raw = defaults[name]["default"] if raw is None else raw
        kind = defaults[name]["kind"]
        return _parse_scalar(kind, raw) if kind in ("integer", "number") and raw is not None else raw

    def at(*names: str) -> str:
        return next((pointer(seen[name]) for name in names if name in seen), "")

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
    for name, size in (("maximum_image_size", maximum), ("target_downsample_size", target)):
        if size is None or at(name) in flagged:
            continue
        if resolution_type == "area" and size > 5 and not os.environ.get("SIMPLETUNER_MAXIMUM_IMAGE_SIZE_OVERRIDE"):
            problems.append(
                Problem(
                    file,
                    at(name),
                    f"{size} megapixels with resolution_type 'area': must be <= 5 " "(pixels entered by mistake?)",
                )
            )
        elif resolution_type == "pixel" and size < 512:
            problems.append(
                Problem(
                    file,
                    at(name),
                    f"{size} pixels with resolution_type 'pixel': must be >= 512 " "(megapixels entered by mistake?)",
                )
            )
    if (value("metadata_update_interval") or 60) < 60:
        problems.append(Problem(file, at("metadata_update_interval"), "must be at least 60 (seconds)"))
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


def _lcm_block_problems(raw: Any, seen: dict, file: str, config_dir: Path | None, config: dict) -> list[Problem]:
    method = config.get(seen.get("distillation_method", ""))
    if str(method or "").lower() != "lcm":
        return []
    key = seen.get("distillation_config", "distillation_config")
    if raw is None:
        where = pointer(key) if key in config else ""
        message = "distillation_config is not set: the LCM distiller uses LcmConfig's defaults"
        return [Problem(file, where, message, severity="warning")]
    parsed = parse_distillation_config(raw, config_dir)
    if isinstance(parsed, str):
        return [Problem(file, pointer(key), parsed)]
    block, inner = lcm_block_of(parsed)
    # A string form has no JSON pointer inside it: point at the key itself.
    base = (key, *inner) if isinstance(raw, dict) else (key,)
    if not isinstance(block, dict):
        return [Problem(file, pointer(*base), f"expected an object of LCM settings, got {block!r}")]
    problems = []
    try:
        LcmConfig.model_validate(block)
    except ValidationError as error:
        for issue in error.errors():
            where = pointer(*base, *issue["loc"]) if isinstance(raw, dict) else pointer(*base)
            name = str(issue["loc"][0]) if issue["loc"] else ""
            if issue["type"] == "extra_forbidden":
                message = f"unknown LCM setting {name!r}" + did_you_mean(name, LcmConfig.model_fields)
            else:
                message = (f"{name}: " if not isinstance(raw, dict) else "") + _pydantic_message(issue)
            problems.append(Problem(file, where, message))
    return problems
