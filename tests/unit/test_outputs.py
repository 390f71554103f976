"""lcm_plugin.outputs: the sampler a run ships, the LoRA metadata, the model card's text.

References are diffusers' own schedulers (DDPMScheduler's betas, LCMScheduler built from a config) and the
solver grid computed by hand; the card's code is parsed with `ast`, not compared with an earlier output.
"""

from __future__ import annotations

import ast
import json

import pytest
import torch

from lcm_plugin import outputs
from lcm_plugin.config import LcmConfig
from lcm_plugin.tiny_sdxl import SDXL_SCHEDULER_CONFIG

LCM = LcmConfig(num_ddim_timesteps=25, timestep_scaling_factor=7.5, w_min=2.0, w_max=9.0)


def lcm_settings(scheduler) -> dict:
    """An LCMScheduler's effective settings: the arguments its constructor takes, as it stored them."""
    import inspect

    return {name: scheduler.config[name] for name in inspect.signature(type(scheduler).__init__).parameters
            if name != "self"}


def training_scheduler_config(**changes) -> dict:
    """SimpleTuner's training schedule: DDPMScheduler from the base model's scheduler config (plus its overrides)."""
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG, **changes).config)


@pytest.mark.parametrize("changes", [{}, {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}])
def test_scheduler_config_is_lcm_on_the_solver_grid_with_the_training_betas(changes):
    from diffusers import DDPMScheduler, LCMScheduler

    config = outputs.validation_scheduler_config(training_scheduler_config(**changes), LCM)
    assert config["_class_name"] == "LCMScheduler"
    assert config["original_inference_steps"] == 25 and config["timestep_scaling"] == 7.5
    scheduler = LCMScheduler.from_config(config)
    training = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG, **changes)
    torch.testing.assert_close(scheduler.alphas_cumprod, training.alphas_cumprod, rtol=0, atol=0)
    assert scheduler.config.prediction_type == training.config.prediction_type
    # Every sampling timestep is a point of the training solver's grid: (k * 1000 // 25) - 1.
    skip = 1000 // LCM.num_ddim_timesteps
    for steps in (1, 2, 4, 8):
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps.tolist()
        assert timesteps[0] == 999 and len(timesteps) == steps
        assert all((t + 1) % skip == 0 for t in timesteps), timesteps


@pytest.mark.parametrize("base", [SDXL_SCHEDULER_CONFIG, None])
@pytest.mark.parametrize("changes", [{}, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}])
def test_overrides_on_the_base_scheduler_rebuild_the_validation_scheduler(base, changes):
    from diffusers import LCMScheduler

    config = outputs.validation_scheduler_config(training_scheduler_config(**changes), LCM)
    overrides = outputs.scheduler_overrides(config, base)
    rebuilt = LCMScheduler.from_config(dict(base or {}), **overrides)
    assert lcm_settings(rebuilt) == lcm_settings(LCMScheduler.from_config(config))
    assert overrides["original_inference_steps"] == 25 and overrides["timestep_scaling"] == 7.5
    if base is not None:
        assert set(overrides) == {"original_inference_steps", "timestep_scaling", *changes}


def test_overrides_name_the_grid_even_when_it_is_lcm_schedulers_default():
    config = outputs.validation_scheduler_config(training_scheduler_config(), LcmConfig())
    overrides = outputs.scheduler_overrides(config, SDXL_SCHEDULER_CONFIG)
    assert overrides == {"original_inference_steps": 50, "timestep_scaling": 10.0}


def test_lora_metadata_round_trips_through_a_safetensors_file(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "pytorch_lora_weights.safetensors"
    tensors = {"unet.down.lora_A.weight": torch.randn(4, 8), "unet.down.lora_B.weight": torch.randn(8, 4)}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": "{}"})
    scheduler_config = outputs.validation_scheduler_config(training_scheduler_config(), LCM)

    outputs.add_safetensors_metadata(path, outputs.lora_metadata(LCM, scheduler_config, plugin_version="1.2.3"))

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt" and metadata["lora_adapter_metadata"] == "{}"
    assert metadata["lcm.plugin_version"] == "1.2.3"
    assert metadata["lcm.num_ddim_timesteps"] == "25" and metadata["lcm.timestep_scaling_factor"] == "7.5"
    settings, scheduler = outputs.lcm_settings_from_metadata(metadata)
    assert settings == LCM
    assert scheduler == scheduler_config
    reloaded = load_file(str(path))
    assert reloaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert torch.equal(reloaded[key], tensor)
    assert not list(tmp_path.glob("*.partial"))


def test_pipeline_folder_loads_with_the_lcm_scheduler(tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler

    from lcm_plugin.tiny_sdxl import save_tiny_sdxl

    folder = save_tiny_sdxl(tmp_path / "pipeline", seed=0, vocabulary=("red", "circle"))
    scheduler_config = outputs.validation_scheduler_config(training_scheduler_config(), LCM)
    outputs.write_pipeline_scheduler(folder, scheduler_config)
    outputs.name_diffusers_unet(folder)

    pipeline = DiffusionPipeline.from_pretrained(str(folder))
    assert isinstance(pipeline.scheduler, LCMScheduler)
    assert type(pipeline.unet).__name__ == "UNet2DConditionModel"
    assert lcm_settings(pipeline.scheduler) == lcm_settings(LCMScheduler.from_config(scheduler_config))


CARD = """---
license: creativeml-openrail-m
base_model: "stabilityai/stable-diffusion-xl-base-1.0"
tags:
  - sdxl
  - lora
pipeline_tag: text-to-image
---

# a card
tags:
  - not front matter
"""


def test_card_tags_go_into_the_front_matter_once():
    card = outputs.add_card_tags(CARD, outputs.LORA_TAGS)
    front_matter = card.split("---\n")[1]
    assert front_matter.count("  - lcm\n") == 1 and front_matter.count("  - lcm-lora\n") == 1
    assert front_matter.index("  - lcm\n") < front_matter.index("pipeline_tag")
    assert card.endswith("# a card\ntags:\n  - not front matter\n")
    assert outputs.add_card_tags(card, outputs.LORA_TAGS) == card


def test_card_without_front_matter_is_refused_in_one_line():
    with pytest.raises(ValueError, match="no YAML front matter with a `tags:` list"):
        outputs.add_card_tags("# just a title\n", outputs.FULL_MODEL_TAGS)


@pytest.mark.parametrize(
    "value, expected", [("64", (64, 64)), ("1024x768", (1024, 768)), ("768x1024,1024", (768, 1024)),
                        (512, (512, 512)), (None, (1024, 1024)), ("", (1024, 1024))]
)
def test_first_validation_resolution(value, expected):
    assert outputs.first_resolution(value) == expected


def card_settings(**changes) -> outputs.CardSettings:
    settings = dict(
        model_id="stabilityai/stable-diffusion-xl-base-1.0",
        adapter_id="someone/lcm-lora",
        lcm=LCM,
        scheduler_overrides={"original_inference_steps": 25, "timestep_scaling": 7.5},
        prompt='a "red" circle',
        seed=7,
        width=64,
        height=48,
    )
    settings.update(changes)
    return outputs.CardSettings(**settings)


def pipeline_calls(code: str) -> dict[str, ast.Call]:
    """The snippet's calls by dotted name (`LCMScheduler.from_config`, `pipeline`, ...)."""
    calls = {}
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call):
            calls[ast.unparse(node.func)] = node
    return calls


def keywords(call: ast.Call) -> dict:
    return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords
            if isinstance(keyword.value, ast.Constant)}


def test_lora_snippet_samples_lcm_at_four_steps_without_guidance_or_negative_prompt():
    code = outputs.inference_snippet(card_settings())
    calls = pipeline_calls(code)
    assert keywords(calls["LCMScheduler.from_config"]) == {"original_inference_steps": 25, "timestep_scaling": 7.5}
    assert keywords(calls["pipeline"]) == {"num_inference_steps": 4, "guidance_scale": 1.0, "width": 64, "height": 48}
    assert "negative_prompt" not in code
    assert "pipeline.load_lora_weights" in calls and "pipeline.fuse_lora" in calls
    # The scheduler is set before the LoRA loads and the pipeline samples; the prompt survives its quotes.
    assert code.index("LCMScheduler.from_config") < code.index("load_lora_weights") < code.index("image = pipeline(")
    namespace = {}
    exec(compile(ast.Module([s for s in ast.parse(code).body if ast.unparse(s).startswith(("prompt", "model_id",
                                                                                         "adapter_id"))], []),
                 "<card>", "exec"), namespace)
    assert namespace["prompt"] == 'a "red" circle' and namespace["adapter_id"] == "someone/lcm-lora"


def test_full_model_snippet_uses_the_saved_pipeline_scheduler():
    code = outputs.inference_snippet(card_settings(model_id="out/pipeline", adapter_id=None, scheduler_overrides={}))
    calls = pipeline_calls(code)
    assert "LCMScheduler.from_config" not in calls and "pipeline.load_lora_weights" not in calls
    assert ast.unparse(calls["DiffusionPipeline.from_pretrained"].args[0]) == "model_id"
    assert keywords(calls["pipeline"])["guidance_scale"] == 1.0


def test_a_pipeline_diffusers_lacks_is_imported_from_its_module_in_diffusers_place():
    """FLUX.3's card: diffusers has no Flux3ImagePipeline, so DiffusionPipeline.from_pretrained cannot resolve the
    folder's model_index.json; SimpleTuner's class loads it, under the name the rest of the snippet uses."""
    module = "simpletuner.helpers.models.flux3_image.pipeline"
    code = outputs.inference_snippet(card_settings(pipeline_class=(module, "Flux3ImagePipeline"),
                                                   scheduler_class="FlowMatchLCMScheduler"))
    imports = {(node.module, alias.name, alias.asname) for node in ast.walk(ast.parse(code))
               if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert imports == {("diffusers", "FlowMatchLCMScheduler", None),
                       (module, "Flux3ImagePipeline", "DiffusionPipeline")}
    assert "DiffusionPipeline.from_pretrained" in pipeline_calls(code)


def test_full_model_without_text_encoders_takes_them_from_the_base_model():
    code = outputs.inference_snippet(card_settings(model_id="out/pipeline", adapter_id=None, scheduler_overrides={},
                                                   base_model_id="base/sdxl"))
    calls = pipeline_calls(code)
    load = calls["DiffusionPipeline.from_pretrained"]
    assert ast.unparse(load.args[0]) == "base_model_id"
    assert {keyword.arg for keyword in load.keywords} == {"unet", "vae", "scheduler", "torch_dtype"}
    scheduler_call = ast.unparse(calls["LCMScheduler.from_pretrained"])
    assert scheduler_call == "LCMScheduler.from_pretrained(model_id, subfolder='scheduler')"
    assert 'base_model_id = "base/sdxl"' in code and keywords(calls["pipeline"])["guidance_scale"] == 1.0


def test_section_states_the_trained_settings_and_comfyui_sampler_only_for_comfyui_files():
    plain = outputs.inference_section(card_settings())
    assert "original_inference_steps=25" in plain and "1 to 8" in plain and "ComfyUI" not in plain
    comfy = outputs.inference_section(card_settings(comfyui_lora=True))
    assert "sampler **`lcm`**" in comfy
    # Non-default grid: ComfyUI's hard-coded LCM sampling does not match it, and the card says so.
    assert "samples it slightly off" in comfy
    default_grid = outputs.inference_section(card_settings(lcm=LcmConfig(), comfyui_lora=True))
    assert "sampler **`lcm`**" in default_grid and "slightly off" not in default_grid


# --- TCD and PCM runs: validation samples with TCDScheduler, gamma given as the pipeline's `eta` ----------------------

TCD = LcmConfig(num_ddim_timesteps=25, timestep_scaling_factor=7.5, variant="tcd", tcd_gamma=0.4)
PCM = LcmConfig(num_ddim_timesteps=25, timestep_scaling_factor=7.5, variant="pcm", pcm_phases=5)
TINY_PROMPT, TINY_SIZE, TINY_SEED = "red circle", 64, 5


@pytest.mark.parametrize("lcm, gamma", [(TCD, 0.4), (PCM, 0.0)])
def test_tcd_and_pcm_runs_ship_diffusers_tcd_scheduler_on_the_solver_grid(lcm, gamma):
    from diffusers import DDPMScheduler, TCDScheduler

    changes = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    config = outputs.validation_scheduler_config(training_scheduler_config(**changes), lcm)
    assert config["_class_name"] == "TCDScheduler"
    assert config["original_inference_steps"] == 25 and config["timestep_scaling"] == 7.5
    by_hand = TCDScheduler.from_config(training_scheduler_config(**changes), original_inference_steps=25,
                                       timestep_scaling=7.5)
    assert lcm_settings(outputs.scheduler_class(config).from_config(config)) == lcm_settings(by_hand)
    training = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG, **changes)
    torch.testing.assert_close(TCDScheduler.from_config(config).alphas_cumprod, training.alphas_cumprod, rtol=0, atol=0)
    assert outputs.pipeline_eta(training_scheduler_config(), lcm) == gamma


def test_lcm_runs_pass_no_eta():
    assert outputs.pipeline_eta(training_scheduler_config(), LCM) is None


@pytest.mark.parametrize("base", [SDXL_SCHEDULER_CONFIG, None])
def test_tcd_overrides_on_the_base_scheduler_rebuild_the_validation_scheduler(base):
    from diffusers import TCDScheduler

    changes = {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    config = outputs.validation_scheduler_config(training_scheduler_config(**changes), TCD)
    overrides = outputs.scheduler_overrides(config, base)
    rebuilt = TCDScheduler.from_config(dict(base or {}), **overrides)
    assert lcm_settings(rebuilt) == lcm_settings(TCDScheduler.from_config(config))
    if base is not None:
        assert set(overrides) == {"original_inference_steps", "timestep_scaling", *changes}


def test_tcd_lora_metadata_records_the_tcd_scheduler(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.down.lora_A.weight": torch.randn(4, 8)}, str(path), metadata={"format": "pt"})
    scheduler_config = outputs.validation_scheduler_config(training_scheduler_config(), TCD)
    outputs.add_safetensors_metadata(path, outputs.lora_metadata(TCD, scheduler_config, plugin_version="1.2.3"))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["lcm.variant"] == '"tcd"' and metadata["lcm.tcd_gamma"] == "0.4"
    settings, scheduler = outputs.lcm_settings_from_metadata(metadata)
    assert settings == TCD and scheduler == scheduler_config and scheduler["_class_name"] == "TCDScheduler"


def test_tcd_pipeline_folder_loads_with_diffusers_tcd_scheduler(tmp_path):
    from diffusers import DiffusionPipeline, TCDScheduler

    from lcm_plugin.tiny_sdxl import save_tiny_sdxl

    folder = save_tiny_sdxl(tmp_path / "pipeline", seed=0, vocabulary=("red", "circle"))
    scheduler_config = outputs.validation_scheduler_config(training_scheduler_config(), PCM)
    outputs.write_pipeline_scheduler(folder, scheduler_config)
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == ["diffusers", "TCDScheduler"]
    pipeline = DiffusionPipeline.from_pretrained(str(folder))
    assert type(pipeline.scheduler) is TCDScheduler
    assert lcm_settings(pipeline.scheduler) == lcm_settings(TCDScheduler.from_config(scheduler_config))


def tcd_card_settings(lcm: LcmConfig, **changes) -> outputs.CardSettings:
    scheduler_config = outputs.validation_scheduler_config(training_scheduler_config(), lcm)
    return card_settings(**{
        "lcm": lcm, "scheduler_class": scheduler_config["_class_name"],
        "scheduler_overrides": outputs.scheduler_overrides(scheduler_config, SDXL_SCHEDULER_CONFIG),
        "eta": outputs.pipeline_eta(training_scheduler_config(), lcm), **changes,
    })


@pytest.mark.parametrize("lcm, gamma", [(TCD, 0.4), (PCM, 0.0)])
def test_tcd_snippet_rebuilds_tcd_and_passes_gamma_as_eta(lcm, gamma):
    code = outputs.inference_snippet(tcd_card_settings(lcm))
    calls = pipeline_calls(code)
    assert "LCMScheduler" not in code
    assert keywords(calls["TCDScheduler.from_config"]) == {"original_inference_steps": 25, "timestep_scaling": 7.5}
    assert keywords(calls["pipeline"]) == {"num_inference_steps": 4, "guidance_scale": 1.0, "eta": gamma,
                                           "width": 64, "height": 48}
    section = outputs.inference_section(tcd_card_settings(lcm, comfyui_lora=True))
    assert "`TCDScheduler`" in section and f"`eta={gamma!r}`" in section and "validated with TCDScheduler" in section
    full = outputs.inference_snippet(tcd_card_settings(lcm, adapter_id=None, base_model_id="base/sdxl"))
    assert "TCDScheduler.from_pretrained(model_id, subfolder='scheduler')" in ast.unparse(ast.parse(full))
    assert keywords(pipeline_calls(full)["pipeline"])["eta"] == gamma


def run_card_snippet(code: str, workdir, monkeypatch, **substitutions: str) -> dict:
    """Execute the card's code in `workdir` with `name = '...'` assignments replaced; return its variables."""
    import re

    for name, value in substitutions.items():
        code, count = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", code, flags=re.MULTILINE)
        assert count == 1, f"the snippet assigns {name} {count} times"
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    exec(compile(code, "<model card>", "exec"), namespace)
    return namespace


def validation_image(pipeline, lcm: LcmConfig):
    """What validation shows: the pipeline sampling with `variant_scheduler` itself (its gamma fixed, no eta)."""
    import numpy as np

    from lcm_plugin.inference import variant_scheduler

    pipeline.scheduler = variant_scheduler(training_scheduler_config(), lcm)
    image = pipeline(prompt=TINY_PROMPT, num_inference_steps=outputs.CARD_STEPS, guidance_scale=0.0,
                     generator=torch.Generator(device="cpu").manual_seed(TINY_SEED), width=TINY_SIZE,
                     height=TINY_SIZE).images[0]
    return np.asarray(image)


def tiny_lora(pipeline_dir, adapter_dir):
    """A LoRA on the tiny SDXL UNet with non-zero up weights (so loading it changes the images)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(pipeline_dir))
    pipeline.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                         init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in pipeline.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    StableDiffusionXLPipeline.save_lora_weights(str(adapter_dir),
                                                unet_lora_layers=get_peft_model_state_dict(pipeline.unet))
    return adapter_dir


@pytest.mark.parametrize("lcm", [TCD, PCM], ids=["tcd", "pcm"])
def test_card_snippets_sample_as_validation(lcm, tmp_path, monkeypatch):
    """The LoRA card on the base model, and the full-model card on a pipeline folder with the shipped scheduler,
    give validation's image at the card's seed; with the `eta` line dropped, TCD's gives another."""
    import numpy as np
    from diffusers import DiffusionPipeline

    from lcm_plugin.tiny_sdxl import save_tiny_sdxl

    base = save_tiny_sdxl(tmp_path / "base", seed=0, vocabulary=("red", "circle"))
    adapter = tiny_lora(base, tmp_path / "adapter")
    settings = dict(prompt=TINY_PROMPT, seed=TINY_SEED, width=TINY_SIZE, height=TINY_SIZE)

    lora_code = outputs.inference_snippet(tcd_card_settings(lcm, model_id=str(base), adapter_id=str(adapter),
                                                            **settings))
    card = run_card_snippet(lora_code, tmp_path, monkeypatch)
    reference = DiffusionPipeline.from_pretrained(str(base))
    reference.load_lora_weights(str(adapter))
    reference.fuse_lora()
    reference.set_progress_bar_config(disable=True)
    expected = validation_image(reference, lcm)
    np.testing.assert_array_equal(np.asarray(card["image"]), expected)
    assert (tmp_path / "output.png").is_file()

    full = save_tiny_sdxl(tmp_path / "full", seed=3, vocabulary=("red", "circle"))
    outputs.write_pipeline_scheduler(full, outputs.validation_scheduler_config(training_scheduler_config(), lcm))
    full_code = outputs.inference_snippet(tcd_card_settings(lcm, model_id=str(full), adapter_id=None,
                                                            scheduler_overrides={}, **settings))
    card = run_card_snippet(full_code, tmp_path, monkeypatch)
    validation = DiffusionPipeline.from_pretrained(str(full))
    validation.set_progress_bar_config(disable=True)
    expected = validation_image(validation, lcm)
    np.testing.assert_array_equal(np.asarray(card["image"]), expected)
    if lcm.variant == "tcd":
        without_eta = "\n".join(line for line in full_code.splitlines() if not line.lstrip().startswith("eta="))
        card = run_card_snippet(without_eta, tmp_path, monkeypatch)
        assert not np.array_equal(np.asarray(card["image"]), expected)


FLOW_PCM = LcmConfig(num_ddim_timesteps=10, variant="pcm", pcm_phases=2)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_flow_pcm_student_samples_by_euler_through_the_phase_edges_of_the_teachers_grid(family):
    """Validation's sampler and the card's pipeline call (FlowMatchEulerDiscreteScheduler, `sigmas=`) both start
    their steps on the teacher's 10-point grid (diffusers' own `set_timesteps(10)` of the base scheduler, Flux's at
    its mu): at 2 steps on the phase edges, positions 0 and 5 from the top; at 4 steps on positions floor(s 10 / 4);
    each step Euler, x + (sigma_next - sigma) v."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from lcm_plugin.inference import variant_scheduler
    from lcm_plugin.tiny_flow import FLUX_SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG

    base = dict(SD3_SCHEDULER_CONFIG if family == "sd3" else FLUX_SCHEDULER_CONFIG)
    mu = calculate_shift(64, base["base_image_seq_len"], base["max_image_seq_len"], base["base_shift"],
                         base["max_shift"]) if family == "flux" else None
    grid = FlowMatchEulerDiscreteScheduler.from_config(base)
    grid.set_timesteps(10, mu=mu)
    sampler = variant_scheduler(base, FLOW_PCM)
    for steps, positions in ((2, [0, 5, 10]), (4, [0, 2, 5, 7, 10])):
        sampler.set_timesteps(steps, mu=mu)
        torch.testing.assert_close(sampler.sigmas, grid.sigmas[positions], rtol=0, atol=1e-6)
    sample, velocity = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    stepped = sampler.step(velocity, sampler.timesteps[1], sample).prev_sample
    torch.testing.assert_close(stepped, sample + (sampler.sigmas[2] - sampler.sigmas[1]) * velocity)

    config = outputs.validation_scheduler_config(base, FLOW_PCM)
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert outputs.scheduler_overrides(config, base) == {}
    sigmas = outputs.pipeline_sigmas(base, FLOW_PCM)
    card = FlowMatchEulerDiscreteScheduler.from_config(config)
    card.set_timesteps(sigmas=sigmas, mu=mu)
    torch.testing.assert_close(card.sigmas, sampler.sigmas, rtol=0, atol=0)  # sampler at CARD_STEPS (4) above
    code = outputs.inference_snippet(card_settings(lcm=FLOW_PCM, scheduler_class=config["_class_name"],
                                                   scheduler_overrides={}, sigmas=tuple(sigmas)))
    call = keywords(pipeline_calls(code)["pipeline"])
    assert "num_inference_steps" not in call
    assert ast.literal_eval(next(k.value for k in pipeline_calls(code)["pipeline"].keywords if k.arg == "sigmas")) \
        == sigmas


def test_the_other_samplers_take_no_sigmas():
    from lcm_plugin.tiny_flow import SD3_SCHEDULER_CONFIG

    assert outputs.pipeline_sigmas(dict(SD3_SCHEDULER_CONFIG), LcmConfig()) is None
    assert outputs.pipeline_sigmas(training_scheduler_config(), PCM) is None
