"""The catalogue of config.json keys SimpleTuner accepts, generated from SimpleTuner's own argument parser.

`build_catalogue()` imports SimpleTuner (torch and all) and runs only when schemas are built
(`simpletuner-lcm schema --write`). Validation reads the committed JSON (`load_catalogue()`), so it
needs neither torch nor SimpleTuner, and the catalogue follows the SimpleTuner version it was built from.

Entry shape, per key (no `--`): kind (boolean | integer | number | string | json | report_to |
boolean_or_string), choices (list or null), default, required, help, section, bare_flag (a bare `--key`,
which config.json's `true` becomes, is accepted), and `alias_of` for alternative option strings.
Top level: `legacy_keys` (translated or ignored by the JSON-to-argv mapping), `dataset_fields` (registry
fields without an option: the mapping drops them) and `allow_empty` (options that receive "" instead of
being dropped).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

CATALOGUE_FILE = "simpletuner_keys.json"

# SimpleTuner JSON-serialises dicts and lists for these keys before parsing (cli_utils.mapping_to_cli_args).
JSON_KEYS = {
    "webhook_config",
    "deepspeed_config",
    "distillation_config",
    "publishing_config",
    "peft_lora_target_modules",
}


@functools.cache
def load_catalogue() -> dict[str, Any]:
    """The committed catalogue: {"simpletuner_version", "keys": {name: entry}, "legacy_keys": [...]}."""
    text = resources.files("lcm_plugin.config").joinpath(CATALOGUE_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def build_catalogue() -> dict[str, Any]:
    """Read SimpleTuner's parser and field registry (imports SimpleTuner: schema-build time only)."""
    import simpletuner
    from simpletuner.helpers.configuration import cli_utils
    from simpletuner.helpers.configuration.cmd_args import get_argument_parser
    from simpletuner.helpers.training.optimizer_param import optimizer_choices
    from simpletuner.helpers.training.reporting import REPORT_TO_CHOICES
    from simpletuner.simpletuner_sdk.server.services.field_registry.registry import field_registry
    from simpletuner.simpletuner_sdk.server.services.field_registry.types import FieldType

    keys: dict[str, Any] = {}
    for action in get_argument_parser()._actions:
        names = [option[2:] for option in action.option_strings if option.startswith("--") and option != "--help"]
        if not names:
            continue
        field = field_registry.get_field(action.dest)
        kind = _kind(action, field, FieldType)
        # The parser leaves these open; SimpleTuner checks them later against these tables.
        choices = {"report_to": REPORT_TO_CHOICES, "optimizer": optimizer_choices}.get(action.dest, action.choices)
        entry = {
            "kind": kind,
            "choices": _json_safe(list(choices)) if choices else None,
            "default": _json_safe(action.default),
            "required": bool(action.required),
            "help": " ".join((action.help or "").split()),
            "section": getattr(field, "section", None),
            "bare_flag": action.nargs == "?",
        }
        keys[names[0]] = entry
        for alias in names[1:]:
            keys[alias] = {**entry, "alias_of": names[0]}
    legacy = sorted(name for name in cli_utils._LEGACY_ARG_HANDLERS if name not in keys)
    fields = list(field_registry._fields.values())
    return {
        "simpletuner_version": simpletuner.__version__,
        "keys": dict(sorted(keys.items())),
        "legacy_keys": legacy,
        "dataset_fields": sorted(field.name for field in fields if getattr(field, "arg_name", "") is None),
        "allow_empty": sorted(field.name for field in fields if getattr(field, "allow_empty", False)),
    }


def _kind(action, field, field_type_enum) -> str:
    name = getattr(action.type, "__name__", "")
    if name == "_parse_report_to_arg":
        return "report_to"
    if name == "_parse_validation_prompt_library_flag":
        return "boolean_or_string"
    if name == "_parse_bool_flag":
        return "boolean"
    if action.dest in JSON_KEYS or getattr(field, "field_type", None) == field_type_enum.TEXT_JSON:
        return "json"
    return {"int": "integer", "float": "number"}.get(name, "string")


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return str(value)
