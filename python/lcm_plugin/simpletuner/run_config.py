"""The run's LCM settings as the patches read them: the `distillation_config` forms SimpleTuner accepts, the "lcm"
block, and which config.json the training process read."""

from __future__ import annotations

import os

from pydantic import ValidationError

from lcm_plugin.config import LcmConfig
from lcm_plugin.config import training as config_training
from lcm_plugin.config.lcm import settings_at

METHOD = "lcm"


def parse_distillation_config(raw) -> dict:
    """`distillation_config` as a dict, read exactly as `simpletuner-lcm validate` reads it (a dict, a JSON or
    Python-literal string, or a JSON file path relative to where training starts); None or "" is {}."""
    if raw is None or raw == "":
        return {}
    parsed = config_training.parse_distillation_config(raw, None)
    if isinstance(parsed, str):
        raise ValueError(f"distillation_config: expected a JSON object; {parsed}")
    return parsed


def lcm_block(distillation_config) -> dict:
    """The "lcm" block, as SimpleTuner selects it: `distillation_config["lcm"]`, or the whole config if absent."""
    block, _ = config_training.lcm_block_of(parse_distillation_config(distillation_config))
    if not isinstance(block, dict):
        raise ValueError(f"distillation_config.{METHOD}: expected a JSON object, got {block!r}")
    return block


def lcm_config_from_block(block: dict) -> LcmConfig:
    """LcmConfig from the user's block; errors name `distillation_config.lcm.<key>` and the valid range."""
    try:
        return LcmConfig.model_validate(block)
    except ValidationError as error:
        lines = [
            f"  distillation_config.{METHOD}"
            + "".join(f".{part}" for part in problem["loc"])
            + f": {problem['msg']}"
            + _hint(problem)
            for problem in error.errors()
        ]
        raise ValueError("invalid LCM settings in config.json:\n" + "\n".join(lines)) from None


def _hint(problem: dict) -> str:
    if problem["type"] == "extra_forbidden":
        return f" (valid keys: {', '.join(settings_at(problem['loc']))})"
    if problem["loc"] and problem["type"] != "missing":
        return f" (got {problem['input']!r})"
    return ""



def is_lcm_run(config) -> bool:
    method = getattr(config, "distillation_method", None)
    return str(getattr(method, "value", method) or "").lower() == METHOD


def run_lcm_config(config) -> LcmConfig:
    return lcm_config_from_block(lcm_block(getattr(config, "distillation_config", None)))



def running_config_path():
    """The config.json this training process read (found as SimpleTuner finds it), or None (env/toml configs)."""
    from simpletuner.helpers.configuration import json_file

    env = os.environ.get("SIMPLETUNER_ENVIRONMENT", os.environ.get("SIMPLETUNER_ENV", os.environ.get("ENV")))
    return next((path for path in json_file._candidate_json_paths(env) if path.is_file()), None)
