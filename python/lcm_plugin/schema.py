"""JSON Schemas (draft 2020-12) for config.json, multidatabackend.json and the lcm block, built from the models.

`write()` regenerates SimpleTuner's key catalogue (imports SimpleTuner) and the schemas under `schemas/`;
`check()` does the same in memory and lists what differs from the committed files.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from lcm_plugin.config.catalogue import CATALOGUE_FILE, build_catalogue
from lcm_plugin.config.databackend import ENTRY_MODELS, TYPE_REQUIRED
from lcm_plugin.config.lcm import LcmConfig
from lcm_plugin.config.training import SCHEMA_KEY, TrainingConfig

DRAFT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID = "https://simpletuner-lcm.invalid/schemas/"
REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO_ROOT / "schemas"
CATALOGUE_PATH = Path(__file__).resolve().parent / "config" / CATALOGUE_FILE
_KIND_SCHEMA = {
    "boolean": {"type": "boolean"},
    "integer": {"type": "integer"},
    "number": {"type": "number"},
    "string": {"type": "string"},
    "json": {"type": ["object", "array", "string"]},
    "report_to": {"type": ["string", "array"]},
    "boolean_or_string": {"type": ["boolean", "string"]},
}


def lcm_schema() -> dict[str, Any]:
    schema = LcmConfig.model_json_schema()
    schema["description"] = LcmConfig.__doc__
    return _document("lcm_config", "distillation_config.lcm", schema)


def config_schema(catalogue: dict[str, Any]) -> dict[str, Any]:
    """Every SimpleTuner key (plain and `--`-prefixed), typed from the catalogue, refined by TrainingConfig."""
    typed = TrainingConfig.model_json_schema(by_alias=True)
    lcm = LcmConfig.model_json_schema()
    properties: dict[str, Any] = {SCHEMA_KEY: typed["properties"][SCHEMA_KEY]}
    for name, entry in catalogue["keys"].items():
        prop = _catalogue_property(entry)
        if name in typed["properties"]:
            prop = _refined(prop, _without_titles(typed["properties"][name]), entry["help"])
        properties[name] = prop
    properties["distillation_config"] = {
        **properties["distillation_config"],
        "anyOf": [
            {"type": "object", "properties": {"lcm": {"$ref": "#/$defs/LcmConfig"}}},
            {"type": "string"},
            {"type": "null"},
        ],
    }
    for name in list(catalogue["keys"]):
        properties[f"--{name}"] = {"$ref": f"#/properties/{name}"}
    for name in catalogue["legacy_keys"]:
        properties[name] = {"description": "Legacy key: SimpleTuner translates or ignores it.", "deprecated": True}
    required = [
        name for name, entry in catalogue["keys"].items() if entry["required"] and name != "data_backend_config"
    ]
    schema = {
        "type": "object",
        "description": f"SimpleTuner {catalogue['simpletuner_version']} config.json, checked by simpletuner-lcm.",
        "properties": properties,
        "additionalProperties": False,
        "$defs": {"LcmConfig": _without_titles(lcm)},
        # A key may be written with or without '--'; either spelling satisfies a required key.
        "allOf": [{"anyOf": [{"required": [name]}, {"required": [f"--{name}"]}]} for name in required],
    }
    return _document("config", "config.json", schema, catalogue["simpletuner_version"])


def backend_schema(catalogue: dict[str, Any]) -> dict[str, Any]:
    """A list of dataset entries; one schema per dataset_type, with `type`-specific required keys."""
    defs: dict[str, Any] = {}
    variants = []
    for model in dict.fromkeys(ENTRY_MODELS.values()):
        entry_schema = _without_titles(model.model_json_schema(by_alias=True))
        entry_schema["description"] = " ".join((model.__doc__ or "").split())
        entry_schema["allOf"] = [
            {"if": {"properties": {"type": {"const": storage}}, "required": ["type"]}, "then": {"required": list(keys)}}
            for storage, keys in TYPE_REQUIRED.items()
            if all(key in entry_schema["properties"] for key in keys)
        ]
        if model.__name__ == "MediaEntry":
            # dataset_type may be left out (image); the other variants require theirs.
            entry_schema["required"] = ["id"]
        defs[model.__name__] = entry_schema
        variants.append({"$ref": f"#/$defs/{model.__name__}"})
    schema = {
        "type": "array",
        "description": f"SimpleTuner {catalogue['simpletuner_version']} multidatabackend.json: one object per dataset. "
        "Keys of one storage type (aws_*, csv_*, huggingface, webshart, memory_*) are read only with that type.",
        "items": {"oneOf": variants},
        "$defs": defs,
    }
    return _document("multidatabackend", "multidatabackend.json", schema, catalogue["simpletuner_version"])


def _catalogue_property(entry: dict[str, Any]) -> dict[str, Any]:
    prop: dict[str, Any] = {"description": entry["help"] or "(no help text in SimpleTuner)"}
    kind_schema = _KIND_SCHEMA[entry["kind"]]
    # null is accepted everywhere: SimpleTuner skips keys whose value is null.
    types = kind_schema["type"] if isinstance(kind_schema["type"], list) else [kind_schema["type"]]
    if entry["choices"] and entry["kind"] != "report_to":
        prop["enum"] = entry["choices"] + [None]
    else:
        prop["type"] = types + ["null"]
    if entry["default"] is not None:
        prop["default"] = entry["default"]
    return prop


_CONSTRAINTS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "examples")


def _refined(prop: dict[str, Any], typed: dict[str, Any], help_text: str) -> dict[str, Any]:
    """SimpleTuner's type, enum and default, with TrainingConfig's ranges, examples and description on top."""
    refined = dict(prop)
    for branch in [typed, *typed.get("anyOf", [])]:
        refined.update({key: branch[key] for key in _CONSTRAINTS if key in branch})
    refined["description"] = _merge_help(typed.get("description"), help_text)
    return refined


def _merge_help(ours: str | None, theirs: str) -> str:
    if not ours:
        return theirs
    return ours if not theirs or theirs in ours else f"{ours} SimpleTuner: {theirs}"


def _without_titles(schema: Any) -> Any:
    """Pydantic's auto titles ('W Min') add noise to editor hovers; descriptions carry the meaning."""
    if isinstance(schema, dict):
        return {key: _without_titles(value) for key, value in schema.items() if key != "title"}
    if isinstance(schema, list):
        return [_without_titles(item) for item in schema]
    return schema


def _document(name: str, title: str, schema: dict[str, Any], simpletuner_version: str | None = None) -> dict[str, Any]:
    head = {"$schema": DRAFT, "$id": f"{SCHEMA_ID}{name}.schema.json", "title": title}
    stamp = {"x-simpletuner-lcm-schema-version": 1}
    if simpletuner_version:
        stamp["x-simpletuner-version"] = simpletuner_version
    return {**head, **stamp, **_without_titles(copy.deepcopy(schema))}


def render_all(catalogue: dict[str, Any]) -> dict[Path, str]:
    """Every generated file and its text."""
    documents = {
        SCHEMA_DIR / "config.schema.json": config_schema(catalogue),
        SCHEMA_DIR / "multidatabackend.schema.json": backend_schema(catalogue),
        SCHEMA_DIR / "lcm_config.schema.json": lcm_schema(),
        CATALOGUE_PATH: catalogue,
    }
    return {path: json.dumps(document, indent=2, ensure_ascii=False) + "\n" for path, document in documents.items()}


def write() -> list[Path]:
    """Regenerate the catalogue (imports SimpleTuner) and the schemas; returns the files written."""
    files = render_all(build_catalogue())
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return list(files)


def check() -> list[str]:
    """Files that differ from a fresh generation (empty when everything is up to date)."""
    stale = []
    for path, text in render_all(build_catalogue()).items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(str(path.relative_to(REPO_ROOT)))
    return stale
