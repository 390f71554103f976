"""`validate` names what SimpleTuner 4.10.1 itself blocks among the model families, in one line."""

import json
import subprocess
import sys

from lcm_plugin.config.pitfalls import lcm_pitfalls

LCM = {"model_type": "lora", "distillation_method": "lcm", "validation_guidance": 0.0,
       "validation_num_inference_steps": 4, "caption_dropout_probability": 0.0}

# What train.py does before it parses: import the trainer (which imports the SD 1.x/2.x model module), then build
# the parser; run in a fresh interpreter so no other test's imports change the order.
PARSER_PROBE = """
import json, sys
import simpletuner.helpers.training.trainer
from simpletuner.helpers.configuration.cmd_args import get_argument_parser
from simpletuner.helpers.models.registry import ModelRegistry
actions = {action.dest: action for action in get_argument_parser()._actions}
open(sys.argv[1], "w").write(json.dumps({
    "model_family": sorted(actions["model_family"].choices),
    "prediction_type": sorted(c for c in actions["prediction_type"].choices if c),
    "sd2x_registered_as": ModelRegistry.get("sd2x").__name__,
}))
"""


def test_sd2x_gets_one_line_naming_the_family_that_trains_it():
    problems = lcm_pitfalls({**LCM, "model_family": "sd2x"}, "config.json")
    assert len(problems) == 1
    line = problems[0].render()
    assert "sd2x" in line and "'sd1x'" in line and "prediction_type 'v_prediction'" in line, line
    for family in ("sd1x", "sdxl"):
        assert lcm_pitfalls({**LCM, "model_family": family, "prediction_type": "v_prediction"}, "config.json") == []


def test_the_line_is_true_of_simpletuners_own_parser(tmp_path):
    # SimpleTuner colours what is printed: the probe writes its answer to a file.
    answer = tmp_path / "parser.json"
    probe = subprocess.run(
        [sys.executable, "-c", PARSER_PROBE, str(answer)], capture_output=True, text=True, timeout=300
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    parser = json.loads(answer.read_text())
    # Registered as SD 2.x, yet refused by the parser; what the line recommends is accepted.
    assert parser["sd2x_registered_as"] == "StableDiffusion2"
    assert "sd2x" not in parser["model_family"]
    assert "sd1x" in parser["model_family"]
    assert {"epsilon", "v_prediction"} <= set(parser["prediction_type"])
