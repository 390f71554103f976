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
# Also their assistant-adapter flavours (those with a default repo: the flavour's ASSISTANT_LORA_PATHS entry, else
# ASSISTANT_LORA_PATH) and their DEFAULT_MODEL_FLAVOUR.
CLASS_PROBE = """
import json, sys
import simpletuner.helpers.models.all
from simpletuner.helpers.models.registry import ModelRegistry
def assistant(cls):
    flavours = list(getattr(cls, "ASSISTANT_LORA_FLAVOURS", None) or [])
    paths = getattr(cls, "ASSISTANT_LORA_PATHS", None) or {}
    return [flavours, [f for f in flavours if paths.get(f, getattr(cls, "ASSISTANT_LORA_PATH", None))]]
def card_pipeline_takes_sigmas(cls):  # the card's pipeline: diffusers' class of the name, else SimpleTuner's
    import inspect, diffusers
    from simpletuner.helpers.models.common import PipelineTypes
    pipeline = cls.PIPELINE_CLASSES[PipelineTypes.TEXT2IMG]
    return "sigmas" in inspect.signature(getattr(diffusers, pipeline.__name__, pipeline).__call__).parameters
covered = json.loads(sys.argv[2])
open(sys.argv[1], "w").write(json.dumps({
    name: [bool(getattr(getattr(cls, "PREDICTION_TYPE", None), "is_flow_prediction", False)), assistant(cls),
           getattr(cls, "DEFAULT_MODEL_FLAVOUR", None), card_pipeline_takes_sigmas(cls) if name in covered else None]
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
    (lcm_run("moss_image", "pcm"), "/distillation_config/lcm/variant", "MOSSImagePipeline takes no sigmas"),
    (lcm_run("hidream"), "/model_family", "model_family 'hidream' is a flow-matching family it does not cover"),
    # Qwen-Image is covered in its v1.0 / v2.0 flavours, not in 2.1 (SimpleTuner's default without a model path) or
    # the edit flavours.
    (lcm_run("qwen_image", model_flavour="v2.1"), "/model_flavour",
     "qwen_image model_flavour 'v2.1' is Qwen-Image-2.1"),
    (lcm_run("qwen_image", "pcm", model_flavour="edit-v2+"), "/model_flavour", "'edit-v2+' is an image-editing"),
    (lcm_run("longcat_image", model_flavour="edit"), "/model_flavour",
     "longcat_image model_flavour 'edit' is an image-editing"),
    ({key: value for key, value in lcm_run("qwen_image").items() if key != "pretrained_model_name_or_path"}, "",
     "model_flavour 'v2.1'"),
    (lcm_run("wan", "pcm"), "/model_family", "model_family 'wan'"),
    (lcm_run("flux", flux_guidance_mode="random-range"), "/flux_guidance_mode", "set flux_guidance_mode 'constant'"),
    # A LoRA run of a flavour SimpleTuner gives its assistant adapter (Z-Image's default flavour without a model path)
    (lcm_run("z_image", "pcm", model_flavour="turbo"), "/model_flavour", "would lose while the student keeps it"),
    ({key: value for key, value in lcm_run("z_image").items() if key != "pretrained_model_name_or_path"}, "",
     "z_image model_flavour 'turbo-ostris-v2' gets SimpleTuner's assistant adapter"),
    (lcm_run("flux", model_flavour="schnell"), "/model_flavour", "disable_assistant_lora: true"),
    (lcm_run("qwen_image", model_flavour="v2.0", assistant_lora_path="some/adapter"), "/model_flavour",
     "'v2.0' gets SimpleTuner's assistant adapter"),
    # FLUX.3 Image Klein's distilled flavour is a flow-map model, whatever the assistant LoRA setting
    (lcm_run("flux3_image", model_flavour="klein", disable_assistant_lora=True), "/model_flavour",
     "flux3_image model_flavour 'klein' is the distilled flow-map checkpoint"),
    # ERNIE-Image-Turbo's assistant adapter, which SimpleTuner loads only from a given path (no default repo)
    (lcm_run("ernie", model_flavour="turbo", assistant_lora_path="some/adapter"), "/model_flavour",
     "ernie model_flavour 'turbo' gets SimpleTuner's assistant adapter"),
    (lcm_run("moss_image", "pcm", model_flavour="sft-edit"), "/model_flavour",
     "moss_image model_flavour 'sft-edit' is an image-editing"),
    # FLUX.2-dev (guidance-distilled), also what SimpleTuner runs with model_flavour unset and a model path
    (lcm_run("flux2", model_flavour="dev"), "/model_flavour", "flux2 model_flavour 'dev' is FLUX.2-dev"),
    (lcm_run("flux2", "pcm"), "", "SimpleTuner runs it with model_flavour unset and a model path); set model_flavour "
     "'klein-4b' or 'klein-9b';"),
    # Krea-2-Turbo, the TDM-distilled checkpoint (no assistant LoRA: SimpleTuner's Krea2 class has none)
    (lcm_run("krea2", "pcm", model_flavour="turbo"), "/model_flavour",
     "krea2 model_flavour 'turbo' is Krea-2-Turbo, the few-step TDM-distilled checkpoint"),
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
    lcm_run("sd3", "pcm"), lcm_run("flux"), lcm_run("auraflow"), lcm_run("z_image", "pcm"), lcm_run("sdxl", "tcd"),
    lcm_run("qwen_image"), lcm_run("qwen_image", "pcm", model_flavour="v1.0"),
    lcm_run("qwen_image", model_flavour="v2.0"),
    # LongCat-Image's text-to-image flavours, and its default ("final") without a model path
    lcm_run("longcat_image"), lcm_run("longcat_image", "pcm", model_flavour="dev"),
    {key: value for key, value in lcm_run("longcat_image").items() if key != "pretrained_model_name_or_path"},
    lcm_run("sd1x", "tcd"),
    lcm_run("flux", "pcm", flux_guidance_mode="constant"),
    # no assistant adapter: turned off, a full-model run, or a flavour whose default repo is none
    lcm_run("z_image", model_flavour="turbo", disable_assistant_lora=True),
    {**lcm_run("z_image", model_flavour="turbo"), "model_type": "full"},
    lcm_run("z_image", model_flavour="base"), lcm_run("flux", model_flavour="dev"),
    # FLUX.3 Image Klein base, named or SimpleTuner's default without a model path
    lcm_run("flux3_image", model_flavour="klein-base"),
    {key: value for key, value in lcm_run("flux3_image").items() if key != "pretrained_model_name_or_path"},
    # ERNIE-Image base, named or SimpleTuner's default without a model path; Turbo without an assistant_lora_path
    lcm_run("ernie", model_flavour="base"),
    {key: value for key, value in lcm_run("ernie").items() if key != "pretrained_model_name_or_path"},
    lcm_run("ernie", model_flavour="turbo"),
    # MOSS-Image's text-to-image flavours, and its default ("sft") without a model path
    lcm_run("moss_image", model_flavour="base"),
    {key: value for key, value in lcm_run("moss_image").items() if key != "pretrained_model_name_or_path"},
    # FLUX.2-klein base, either size, and SimpleTuner's default ("klein-9b") without a model path
    lcm_run("flux2", model_flavour="klein-4b"), lcm_run("flux2", "pcm", model_flavour="klein-9b"),
    {key: value for key, value in lcm_run("flux2").items() if key != "pretrained_model_name_or_path"},
    # Krea 2 raw, named or SimpleTuner's default without a model path
    lcm_run("krea2", "pcm", model_flavour="raw"),
    {key: value for key, value in lcm_run("krea2").items() if key != "pretrained_model_name_or_path"},
])
def test_covered_runs_pass(config):
    assert refusals(config) == []


def test_flow_families_are_those_simpletuners_model_classes_train_by_flow_matching(tmp_path):
    """And the covered families' assistant-adapter flavours and default flavours are their classes' own, and PCM is
    refused exactly where the pipeline the card loads takes no sigmas."""
    from lcm_plugin.config.families import (
        ASSISTANT_LORA_FLAVOURS,
        DEFAULT_FLAVOURS,
        FLOW_FAMILIES,
        PCM_UNSAMPLED,
        UNCOVERED_FLAVOURS,
        is_flow_family,
    )

    answer = tmp_path / "classes.json"
    probe = subprocess.run([sys.executable, "-c", CLASS_PROBE, str(answer), json.dumps(list(FLOW_FAMILIES))],
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    classes = json.loads(answer.read_text())
    flow_by_class = {family: flow for family, (flow, *_) in classes.items()}
    assert len(flow_by_class) > 30 and sum(flow_by_class.values()) > 20
    assert {family: is_flow_family(family) for family in flow_by_class} == flow_by_class
    assert {family for family in FLOW_FAMILIES if not classes[family][3]} == set(PCM_UNSAMPLED)
    for family in FLOW_FAMILIES:
        _, (flavours, with_default), default_flavour, _ = classes[family]
        assert ASSISTANT_LORA_FLAVOURS.get(family, ((), ())) == (tuple(flavours), tuple(with_default)), family
        if family in ASSISTANT_LORA_FLAVOURS or family in UNCOVERED_FLAVOURS:
            assert DEFAULT_FLAVOURS.get(family) == default_flavour, family


def test_simpletuners_shipped_flow_examples_turned_into_lcm_runs_get_the_trainers_refusal_or_none():
    """Each of SimpleTuner's own example configs of a flow-matching family, with distillation_method 'lcm' added: a
    covered family passes with PCM (but those whose pipeline takes no sigmas) and is refused at its variant with TCD;
    any other flow family is refused at /model_family, and a covered family's uncovered flavour (Qwen-Image-2.1, every
    shipped qwen_image example) at /model_flavour."""
    from lcm_plugin.config.argv import examples_root
    from lcm_plugin.config.families import (
        FLOW_FAMILIES,
        PCM_UNSAMPLED,
        UNCOVERED_FLAVOURS,
        effective_flavour,
        is_flow_family,
        loads_assistant_lora,
    )

    seen, refused = set(), set()
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
            flavour = effective_flavour(family, example.get("model_flavour"),
                                        example.get("pretrained_model_name_or_path"))
            if family not in FLOW_FAMILIES:
                assert [problem.pointer for problem in found] == ["/model_family"], (path, found)
                refused.add(family)
            elif flavour in UNCOVERED_FLAVOURS.get(family, {}):
                assert [problem.pointer for problem in found] == ["/model_flavour"], (path, found)
                refused.add(f"{family} {flavour}")
            elif loads_assistant_lora(example.get):
                at = "/model_flavour" if "model_flavour" in example else ""
                assert [problem.pointer for problem in found] == [at], (path, found)
                refused.add(f"{family} {flavour} assistant")
            elif variant == "tcd" or family in PCM_UNSAMPLED:
                assert [problem.pointer for problem in found] == ["/distillation_config/lcm/variant"], (path, found)
            elif family != "flux" or example.get("flux_guidance_mode", "constant") == "constant":
                assert found == [], (path, found)
    assert {"sd3", "flux", "qwen_image", "wan"} <= seen, sorted(seen)
    assert {"wan", "qwen_image v2.1"} <= refused, sorted(refused)
    assert any(name.startswith("z_image turbo") and name.endswith(" assistant") for name in refused), sorted(refused)
