"""config.json checks: SimpleTuner's catalogue (keys, types, choices, required), typed ranges, relations."""

import pytest

from lcm_plugin.config.catalogue import load_catalogue
from lcm_plugin.config.training import check_training_config

BASE = {
    "model_family": "sdxl",
    "model_type": "lora",
    "output_dir": "out",
    "optimizer": "adamw_bf16",
    "data_backend_config": "config/multidatabackend.json",
}


def _errors(change, config_dir=None):
    config = {**BASE, **change}
    return [p for p in check_training_config(config, "config.json", config_dir) if p.severity == "error"]


def test_minimal_config_has_no_errors():
    assert _errors({}) == []


def test_catalogue_records_simpletuner_version_and_its_keys():
    catalogue = load_catalogue()
    from importlib.metadata import version

    assert catalogue["simpletuner_version"] == version("simpletuner")
    assert catalogue["keys"]["distillation_method"]["choices"][:1] == ["lcm"]
    assert catalogue["keys"]["validation_steps"]["alias_of"] == "validation_step_interval"


@pytest.mark.parametrize(
    ("change", "pointer", "fragment"),
    [
        ({"--lora_rnk": 8}, "/--lora_rnk", "did you mean 'lora_rank'?"),
        ({"lora": 8}, "/lora", "ambiguous: SimpleTuner's parser cannot tell"),
        ({"resolution": "true"}, "/resolution", "expected an integer, got true"),
        ({"lora_rank": [4, "x"]}, "/lora_rank", "expected an integer, got 'x'"),
        ({"skip_file_discovery": True}, "/skip_file_discovery", "expected a string, got true"),
        ({"report_to": "wandb,none"}, "/report_to", "'none' cannot be combined"),
        ({"gradient_accumulation_steps": 0}, "/gradient_accumulation_steps", "greater than or equal to 1"),
        ({"validation_guidance_skip_layers": "[7, 8]"}, "/validation_guidance_skip_layers", "only supported for"),
        (
            {"model_family": "sd3", "validation_guidance_skip_layers": [7, "8, 9"]},
            "/validation_guidance_skip_layers",
            "write it as a string",
        ),
        ({"resolution": 1024.5}, "/resolution", "expected an integer"),
        ({"resolution": True}, "/resolution", "expected an integer, got true"),
        ({"learning_rate": "fast"}, "/learning_rate", "expected a number"),
        ({"gradient_checkpointing": "maybe"}, "/gradient_checkpointing", "expected true or false"),
        ({"model_family": "sdxxl"}, "/model_family", "did you mean 'sdxl'?"),
        ({"mixed_precision": "fp32"}, "/mixed_precision", "is not one of"),
        ({"report_to": "wandbb"}, "/report_to", "did you mean 'wandb'?"),
        ({"report_to": ["wandb", "nope"]}, "/report_to", "'nope' is not a tracker"),
        ({"lora_rank": 0}, "/lora_rank", "greater than or equal to 1"),
        ({"max_train_steps": 100}, "/max_train_steps", "num_train_epochs must be 0"),
        ({"num_train_epochs": 2, "max_train_steps": 100}, "/num_train_epochs", "num_train_epochs must be 0"),
        ({"maximum_image_size": 2048}, "/maximum_image_size", "requires target_downsample_size"),
        (
            {"resolution_type": "pixel", "maximum_image_size": 300, "target_downsample_size": 1024},
            "/maximum_image_size",
            ">= 512",
        ),
        (
            {"resolution_type": "area", "maximum_image_size": 2, "target_downsample_size": 1024},
            "/target_downsample_size",
            "<= 5",
        ),
        ({"metadata_update_interval": 10}, "/metadata_update_interval", "at least 60"),
        ({"optimizer_beta1": 0.9}, "/optimizer_beta1", "set both"),
        ({"timestep_bias_portion": 2}, "/timestep_bias_portion", "between 0 and 1"),
        ({"lora_type": "lycoris", "lycoris_config": "missing.json"}, "/lycoris_config", "not found"),
    ],
)
def test_each_rule_fails_with_its_pointer(change, pointer, fragment):
    problems = _errors(change)
    assert [p.pointer for p in problems] == [pointer], problems
    assert fragment in problems[0].message


def test_missing_required_keys_are_named():
    config = {key: value for key, value in BASE.items() if key != "model_type"}
    (problem,) = [p for p in check_training_config(config, "c.json") if p.severity == "error"]
    assert problem.pointer == "" and "missing required key 'model_type'" in problem.message


@pytest.mark.parametrize(
    "change",
    [
        {"--learning_rate": 1e-4},
        {"learning_rate": "1e-4"},
        {"resolution": "1024"},
        {"gradient_checkpointing": "true"},
        {"gradient_checkpointing": 1},
        {"validation_guidance": None},
        {"model_family": "SDXL"},
        {"lr_scheduler": "cosine_with_warmup"},
        {"report_to": ["wandb", "tensorboard"]},
        {"validation_steps": 100},
        {"$schema": "../schemas/config.schema.json"},
        # SimpleTuner's JSON-to-argv mapping: false -> --key=false, "false" and "" dropped, lists -> last item.
        {"skip_file_discovery": False},
        {"skip_file_discovery": "false"},
        {"lora_rank": "false"},
        {"lora_rank": ""},
        {"model_family": "sd3", "validation_guidance_skip_layers": [7, 8, 9]},
        {"model_family": "sd3", "validation_guidance_skip_layers": "[7, 8, 9]"},
        {"unknown_but_dropped": None},
        {"disable_multiline_split": True},
        {"distillation_config": {"lcm": {"w_min": 2.0}}, "distillation_method": "lcm"},
    ],
)
def test_forms_simpletuner_accepts_are_accepted(change):
    assert _errors(change) == []


@pytest.mark.parametrize(
    ("change", "pointer", "fragment"),
    [
        ({"learning_rat": 1e-4}, "/learning_rat", "reads this abbreviation as 'learning_rate'"),
        ({"lora_rank": {"a": 1}}, "/lora_rank", "drops an object here"),
        ({"caption_dropout_probability": 1.5}, "/caption_dropout_probability", "less than or equal to 1"),
        ({"validation_num_inference_steps": 0}, "/validation_num_inference_steps", "greater than or equal to 1"),
        ({"learning_rate": 0}, "/learning_rate", "greater than 0"),
        ({"learning_rate": 1e-4, "--learning_rate": 2e-4}, "/--learning_rate", "duplicates 'learning_rate'"),
        ({"learning_rte": "false"}, "/learning_rte", "SimpleTuner drops it because its value is \"false\""),
        ({"disable_multiline_split": True}, "/disable_multiline_split", "a dataset setting"),
    ],
)
def test_what_simpletuner_runs_with_is_a_warning(change, pointer, fragment):
    problems = check_training_config({**BASE, **change}, "config.json")
    assert [(p.pointer, p.severity) for p in problems] == [(pointer, "warning")], problems
    assert fragment in problems[0].message


def test_env_placeholders_and_example_paths_are_resolved_first(monkeypatch):
    monkeypatch.setenv("LCM_TEST_RANK", "16")
    assert _errors({"lora_rank": "{env:LCM_TEST_RANK}"}) == []
    monkeypatch.setenv("LCM_TEST_RANK", "sixteen")
    assert [p.pointer for p in _errors({"lora_rank": "{env:LCM_TEST_RANK}"})] == ["/lora_rank"]
    shipped = {"lora_type": "lycoris", "lycoris_config": "config/examples/lycoris_config.json"}
    assert _errors(shipped) == []


def test_legacy_keys_are_warnings():
    (problem,) = check_training_config({**BASE, "vae_cache_preprocess": True}, "c.json")  # dropped
    assert problem.severity == "warning" and problem.pointer == "/vae_cache_preprocess"
    # false is translated to a bare --vae_cache_ondemand, as save_total_limit is to checkpoints_total_limit
    assert check_training_config({**BASE, "vae_cache_preprocess": False, "save_total_limit": 2}, "c.json") == []


def test_a_list_is_not_a_config():
    (problem,) = check_training_config([], "c.json")
    assert "expected a JSON object" in problem.message


def test_optimizer_table_of_a_running_simpletuner_wins_over_the_catalogue(monkeypatch):
    # In a training process SimpleTuner's table lists optimizers of optional packages installed there.
    import sys
    import types

    table = types.ModuleType("simpletuner.helpers.training.optimizer_param")
    table.optimizer_choices = {"bnb-lion8bit": {}}
    monkeypatch.setitem(sys.modules, table.__name__, table)
    assert _errors({"optimizer": "bnb-lion8bit"}) == []
    assert [p.pointer for p in _errors({})] == ["/optimizer"]
