"""config.json as SimpleTuner's argument parser receives it: SimpleTuner's JSON-to-argv mapping, replayed.

Read from SimpleTuner 4.10.1 (`helpers/configuration/`): `json_file.normalize_args` and `_resolve_example_path`,
`cli_utils.mapping_to_cli_args`, `template_vars.resolve_value_placeholders`, and the start of
`cmd_args.parse_cmdline_args` (its input normalisation and an argparse parser that matches unambiguous
prefixes and keeps the last occurrence of an option). What that mapping does to a value:

- null, the strings "false" (any case) and "" (after strip) are dropped: the key never reaches the parser;
- `true` and the string "true" become a bare `--key`; `false` becomes `--key=false`;
- `{env:NAME}` inside strings is replaced by the environment variable (empty when unset);
- a string starting with `config/examples/` names the file in SimpleTuner's package when it exists there;
- lists become one `--key=item` per non-empty item (the parser keeps the last); report_to joins them;
- objects are JSON-encoded for the JSON options, silently dropped for every other key;
- legacy keys are translated or ignored, and fields that are dataset settings are ignored.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcm_plugin.config.catalogue import JSON_KEYS, load_catalogue

BOOL_TRUE_STRINGS = {"1", "true", "yes", "y", "on"}
BOOL_FALSE_STRINGS = {"0", "false", "no", "n", "off"}
EXAMPLES_PREFIX = "config/examples/"
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
# Keys cli_utils._LEGACY_ARG_HANDLERS forwards to a current option as `--option=<value>` (the value formatted as
# is, never as a flag); the handlers of validation_steps and checkpointing_steps strip a string first. These
# run before the generic mapping: validation_steps and checkpointing_steps are also option aliases, yet `true`
# reaches the parser as `=True`, not as a bare flag. vae_cache_preprocess becomes a bare --vae_cache_ondemand
# when falsey; the other legacy keys are dropped.
STRIPPING_FORWARDS = {"validation_steps": "validation_step_interval", "checkpointing_steps": "checkpoint_step_interval"}
LEGACY_FORWARDS = {"save_total_limit": "checkpoints_total_limit", **STRIPPING_FORWARDS}


@dataclass(frozen=True)
class Passed:
    """One config.json key as the parser receives it."""

    key: str  # as written, for JSON pointers
    option: str  # the option it lands on (alias, prefix and legacy forward resolved), or the key itself
    texts: tuple[str | None, ...]  # each occurrence's text after `=`; None is a bare `--key`; the last wins


@dataclass(frozen=True)
class Dropped:
    """A config.json key SimpleTuner removes before parsing, and why."""

    key: str
    reason: str  # "null" | "false" | "empty" | "object" | "dataset_field" | "legacy"


def training_folder(config_dir: Path) -> Path:
    """The folder training starts in for a config.json in `config_dir`: the parent of the nearest `config/`
    folder (`config/config.json`, `config/<env>/config.json`), else `config_dir` itself. SimpleTuner opens
    relative paths (data_backend_config, webhook_config, data folders) from there."""
    config_dir = config_dir.absolute()
    for ancestor in (config_dir, *config_dir.parents):
        if ancestor.name == "config":
            return ancestor.parent
    return config_dir


def examples_root() -> Path | None:
    """SimpleTuner's packaged examples/ folder, found without importing SimpleTuner (no torch)."""
    spec = importlib.util.find_spec("simpletuner")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) / "examples" if locations else None


def resolve_example_path(value: str) -> str:
    """json_file._resolve_example_path: `config/examples/x` -> the package's examples/x when that exists."""
    if not value.startswith(EXAMPLES_PREFIX):
        return value
    root = examples_root()
    candidate = root / value[len(EXAMPLES_PREFIX) :] if root else None
    return str(candidate) if candidate is not None and candidate.exists() else value


def resolve_placeholders(value: Any) -> Any:
    """template_vars.resolve_value_placeholders without run variables: `{env:NAME}` in strings, recursively."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(
            lambda match: (
                os.environ.get(match[1][4:], "") if match[1].startswith("env:") else match[0]
            ),
            value,
        )
    if isinstance(value, (list, tuple)):
        return [resolve_placeholders(item) for item in value]
    if isinstance(value, dict):
        return {key: resolve_placeholders(item) for key, item in value.items()}
    return value


def preprocess_value(value: Any) -> Any:
    """A value after placeholders and the examples path (what mapping_to_cli_args goes on with)."""
    value = resolve_placeholders(value)
    return resolve_example_path(value) if isinstance(value, str) else value


def map_config(config: dict) -> tuple[list[Passed], list[Dropped]]:
    """What reaches SimpleTuner's parser, in file order, and what is dropped before it."""
    catalogue = load_catalogue()
    keys = catalogue["keys"]
    passed: list[Passed] = []
    dropped: list[Dropped] = []
    for key, raw in config.items():
        name = key.lstrip("-") if isinstance(key, str) else key
        if raw is None:
            dropped.append(Dropped(key, "null"))
            continue
        if name in catalogue.get("dataset_fields", ()):
            dropped.append(Dropped(key, "dataset_field"))
            continue
        value = preprocess_value(raw)
        if name in catalogue["legacy_keys"] or name in LEGACY_FORWARDS:
            forwarded = _legacy_forward(name, value)
            if forwarded is None:
                dropped.append(Dropped(key, "legacy"))
            else:
                passed.append(Passed(key, *forwarded))
            continue
        texts = _texts(name, value, keys.get(name))
        if isinstance(texts, str):
            dropped.append(Dropped(key, texts))
        elif texts:
            passed.append(Passed(key, resolve_option(name) or name, tuple(texts)))
        else:
            dropped.append(Dropped(key, "empty"))
    return passed, dropped


def _legacy_forward(name: str, value: Any) -> tuple[str, tuple[str | None]] | None:
    """(option, texts) a legacy handler of cli_utils passes for key `name`, or None when it drops the key."""
    if name == "vae_cache_preprocess":
        return None if _simpletuner_truthy(value) else ("vae_cache_ondemand", (None,))
    if name not in LEGACY_FORWARDS or value is None or value == "":
        return None
    if name in STRIPPING_FORWARDS and isinstance(value, str):
        value = value.strip()
        if not value:
            return None
    return LEGACY_FORWARDS[name], (f"{value}",)


def _simpletuner_truthy(value: Any) -> bool:
    """cli_utils._is_truthy."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("", "0", "false", "no", "off", "none"):
            return False
        if lowered in ("1", "true", "yes", "on"):
            return True
    return bool(value)


def _texts(name: str, value: Any, entry: dict | None) -> list[str | None] | str:
    """The `=` texts mapping_to_cli_args writes for one key, or why it writes none."""
    if isinstance(value, bool):
        return [None] if value else ["false"]
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered == "false":
            return "false"
        if lowered == "true":
            return [None]
    # JSON_KEYS and TEXT_JSON fields (kind "json") get dicts and lists JSON-encoded.
    is_json = name in JSON_KEYS or (entry is not None and entry["kind"] == "json")
    if is_json and isinstance(value, (Mapping, list)):
        value = json.dumps(value)
    if isinstance(value, Mapping):
        return "object"
    if name == "report_to" and isinstance(value, list):
        joined = ",".join(str(item).strip() for item in value if str(item).strip())
        return [joined] if joined else []
    if isinstance(value, list):
        return [str(item).strip() for item in value if str(item).strip()]
    text = str(value).strip()
    if not text:
        allow_empty = isinstance(value, str) and name in load_catalogue().get("allow_empty", ())
        return [""] if allow_empty else []
    return [text]


@functools.cache
def _option_names() -> tuple[str, ...]:
    return tuple(load_catalogue()["keys"])


def resolve_option(name: str) -> str | None:
    """The option argparse matches for `--name`: exact, else the only option it is a prefix of."""
    keys = load_catalogue()["keys"]
    if name in keys:
        return keys[name].get("alias_of", name)
    matches = prefix_matches(name)
    return matches[0] if len(matches) == 1 else None


def prefix_matches(name: str) -> list[str]:
    """Options (canonical names) `--name` abbreviates; argparse refuses it when there are several."""
    keys = load_catalogue()["keys"]
    found = {keys[option].get("alias_of", option) for option in _option_names() if option.startswith(name)}
    return sorted(found)


def parse_text(entry: dict, text: str | None) -> tuple[bool, Any]:
    """(ok, value) as the option's argparse type reads `text` (None = a bare `--key`)."""
    kind = entry["kind"]
    if kind in ("boolean", "boolean_or_string"):
        if text is None:
            return entry.get("bare_flag", True), True
        lowered = text.strip().lower()
        if lowered in BOOL_TRUE_STRINGS:
            return True, True
        if lowered in BOOL_FALSE_STRINGS:
            return True, False
        if kind == "boolean_or_string":
            return True, text.strip() or False
        return False, text
    if text is None:
        return False, None  # argparse: "expected one argument"
    if kind == "report_to":
        tokens = list(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
        return bool(tokens), tokens
    try:
        if kind == "integer":
            return True, int(text)
        if kind == "number":
            return True, float(text)
    except ValueError:
        return False, text
    return True, text
