"""The generated JSON Schemas are valid draft 2020-12 and judge the seed files as an editor would."""

import json
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "tests" / "fixtures" / "seed"
SCHEMAS = {
    name: json.loads((ROOT / "schemas" / f"{name}.schema.json").read_text())
    for name in ("config", "multidatabackend", "lcm_config")
}


def _validator(name):
    return jsonschema.Draft202012Validator(SCHEMAS[name])


def _error_paths(name, document):
    return sorted(error.json_path for error in _validator(name).iter_errors(document))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_passes_check_schema_and_names_its_draft(name):
    jsonschema.Draft202012Validator.check_schema(SCHEMAS[name])
    assert SCHEMAS[name]["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schemas_record_the_simpletuner_version():
    from importlib.metadata import version

    assert SCHEMAS["config"]["x-simpletuner-version"] == version("simpletuner")
    assert SCHEMAS["multidatabackend"]["x-simpletuner-version"] == version("simpletuner")


def test_seed_multidatabackend_validates():
    assert _error_paths("multidatabackend", json.loads((SEED / "multidatabackend.json").read_text())) == []


def test_seed_config_fails_only_where_simpletuner_parser_fails_and_fixed_seed_validates():
    config = json.loads((SEED / "config.json").read_text())
    # JSON Schema counts 1.0 as an integer, so an editor cannot see maximum_image_size: 1.0 (SimpleTuner's
    # int("1.0") fails); `simpletuner-lcm validate` reports it.
    assert _error_paths("config", config) == ["$.aspect_bucket_rounding", "$.minimum_image_size"]
    config.update(aspect_bucket_rounding=2, minimum_image_size=0, maximum_image_size=1024, target_downsample_size=1024)
    assert _error_paths("config", config) == []


def test_seed_lcm_block_validates_against_the_block_schema():
    block = json.loads((SEED / "config.json").read_text())["distillation_config"]["lcm"]
    assert _error_paths("lcm_config", block) == []


@pytest.mark.parametrize(
    ("name", "document", "path"),
    [
        (
            "config",
            {
                "model_family": "sdxl",
                "model_type": "lora",
                "output_dir": "o",
                "optimizer": "adamw_bf16",
                "learning_rat": 1,
            },
            "$",
        ),
        (
            "config",
            {"--model_family": "sdxxl", "model_type": "lora", "output_dir": "o", "optimizer": "adamw_bf16"},
            "$['--model_family']",
        ),
        (
            "config",
            {
                "model_family": "sdxl",
                "model_type": "lora",
                "output_dir": "o",
                "optimizer": "adamw_bf16",
                "distillation_config": {"lcm": {"w_mn": 1}},
            },
            "$.distillation_config",
        ),
        ("config", {"model_family": "sdxl", "output_dir": "o", "optimizer": "adamw_bf16"}, "$"),
        ("lcm_config", {"loss_type": "l1"}, "$.loss_type"),
        ("multidatabackend", [{"id": "a", "crop_stlye": "center"}], "$[0]"),
        ("multidatabackend", [{"id": "a", "dataset_type": "text_embeds", "crop": True}], "$[0]"),
        ("multidatabackend", [{"id": "a", "type": "aws"}], "$[0]"),
    ],
)
def test_schemas_reject_what_validate_rejects(name, document, path):
    assert path in _error_paths(name, document)


def test_schema_key_and_dashed_keys_are_accepted():
    config = {
        "$schema": "../schemas/config.schema.json",
        "--model_family": "sdxl",
        "model_type": "lora",
        "output_dir": "o",
        "optimizer": "adamw_bf16",
    }
    assert _error_paths("config", config) == []
    assert _error_paths("multidatabackend", [{"$schema": "x", "id": "a", "instance_data_dir": "d"}]) == []


def test_editor_metadata_descriptions_enums_defaults():
    properties = SCHEMAS["config"]["properties"]
    assert "lcm" in properties["distillation_method"]["enum"]
    assert properties["validation_guidance"]["default"] == 7.5
    assert "LCM" in properties["validation_guidance"]["description"]
    lcm = SCHEMAS["lcm_config"]["properties"]
    assert lcm["w_min"]["default"] == 4.0 and lcm["w_min"]["examples"] == [4.0]
