"""`validate` refuses the flow-matching runs the trainer refuses (config.families), at the key to change, and knows
which families are flow-matching as SimpleTuner's own model classes do."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lcm_plugin.config.training import check_training_config

REFUSAL = "distillation_method 'lcm' (simpletuner-lcm)"

# Every registered family's class, asked for its PREDICTION_TYPE in a fresh interpreter (importing every model
# module is SimpleTuner's own registration path and takes ~10 s).
CLASS_PROBE = """
import json, sys
import simpletuner.helpers.models.all
from simpletuner.helpers.models.registry import ModelRegistry
open(sys.argv[1], "w").write(json.dumps({
    name: bool(getattr(getattr(cls, "PREDICTION_TYPE", None), "is_flow_prediction", False))
    for name, cls in ModelRegistry.model_families().items()
}))
"""


def lcm_run(family: str, variant: str = "lcm", **settings) -> dict:
    return {"model_type": "lora", "model_family": family, "pretrained_model_name_or_path": "some/model",
            "output_dir": "out", "distillation_method": "lcm", "distillation_config": {"lcm": {"variant": variant}},
            **settings}


def refusals(config: dict) -> list:
    return [problem for problem in check_training_config(config, "config.json") if REFUSAL in problem.message]


@pytest.mark.parametrize(("config", "where", "words"), [
    (lcm_run("sd3", "tcd"), "/distillation_config/lcm/variant", "variant 'tcd' is defined on a diffusion"),
    (lcm_run("qwen_image"), "/model_family", "model_family 'qwen_image' is a flow-matching family it does not cover"),
    (lcm_run("wan", "pcm"), "/model_family", "model_family 'wan'"),
    (lcm_run("flux", flux_guidance_mode="random-range"), "/flux_guidance_mode", "set flux_guidance_mode 'constant'"),
])
def test_a_refused_flow_run_is_an_error_at_the_key_to_change(config, where, words):
    (problem,) = refusals(config)
    assert problem.severity == "error" and problem.pointer == where and words in problem.message, problem.render()


def test_the_string_form_of_the_block_is_pointed_at_as_a_whole():
    config = lcm_run("sd3")
    config["distillation_config"] = json.dumps({"lcm": {"variant": "tcd"}})
    (problem,) = refusals(config)
    assert problem.pointer == "/distillation_config"


@pytest.mark.parametrize("config", [
    lcm_run("sd3", "pcm"), lcm_run("flux"), lcm_run("auraflow"), lcm_run("sdxl", "tcd"), lcm_run("sd1x", "tcd"),
    lcm_run("flux", "pcm", flux_guidance_mode="constant"),
])
def test_covered_runs_pass(config):
    assert refusals(config) == []


def test_flow_families_are_those_simpletuners_model_classes_train_by_flow_matching(tmp_path):
    from lcm_plugin.config.families import is_flow_family

    answer = tmp_path / "classes.json"
    probe = subprocess.run([sys.executable, "-c", CLASS_PROBE, str(answer)], capture_output=True, text=True,
                           timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    flow_by_class = json.loads(answer.read_text())
    assert len(flow_by_class) > 30 and sum(flow_by_class.values()) > 20
    assert {family: is_flow_family(family) for family in flow_by_class} == flow_by_class


def test_simpletuners_shipped_flow_examples_turned_into_lcm_runs_get_the_trainers_refusal_or_none():
    """Each of SimpleTuner's own example configs of a flow-matching family, with distillation_method 'lcm' added:
    a covered family passes with PCM and is refused at its variant with TCD; any other flow family is refused at
    /model_family."""
    from lcm_plugin.config.argv import examples_root
    from lcm_plugin.config.families import FLOW_FAMILIES, is_flow_family

    seen = set()
    for path in sorted(examples_root().glob("*/config.json")):
        try:  # a few shipped examples are not strict JSON (SimpleTuner's own loader is lenient): not our input here
            example = json.loads(path.read_text())
        except ValueError:
            continue
        family = str(example.get("model_family") or "").lower() if isinstance(example, dict) else ""
        if not is_flow_family(family):
            continue
        seen.add(family)
        for variant in ("pcm", "tcd"):
            config = {**example, "distillation_method": "lcm", "distillation_config": {"lcm": {"variant": variant}}}
            found = [problem for problem in check_training_config(config, str(path), path.parent)
                     if REFUSAL in problem.message]
            if family not in FLOW_FAMILIES:
                assert [problem.pointer for problem in found] == ["/model_family"], (path, found)
            elif variant == "tcd":
                assert [problem.pointer for problem in found] == ["/distillation_config/lcm/variant"], (path, found)
            elif family != "flux" or example.get("flux_guidance_mode", "constant") == "constant":
                assert found == [], (path, found)
    assert {"sd3", "flux", "qwen_image"} <= seen, sorted(seen)
