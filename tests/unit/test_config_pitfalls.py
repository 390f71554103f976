"""LCM pitfalls: warnings (never errors) for settings that spoil an LCM run."""

import pytest

from lcm_plugin.config.pitfalls import lcm_pitfalls

LCM = {
    "model_family": "sdxl",
    "model_type": "lora",
    "distillation_method": "lcm",
    "validation_guidance": 0.0,
    "validation_num_inference_steps": 4,
    "caption_dropout_probability": 0.0,
}


def _warnings(change):
    problems = lcm_pitfalls({**LCM, **change}, "config.json")
    assert all(p.severity == "warning" for p in problems)
    return problems


def test_sound_lcm_config_has_no_warnings():
    assert _warnings({}) == []
    assert _warnings({"model_type": "full"}) == []  # full-model LCM (EMA target) is supported


@pytest.mark.parametrize(
    ("change", "pointer", "fragment"),
    [
        ({"validation_guidance": 7.5}, "/validation_guidance", "washes an LCM student out"),
        ({"validation_num_inference_steps": 30}, "/validation_num_inference_steps", "1-8 steps"),
        ({"caption_dropout_probability": 0.1}, "/caption_dropout_probability", "zeroes SDXL time_ids"),
        (
            {"validation_negative_prompt": "blurry"},
            "/validation_negative_prompt",
            "only acts when validation_guidance > 1",
        ),
        ({"resolution_type": "pixel", "minimum_image_size": 1}, "/minimum_image_size", "reads as pixels"),
    ],
)
def test_each_pitfall_warns_at_its_key(change, pointer, fragment):
    (problem,) = _warnings(change)
    assert problem.pointer == pointer and fragment in problem.message


def test_simpletuner_defaults_that_hurt_lcm_are_named_when_unset():
    problems = _warnings({"validation_guidance": None, "caption_dropout_probability": None})
    messages = {p.message.split(" =")[0] for p in problems}
    assert messages == {"validation_guidance", "caption_dropout_probability"}
    assert all(p.pointer == "" and "SimpleTuner's default" in p.message for p in problems)


def test_flux_validates_at_the_guidance_input_it_was_distilled_at():
    flux = {"model_family": "flux", "caption_dropout_probability": 0.0}
    assert _warnings({**flux, "flux_guidance_value": 3.5, "validation_guidance": 3.5}) == []
    (problem,) = _warnings({**flux, "flux_guidance_value": 3.5, "validation_guidance": 0.0})
    assert problem.pointer == "/validation_guidance" and "flux_guidance_value 3.5" in problem.message
    (problem,) = _warnings({**flux, "validation_guidance": None})  # SimpleTuner's defaults: 7.5 against 1.0
    assert "validation_guidance = 7.5" in problem.message and "flux_guidance_value 1" in problem.message


def test_no_lcm_warnings_without_lcm():
    assert lcm_pitfalls({"validation_guidance": 7.5}, "c.json") == []
    (problem,) = lcm_pitfalls({"distillation_config": {"lcm": {}}}, "c.json")
    assert "ignored unless distillation_method is 'lcm'" in problem.message


def test_caption_dropout_only_matters_for_sdxl():
    assert _warnings({"model_family": "sd1x", "caption_dropout_probability": 0.1}) == []
