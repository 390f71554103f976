"""LcmConfig: defaults equal the reference script's, ranges and relations, did-you-mean for unknown keys."""

import pytest
from pydantic import ValidationError

from lcm_plugin.config import LcmConfig
from lcm_plugin.config.training import check_training_config


def test_defaults_match_diffusers_lcm_script_in_simpletuner_guidance_convention():
    # diffusers train_lcm_distill_lora_sdxl.py: num_ddim_timesteps 50, w_min 3, w_max 15 (its w = s - 1),
    # huber_c 0.001, timestep_scaling_factor 10.0, ema_decay 0.95 (full-model script), loss l2.
    config = LcmConfig()
    assert (config.num_ddim_timesteps, config.loss_type, config.huber_c) == (50, "l2", 0.001)
    assert (config.w_min - 1, config.w_max - 1) == (3.0, 15.0)
    assert (config.timestep_scaling_factor, config.ema_decay) == (10.0, 0.95)


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ({"w_min": 9.0, "w_max": 8.0}, "w_max"),
        ({"num_ddim_timesteps": 0}, "num_ddim_timesteps"),
        ({"num_ddim_timesteps": 1001}, "num_ddim_timesteps"),
        ({"huber_c": 0.0}, "huber_c"),
        ({"timestep_scaling_factor": -1.0}, "timestep_scaling_factor"),
        ({"loss_type": "l1"}, "loss_type"),
        ({"w_min": 0.5}, "w_min"),
        ({"ema_decay": 1.0}, "ema_decay"),
    ],
)
def test_out_of_range_values_fail_at_their_field(block, field):
    with pytest.raises(ValidationError) as raised:
        LcmConfig.model_validate(block)
    assert [error["loc"] for error in raised.value.errors()] == [(field,)]


def test_solver_grid_limit_follows_the_schedule_length_given_in_context():
    assert LcmConfig.model_validate({"num_ddim_timesteps": 1000}).num_ddim_timesteps == 1000
    with pytest.raises(ValidationError):
        LcmConfig.model_validate({"num_ddim_timesteps": 600}, context={"num_train_timesteps": 500})


def test_equal_guidance_bounds_fix_the_scale():
    assert LcmConfig(w_min=8.5, w_max=8.5).w_max == 8.5


LCM_RUN = {"model_family": "sdxl", "model_type": "lora", "output_dir": "o", "optimizer": "adamw_bf16",
           "distillation_method": "lcm"}


def _lcm_problems(block):
    config = {**LCM_RUN, "distillation_config": block}
    return [p for p in check_training_config(config, "config.json") if "/distillation_config" in p.pointer]


def test_unknown_lcm_key_is_an_error_with_a_suggestion_at_its_pointer():
    (problem,) = _lcm_problems({"lcm": {"num_ddim_timestep": 50}})
    assert problem.pointer == "/distillation_config/lcm/num_ddim_timestep"
    assert "did you mean 'num_ddim_timesteps'?" in problem.message


def test_relation_error_points_at_w_max():
    (problem,) = _lcm_problems({"lcm": {"w_min": 9.0, "w_max": 8.0}})
    assert problem.pointer == "/distillation_config/lcm/w_max"
    assert "w_min (9.0) must be <= w_max (8.0)" in problem.message


def test_block_without_lcm_wrapper_is_read_as_simpletuner_does():
    (problem,) = _lcm_problems({"loss_type": "l1"})
    assert problem.pointer == "/distillation_config/loss_type"


def test_string_form_is_parsed_and_errors_point_at_the_key():
    assert _lcm_problems('{"lcm": {"w_min": 2.0, "w_max": 6.0}}') == []
    assert _lcm_problems("{'lcm': {'w_min': 2.0}}") == []  # SimpleTuner also takes a Python literal
    (problem,) = _lcm_problems('{"lcm": {"huber_c": -1}}')
    assert problem.pointer == "/distillation_config" and "huber_c" in problem.message
    (problem,) = _lcm_problems("{not json")
    assert problem.pointer == "/distillation_config" and "could not parse" in problem.message


def test_string_form_may_name_a_json_file_next_to_the_config(tmp_path):
    (tmp_path / "lcm.json").write_text('{"lcm": {"w_mn": 1}}')
    config = {**LCM_RUN, "distillation_config": "lcm.json"}
    problems = [p for p in check_training_config(config, "c.json", tmp_path) if "distillation_config" in p.pointer]
    assert len(problems) == 1 and "did you mean 'w_min'?" in problems[0].message


def test_lcm_without_a_block_warns_that_defaults_apply():
    (problem,) = check_training_config(dict(LCM_RUN), "config.json")
    assert (problem.pointer, problem.severity) == ("", "warning") and "LcmConfig's defaults" in problem.message


def test_string_form_file_opens_from_where_training_starts(tmp_path):
    # SimpleTuner opens it from its working directory: the folder above config/.
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "lcm.json").write_text('{"lcm": {"w_mn": 1}}')
    for named, found in (("config/lcm.json", True), ("lcm.json", False)):
        config = {**LCM_RUN, "distillation_config": named}
        problems = [
            p for p in check_training_config(config, "c.json", tmp_path / "config") if "distillation_config" in p.pointer
        ]
        assert len(problems) == 1
        assert ("did you mean 'w_min'?" in problems[0].message) == found, problems
