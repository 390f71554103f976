"""What a stock `simpletuner train` LCM run hands the user samples correctly as it is.

Two runs of the tiny SDXL (about a minute each), shared by the tests of this module: an LCM-LoRA in ComfyUI key
format with a checkpoint at step 2, and a full-model LCM. Both use LCM settings that differ from LCMScheduler's
defaults (25-step grid, timestep scaling 7.5), so a scheduler left at its defaults cannot pass.

The reference sampler is ours (`lcm_plugin.demo.sampling.sample_student` with `lcm_plugin.inference.lcm_scheduler`:
LCMScheduler on the training solver's grid, UNet called directly) on the training noise schedule SimpleTuner
builds (DDPMScheduler from the base model's scheduler folder), started from the same noise and generator as the
pipeline under test.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import stock_trainer_env, write_lcm_training_dir
from test_simpletuner_train import run_stock_trainer
from lcm_plugin import outputs
from lcm_plugin.config import LcmConfig
from lcm_plugin.inference import lcm_scheduler

LCM_BLOCK = {
    "num_ddim_timesteps": 25,
    "w_min": 2.0,
    "w_max": 9.0,
    "loss_type": "l2",
    "huber_c": 0.001,
    "timestep_scaling_factor": 7.5,
}
PROMPT = "red circle"
SIZE = 64
STEPS = 3
LORA_FILE = "pytorch_lora_weights.safetensors"


def train_with(run_dir: Path, changes: dict) -> Path:
    """Apply `changes` to the run's config.json, run the stock trainer there, return its output folder."""
    config_file = run_dir / "config" / "config.json"
    config = json.loads(config_file.read_text())
    config["distillation_config"] = {"lcm": LCM_BLOCK}
    # "WxH": SimpleTuner reads a bare number under 128 as megapixels.
    config.update(validation_prompt=PROMPT, validation_resolution=f"{SIZE}x{SIZE}", **changes)
    config_file.write_text(json.dumps(config, indent=2))
    (run_dir / "simpletuner.log").write_text(run_stock_trainer(run_dir, stock_trainer_env()))
    return run_dir / "output"


def log_tail(output: Path) -> str:
    return (output.parent / "simpletuner.log").read_text()[-4000:]


@pytest.fixture(scope="module")
def lora_output(tmp_path_factory, tiny_sdxl_dir) -> Path:
    root = write_lcm_training_dir(tmp_path_factory.mktemp("lora") / "run", tiny_sdxl_dir, max_train_steps=STEPS)
    output = train_with(root, {"lora_format": "comfyui", "checkpoint_step_interval": 2})
    assert (output / LORA_FILE).is_file() and (output / "README.md").is_file(), log_tail(output)
    return output


@pytest.fixture(scope="module")
def full_output(tmp_path_factory, tiny_sdxl_dir) -> Path:
    root = write_lcm_training_dir(tmp_path_factory.mktemp("full") / "run", tiny_sdxl_dir, max_train_steps=STEPS)
    output = train_with(root, {"model_type": "full"})
    assert (output / "pipeline" / "model_index.json").is_file(), log_tail(output)
    return output


def training_schedule(model_dir: Path):
    """SimpleTuner's training noise schedule for the tiny SDXL (`ModelFoundation.setup_training_noise_schedule`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler")


def assert_is_the_trained_lcm_scheduler(scheduler, model_dir: Path) -> None:
    """LCMScheduler with original_inference_steps = num_ddim_timesteps, timestep_scaling = timestep_scaling_factor,
    and the training schedule's betas and prediction type."""
    from diffusers import LCMScheduler

    training = training_schedule(model_dir)
    assert isinstance(scheduler, LCMScheduler), type(scheduler)
    assert scheduler.config.original_inference_steps == LCM_BLOCK["num_ddim_timesteps"]
    assert scheduler.config.timestep_scaling == LCM_BLOCK["timestep_scaling_factor"]
    assert scheduler.config.prediction_type == training.config.prediction_type
    torch.testing.assert_close(scheduler.alphas_cumprod, training.alphas_cumprod, rtol=0, atol=0)
    # diffusers' LCMScheduler.set_timesteps by hand: the solver grid k*i - 1 (k = 1000 // 25 = 40, i = 1..25),
    # descending 999, 959, ..., 39; n steps take the entries at floor(j * 25 / n), j = 0..n-1.
    assert LCM_BLOCK["num_ddim_timesteps"] == 25 and training.config.num_train_timesteps == 1000
    expected = {1: [999], 2: [999, 519], 4: [999, 759, 519, 279]}  # 2 steps: index 12; 4 steps: 6, 12, 18
    sampler = copy.deepcopy(scheduler)
    for steps, timesteps in expected.items():
        sampler.set_timesteps(steps)
        assert sampler.timesteps.tolist() == timesteps, (steps, sampler.timesteps)


def reference_image(pipeline, model_dir: Path, *, seed: int, steps: int) -> np.ndarray:
    """Our sampler on `pipeline`'s UNet and VAE from the noise a diffusers pipeline draws first from
    `Generator().manual_seed(seed)`, the same generator then feeding LCM's per-step noise. uint8 [H, W, 3]."""
    from lcm_plugin.demo import sampling

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=generator)
    cond = sampling.encode(pipeline, [PROMPT], SIZE)
    scheduler = lcm_scheduler(training_schedule(model_dir).config, num_ddim_timesteps=LCM_BLOCK["num_ddim_timesteps"],
                              timestep_scaling=LCM_BLOCK["timestep_scaling_factor"])
    latents = sampling.sample_student(pipeline.unet, scheduler, noise, cond, steps=steps, generator=generator)
    return sampling.decode(pipeline.vae, latents)[0].numpy()


def card_snippet(card: str) -> str:
    """The Python block of the card's "## Inference" section."""
    inference = card.split("\n## Inference\n", 1)[1]
    return re.search(r"```python\n(.*?)```", inference, flags=re.DOTALL).group(1)


def front_matter(card: str) -> str:
    return card.split("---\n")[1]


def run_snippet(code: str, workdir: Path, monkeypatch, **substitutions: str) -> dict:
    """Execute the card's code in `workdir` with `name = '...'` assignments replaced; return its variables."""
    for name, value in substitutions.items():
        code, count = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", code, flags=re.MULTILINE)
        assert count == 1, f"the snippet assigns {name} {count} times"
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    exec(compile(code, "<model card>", "exec"), namespace)
    assert (workdir / "output.png").is_file()
    return namespace


def assert_same_image(actual: np.ndarray, expected: np.ndarray) -> None:
    # uint8 images from float32 sampling: a fused LoRA moves values by ~1e-6, which can flip a rounding.
    difference = np.abs(actual.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.01, (difference.max(), difference.mean())


# --- LoRA run ---------------------------------------------------------------------------------------------------------


def test_lora_card_snippet_samples_as_our_lcm_sampler(lora_output, tiny_sdxl_dir, tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    code = card_snippet((lora_output / "README.md").read_text())
    assert "negative_prompt" not in code
    namespace = run_snippet(code, tmp_path, monkeypatch, model_id=str(tiny_sdxl_dir), adapter_id=str(lora_output))
    assert_is_the_trained_lcm_scheduler(namespace["pipeline"].scheduler, tiny_sdxl_dir)
    assert namespace["prompt"] == PROMPT
    seed = int(re.search(r"manual_seed\((\d+)\)", code).group(1))
    steps = int(re.search(r"num_inference_steps=(\d+)", code).group(1))
    assert (steps, re.search(r"guidance_scale=([\d.]+)", code).group(1)) == (4, "1.0")

    reference = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
    reference.load_lora_weights(str(lora_output), weight_name=LORA_FILE)
    expected = reference_image(reference, tiny_sdxl_dir, seed=seed, steps=steps)
    assert_same_image(np.asarray(namespace["image"]), expected)


def test_lora_card_tags_base_model_and_comfyui_sampler(lora_output, tiny_sdxl_dir):
    card = (lora_output / "README.md").read_text()
    tags = re.findall(r"^  - (.+)$", front_matter(card), flags=re.MULTILINE)
    assert {"lcm", "lcm-lora", "sdxl", "lora"} <= set(tags), tags
    assert re.search(r'^base_model: ".+"$', front_matter(card), flags=re.MULTILINE)
    inference = card.split("\n## Inference\n", 1)[1]
    assert "sampler **`lcm`**" in inference  # lora_format: comfyui
    # The snippet loads the model that was trained from, where it is, and the LoRA from the run's output.
    assert f"model_id = {json.dumps(str(tiny_sdxl_dir))}" in inference
    assert f"adapter_id = {json.dumps(str(lora_output))}" in inference


@pytest.mark.parametrize("relative", [LORA_FILE, f"checkpoint-2/{LORA_FILE}"])
def test_lora_files_record_the_lcm_settings(lora_output, tiny_sdxl_dir, relative):
    from diffusers import LCMScheduler
    from safetensors import safe_open

    from lcm_plugin import __version__

    with safe_open(str(lora_output / relative), framework="pt") as handle:
        metadata = handle.metadata()
    settings, scheduler_config = outputs.lcm_settings_from_metadata(metadata)
    assert settings == LcmConfig.model_validate(LCM_BLOCK)
    assert metadata[outputs.METADATA_VERSION_KEY] == __version__
    assert_is_the_trained_lcm_scheduler(LCMScheduler.from_config(scheduler_config), tiny_sdxl_dir)


# --- full-model run ---------------------------------------------------------------------------------------------------


def test_saved_pipeline_samples_as_our_lcm_sampler(full_output, tiny_sdxl_dir):
    from diffusers import DiffusionPipeline

    index = json.loads((full_output / "pipeline" / "model_index.json").read_text())
    # Loadable by plain diffusers: no SimpleTuner class named.
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    # SimpleTuner saves no text encoders unless save_text_encoder is set: they are the base model's.
    base = DiffusionPipeline.from_pretrained(str(tiny_sdxl_dir))
    text_components = {name: getattr(base, name)
                       for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    pipeline = DiffusionPipeline.from_pretrained(str(full_output / "pipeline"), **text_components)
    pipeline.set_progress_bar_config(disable=True)
    assert_is_the_trained_lcm_scheduler(pipeline.scheduler, tiny_sdxl_dir)
    for steps in (1, 2, 4):
        image = pipeline(PROMPT, num_inference_steps=steps, guidance_scale=0.0, width=SIZE, height=SIZE,
                         generator=torch.Generator().manual_seed(steps), output_type="np").images[0]
        expected = reference_image(pipeline, tiny_sdxl_dir, seed=steps, steps=steps)
        assert_same_image((image * 255).round().astype(np.uint8), expected)


def test_full_model_card_snippet_runs_the_saved_pipeline(full_output, tiny_sdxl_dir, tmp_path, monkeypatch):
    card = (full_output / "pipeline" / "README.md").read_text()
    tags = re.findall(r"^  - (.+)$", front_matter(card), flags=re.MULTILINE)
    assert "lcm" in tags and "lcm-lora" not in tags, tags
    code = card_snippet(card)
    # The scheduler comes from the saved pipeline, not rebuilt from the base model's.
    assert "negative_prompt" not in code and "LCMScheduler.from_config" not in code
    assert f"model_id = {json.dumps(str(full_output / 'pipeline'))}" in code
    assert f"base_model_id = {json.dumps(str(tiny_sdxl_dir))}" in code
    namespace = run_snippet(code, tmp_path, monkeypatch)
    assert_is_the_trained_lcm_scheduler(namespace["pipeline"].scheduler, tiny_sdxl_dir)
    seed = int(re.search(r"manual_seed\((\d+)\)", code).group(1))
    expected = reference_image(namespace["pipeline"], tiny_sdxl_dir, seed=seed, steps=4)
    assert_same_image(np.asarray(namespace["image"]), expected)


# --- card for the hub, generated offline ------------------------------------------------------------------------------

HUB_REPO = "someone/lcm-lora-test"
HUB_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


@pytest.fixture
def plugin_installed():
    from lcm_plugin.simpletuner.install import install, is_installed, uninstall

    already = is_installed()
    install()
    yield
    if not already:
        uninstall()


@pytest.fixture
def state_tracker():
    """SimpleTuner's global StateTracker, restored after the test."""
    from simpletuner.helpers.training.state_tracker import StateTracker

    saved = (StateTracker.get_args(), StateTracker.get_model(), StateTracker.get_model_family(),
             StateTracker.get_accelerator(), StateTracker.get_weight_dtype())
    yield StateTracker
    for setter, value in zip(("set_args", "set_model", "set_model_family", "set_accelerator", "set_weight_dtype"),
                             saved):
        getattr(StateTracker, setter)(value)


@pytest.mark.parametrize("model_type", ["lora", "full"])
def test_hub_card_is_tagged_lcm_and_points_at_the_hub(plugin_installed, state_tracker, tiny_sdxl_dir, tmp_path,
                                                     model_type):
    """SimpleTuner's own card writer (what HubManager.upload_model calls before pushing), with push_to_hub
    arguments, in this process: nothing is pushed."""
    import types

    from simpletuner.helpers.configuration.cmd_args import parse_cmdline_args
    from simpletuner.helpers.configuration.json_file import normalize_args
    from simpletuner.helpers.models.sdxl.model import SDXL
    from simpletuner.helpers.publishing import huggingface

    config = json.loads((write_lcm_training_dir(tmp_path / "run", tiny_sdxl_dir, max_train_steps=STEPS)
                         / "config" / "config.json").read_text())
    config.pop("$schema")
    config.update(model_type=model_type, distillation_config={"lcm": LCM_BLOCK}, push_to_hub=True,
                  hub_model_id=HUB_REPO, model_card_base_model=HUB_BASE_MODEL, validation_prompt=PROMPT,
                  validation_resolution=f"{SIZE}x{SIZE}")
    args = parse_cmdline_args(input_args=normalize_args(config), exit_on_error=True)
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    model = SDXL(args, accelerator=accelerator)
    state_tracker.set_args(args)
    state_tracker.set_model(model)
    state_tracker.set_model_family("sdxl")
    state_tracker.set_accelerator(accelerator)
    state_tracker.set_weight_dtype(torch.float32)
    folder = tmp_path / "card"
    folder.mkdir()

    huggingface.save_model_card(model=model, repo_id=HUB_REPO, base_model=args.pretrained_model_name_or_path,
                                prompt=PROMPT, repo_folder=str(folder), global_step=STEPS, epoch=1)

    card = (folder / "README.md").read_text()
    tags = re.findall(r"^  - (.+)$", front_matter(card), flags=re.MULTILINE)
    assert "lcm" in tags and ("lcm-lora" in tags) == (model_type == "lora"), tags
    assert f'base_model: "{HUB_BASE_MODEL}"' in front_matter(card)
    code = card_snippet(card)
    if model_type == "lora":
        assert f"model_id = {json.dumps(HUB_BASE_MODEL)}" in code and f"adapter_id = {json.dumps(HUB_REPO)}" in code
    else:
        assert f"model_id = {json.dumps(HUB_REPO)}" in code and f"base_model_id = {json.dumps(HUB_BASE_MODEL)}" in code
    assert "width=64," in code and "height=64," in code
