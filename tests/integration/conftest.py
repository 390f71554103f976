"""Fixtures for runs of the stock SimpleTuner trainer: a tiny SDXL, a generated dataset, CPU configs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lcm_plugin.tiny_sd import save_tiny_sd1, save_tiny_sd2_v
from lcm_plugin.tiny_sdxl import save_tiny_sdxl

COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220)}
SHAPES = ("circle", "square")
VOCABULARY = tuple(COLOURS) + SHAPES
IMAGE_SIZE = 64  # the tiny VAE makes 8x8 latents from it


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A loadable diffusers SDXL folder (random weights, ~5 MB); never changed by the tests."""
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"), seed=0, vocabulary=VOCABULARY)


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory) -> Path:
    """A loadable diffusers SD 1.x folder (epsilon prediction, random weights); never changed by the tests."""
    return save_tiny_sd1(tmp_path_factory.mktemp("tiny-sd1"), seed=0, vocabulary=VOCABULARY)


@pytest.fixture(scope="session")
def tiny_sd2_v_dir(tmp_path_factory) -> Path:
    """A loadable diffusers SD 2.x-style folder (v-prediction, OpenCLIP-style text encoder); never changed."""
    return save_tiny_sd2_v(tmp_path_factory.mktemp("tiny-sd2-v"), seed=0, vocabulary=VOCABULARY)


def write_shapes_dataset(folder: Path) -> Path:
    """PNGs of coloured shapes with textfile captions ("red circle", ...). SimpleTuner writes bucket metadata
    into this folder, so every run gets a fresh one."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    for index, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        box = (12, 12, IMAGE_SIZE - 12, IMAGE_SIZE - 12)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        image.save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"{colour} {shape}")
    return folder


def write_lcm_training_dir(root: Path, model_dir: Path, *, max_train_steps: int) -> Path:
    """`root/config/{config.json,multidatabackend.json}` for a CPU LoRA run with `distillation_method: lcm`.

    The LCM block is the seed's (../shared/seed/config.json); sizes, optimizer and precision are shrunk for a
    CPU (optimizer torch-adamw, mixed_precision no, no validation), metrics go to output/training_metrics.jsonl.
    """
    data_dir = write_shapes_dataset(root / "data")
    config_dir = root / "config"
    config_dir.mkdir(parents=True)
    backends = [
        {
            "id": "shapes",
            "type": "local",
            "crop": False,
            "resolution": IMAGE_SIZE,
            "resolution_type": "pixel",
            "minimum_image_size": IMAGE_SIZE // 2,
            "cache_dir_vae": str(root / "cache" / "vae"),
            "instance_data_dir": str(data_dir),
            "caption_strategy": "textfile",
            "metadata_backend": "discovery",
            "repeats": 0,
        },
        {
            "id": "text-embeds",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": str(root / "cache" / "text"),
            "write_batch_size": 8,
        },
    ]
    (config_dir / "multidatabackend.json").write_text(json.dumps(backends, indent=2))
    config = {
        # Editor hint (docs/config.md); SimpleTuner's parser refuses it, the plugin drops it before parsing.
        "$schema": "../../schemas/config.schema.json",
        "model_type": "lora",
        "model_family": "sdxl",
        "output_dir": str(root / "output"),
        "pretrained_model_name_or_path": str(model_dir),
        "pretrained_vae_model_name_or_path": str(model_dir / "vae"),
        "data_backend_config": str(config_dir / "multidatabackend.json"),
        "distillation_method": "lcm",
        "distillation_config": {
            "lcm": {
                "num_ddim_timesteps": 50,
                "w_min": 1.0,
                "w_max": 12.0,
                "loss_type": "l2",
                "huber_c": 0.001,
                "timestep_scaling_factor": 10.0,
            }
        },
        "resolution": IMAGE_SIZE,
        "resolution_type": "pixel",
        "minimum_image_size": IMAGE_SIZE // 2,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "max_train_steps": max_train_steps,
        "num_train_epochs": 0,
        "train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "mixed_precision": "no",
        "lora_type": "standard",
        "lora_rank": 4,
        "lora_alpha": 4,
        "lora_dropout": 0.0,
        "optimizer": "torch-adamw",
        "seed": 42,
        "validation_disable": True,
        "report_to": "simpletuner",
        "checkpoint_step_interval": 10_000,
        "push_to_hub": False,
    }
    (config_dir / "config.json").write_text(json.dumps(config, indent=2))
    return root


@pytest.fixture
def lcm_training_dir(tmp_path, tiny_sdxl_dir) -> Path:
    """A fresh run folder for 3 LCM-LoRA steps of the tiny SDXL; SimpleTuner's output lands in ./output."""
    return write_lcm_training_dir(tmp_path / "run", tiny_sdxl_dir, max_train_steps=3)


def computed_once(tmp_path_factory, name: str, compute):
    """`compute(folder)` (a JSON value) for this test session, computed once whichever pytest-xdist worker asks first,
    the others waiting on a file lock and reading it back: a module fixture that runs a trainer would otherwise run
    once on each worker its tests were spread over."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    folder = base / f"once-{name}"
    with FileLock(f"{folder}.lock"):
        answer = folder / "answer.json"
        if answer.is_file():
            return json.loads(answer.read_text())
        folder.mkdir()
        value = compute(folder)
        answer.write_text(json.dumps(value))
        return value


# trainer_site/sitecustomize.py: SimpleTuner's CUDA-graph step mark, which imports torch._inductor, skipped on a CPU.
TRAINER_SITE = Path(__file__).parent / "trainer_site"


def stock_trainer_env() -> dict[str, str]:
    """Environment for a CPU `simpletuner train`: this venv's tools first on PATH (the CLI spawns `accelerate`),
    the plugin armed with its default data path whatever the caller's environment says, and no CUDA-graph step mark
    (TRAINER_SITE)."""
    env = dict(os.environ)
    for name in ("SIMPLETUNER_LCM_DISABLE", "SIMPLETUNER_LCM_DATA_PATH"):
        env.pop(name, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MIXED_PRECISION="no")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRAINER_SITE), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def trainer_env() -> dict[str, str]:
    return stock_trainer_env()


def simpletuner_sdxl_text_model(model_dir: Path):
    """SimpleTuner's SDXL model class holding just the text encoders of `model_dir` on the CPU: enough for its
    own `_encode_prompts` / `_format_text_embedding`, the judge of every text embedding the plugin writes."""
    import torch
    from simpletuner.helpers.models.sdxl.model import SDXL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    sdxl = object.__new__(SDXL)
    sdxl.tokenizers = [CLIPTokenizer.from_pretrained(model_dir, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    sdxl.text_encoders = [
        CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder"),
        CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2"),
    ]
    sdxl.accelerator = SimpleNamespace(device=torch.device("cpu"))
    return sdxl
