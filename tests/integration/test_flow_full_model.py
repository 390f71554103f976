"""A full-model LCM of the flow families through the stock trainer (issue 21): SD3 (classifier-free guidance) with the
PCM variant and Flux (its own guidance input) with LCM's, 3 steps each on the tiny offline models of
lcm_plugin.tiny_flow. The step itself (frozen teacher, float32 EMA target, student; PCM's phase edges) is checked
against the equations in tests/unit/test_distiller_flow.py; here the run must train and hand over what samples as it
is: the model card's code loads the trained transformer and the sampler the student was trained for
(FlowMatchLCMScheduler; for PCM FlowMatchEulerDiscreteScheduler at the phase edges' sigmas), and samples differently
from the base model.
"""

from __future__ import annotations

import ast
import json
import math

import numpy as np
import pytest
import torch

from test_family_matrix import FULL_MODEL_CONFIG
from test_flow_families import QUALITY_CHECK, assert_the_quality_check_ran, flow_run, validation_at
from test_simpletuner_train import lcm_losses

STEPS = 3
# family -> (config.json keys, the LCM block's variant keys, the pipeline call's guidance_scale). Flux samples at the
# guidance input it was distilled at; SD3's student samples without classifier-free guidance.
FAMILIES = {
    "sd3": ({}, {"variant": "pcm", "pcm_phases": 2}, 0.0),
    "flux": ({"flux_guidance_value": 3.5}, {}, 3.5),
}



@pytest.fixture(scope="module", params=list(FAMILIES))
def full_run(request, tmp_path_factory):
    family = request.param
    config, lcm, _ = FAMILIES[family]
    # SimpleTuner's validation at the last step samples with the distiller's scheduler; the card samples at its
    # resolution.
    run, model, log = flow_run(tmp_path_factory.mktemp(f"{family}-full"), family, steps=STEPS,
                               lcm={**lcm, "quality_check": QUALITY_CHECK},
                               config={**validation_at(STEPS), **config, **FULL_MODEL_CONFIG})
    return family, run, model, log


def test_simpletuners_validation_samples_the_flow_student(full_run):
    """Validation at the last step runs in SimpleTuner's own pipeline with the distiller's scheduler (`get_scheduler`:
    the phased Euler sampler for PCM, FlowMatchLCMScheduler for LCM, which take the pipeline's proposed sigmas and
    Flux's mu); the quality check scores the student against its teacher's Euler samples and logs its metrics."""
    family, run, _, log = full_run
    images = sorted((run / "output" / "validation_images").glob("*.png"))
    assert images, log[-4000:]
    assert_the_quality_check_ran(run, log, STEPS)


def test_a_full_model_flow_lcm_samples_through_its_model_card(full_run, tmp_path, monkeypatch):
    """The card's code, run as a user would: the saved transformer, VAE and scheduler on the base model's text
    encoders; the scheduler keeps the teacher's grid (PCM: its call passes the phase edges validation samples at),
    the transformer is trained and samples differently."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler
    from test_run_outputs import card_snippet, run_snippet

    from lcm_plugin.config import LcmConfig

    family, run, model, log = full_run
    losses = lcm_losses(run / "output" / "training_metrics.jsonl")
    assert len(losses) >= STEPS and all(math.isfinite(v) and v >= 0 for v in losses.values()), log[-4000:]
    card = run / "output" / "pipeline" / "README.md"
    assert card.is_file(), log[-4000:]
    code = card_snippet(card.read_text())
    variables = run_snippet(code, tmp_path, monkeypatch)
    pipeline = variables["pipeline"]
    assert variables["image"].size == (64, 64)

    base_transformer = type(pipeline.transformer).from_pretrained(model, subfolder="transformer")
    base_scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    for key in ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "num_train_timesteps"):
        assert pipeline.scheduler.config[key] == base_scheduler[key], key
    lcm = LcmConfig(**json.loads((run / "config" / "config.json").read_text())["distillation_config"]["lcm"])
    call = next(node for node in ast.walk(ast.parse(code))
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "pipeline")
    sigmas = next((ast.literal_eval(k.value) for k in call.keywords if k.arg == "sigmas"), None)
    if lcm.variant == "pcm":
        assert type(pipeline.scheduler) is FlowMatchEulerDiscreteScheduler
        # The card's sigmas, shifted by the base scheduler, are the points of diffusers' own N-step grid that PCM's
        # sampler starts its 4 steps at: floor(s N / 4) from the top, s = 0..3.
        grid = FlowMatchEulerDiscreteScheduler.from_config(base_scheduler)
        grid.set_timesteps(lcm.num_ddim_timesteps)
        card = FlowMatchEulerDiscreteScheduler.from_config(base_scheduler)
        card.set_timesteps(sigmas=sigmas)
        positions = [s * lcm.num_ddim_timesteps // 4 for s in range(4)] + [lcm.num_ddim_timesteps]
        torch.testing.assert_close(card.sigmas, grid.sigmas[positions], rtol=0, atol=1e-6)
    else:
        assert isinstance(pipeline.scheduler, FlowMatchLCMScheduler), type(pipeline.scheduler)
        assert sigmas is None
    trained = pipeline.transformer.state_dict()
    assert max((trained[name] - base).abs().max().item() for name, base in base_transformer.state_dict().items()) > 0

    def image() -> np.ndarray:
        steps = {"sigmas": sigmas} if sigmas else {"num_inference_steps": 4}
        return np.asarray(pipeline("red circle", guidance_scale=FAMILIES[family][2], height=64, width=64,
                                   generator=torch.Generator().manual_seed(0), output_type="np", **steps).images[0])

    trained_image = image()
    pipeline.transformer = base_transformer
    assert np.abs(trained_image - image()).max() > 1e-4
