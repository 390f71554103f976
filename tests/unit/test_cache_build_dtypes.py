"""The device and dtypes a cache build gives its models (cache_build/encode.py's rules, which plan.read_run records
in the fingerprints) against the code that decides them in the trainer: SimpleTuner 4.10.1's
`ModelFoundation.load_vae` / `load_text_encoder` and `parse_cmdline_args` (weight_dtype), accelerate's
`Accelerator` state (the device). An accelerator host is judged through `meta` where SimpleTuner's code only asks
whether its device is the CPU's, and by the rule's text where accelerate asks torch for a GPU."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lcm_plugin.cache_build.encode import (
    CPU_WORLD_SIZE_VARIABLES,
    DTYPES,
    device,
    load_text_encoders,
    load_vae,
    trainer_device,
    vae_dtype_on,
)
from lcm_plugin.cache_build.plan import read_run
from lcm_plugin.tiny_sdxl import save_tiny_sdxl

CPU, MULTI_CPU, ACCELERATOR = torch.device("cpu"), torch.device("cpu", 0), torch.device("meta")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"), seed=0, vocabulary=("red", "circle"))


def simpletuner_sdxl(config: dict, where: torch.device):
    """SimpleTuner's SDXL model object with just what its load_vae / load_text_encoder read, its accelerator on
    `where`."""
    from simpletuner.helpers.models.sdxl.model import SDXL

    sdxl = object.__new__(SDXL)
    defaults = dict(model_family="sdxl", revision=None, variant=None, delete_model_after_load=False,
                    vae_enable_tiling=False, vae_enable_slicing=False, ramtorch=False)
    sdxl.config = SimpleNamespace(**(defaults | config))
    sdxl.accelerator = SimpleNamespace(device=where)
    sdxl._single_file_component_cache = None
    return sdxl


@pytest.mark.parametrize("where", [CPU, MULTI_CPU, ACCELERATOR], ids=["cpu", "multi-cpu", "accelerator"])
@pytest.mark.parametrize("vae_dtype", ["bf16", "default", "fp32"])  # "bf16" is SimpleTuner's value for no key
def test_vae_dtype_is_the_one_simpletuners_load_vae_leaves(model_dir, where, vae_dtype):
    sdxl = simpletuner_sdxl({"vae_path": str(model_dir / "vae"), "pretrained_model_name_or_path": str(model_dir),
                             "vae_dtype": vae_dtype}, where)
    sdxl.load_vae(move_to_device=True)  # as Trainer.init_vae calls it
    assert DTYPES[vae_dtype_on(where, vae_dtype)] == sdxl.vae.dtype


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_builds_models_are_simpletuners_on_this_host(model_dir, dtype):
    """The same device, dtype and weights as SimpleTuner's load_vae / load_text_encoder give here (on a CPU: the
    VAE in fp32 whatever vae_dtype says, the text encoders in weight_dtype)."""
    where = device()
    vae = load_vae(str(model_dir / "vae"), vae_dtype_on(where, dtype))
    sdxl = simpletuner_sdxl({"vae_path": str(model_dir / "vae"), "pretrained_model_name_or_path": str(model_dir),
                             "vae_dtype": dtype, "weight_dtype": DTYPES[dtype]}, where)
    sdxl.load_vae(move_to_device=True)
    assert vae.dtype == sdxl.vae.dtype and vae.device == sdxl.vae.device
    for ours, theirs in zip(vae.state_dict().values(), sdxl.vae.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

    _, encoders = load_text_encoders(str(model_dir), dtype)
    sdxl.load_text_encoder(move_to_device=True)
    for ours, theirs in zip(encoders, sdxl.text_encoders, strict=True):
        assert ours.dtype == theirs.dtype == DTYPES[dtype] and ours.device == theirs.device
        for mine, simpletuners in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
            torch.testing.assert_close(mine, simpletuners, rtol=0, atol=0)


def write_run(root: Path, **config) -> Path:
    (root / "config").mkdir(parents=True)
    (root / "data").mkdir()
    backends = [
        {"id": "photos", "type": "local", "instance_data_dir": "data", "caption_strategy": "textfile"},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    (root / "config" / "multidatabackend.json").write_text(json.dumps(backends))
    base = {"model_family": "sdxl", "output_dir": "output", "pretrained_model_name_or_path": "/models/sdxl",
            "data_backend_config": "config/multidatabackend.json", "optimizer": "torch-adamw",
            "max_train_steps": 1, "num_train_epochs": 0}
    (root / "config" / "config.json").write_text(json.dumps(base | config))
    return root


def simpletuners_weight_dtype(config: dict) -> torch.dtype | None:
    """args.weight_dtype after SimpleTuner's JSON mapping and parser, None when it refuses the config."""
    from simpletuner.helpers.configuration.cmd_args import parse_cmdline_args
    from simpletuner.helpers.configuration.json_file import normalize_args

    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return parse_cmdline_args(input_args=normalize_args(config), exit_on_error=True).weight_dtype
    except (SystemExit, ValueError):
        return None
    finally:
        logging.disable(logging.NOTSET)


# mixed_precision x model_type x base_model_precision x base_model_default_dtype (a quantised LoRA base takes bf16)
PRECISIONS = list(itertools.product(("no", "bf16", "fp16"), ("lora", "full"), ("no_change", "int8-quanto"),
                                    ("bf16", "fp32")))


@pytest.mark.parametrize("mixed_precision, model_type, base_model_precision, base_model_default_dtype", PRECISIONS)
def test_text_dtype_is_simpletuners_weight_dtype(tmp_path, monkeypatch, mixed_precision, model_type,
                                                 base_model_precision, base_model_default_dtype):
    # The launcher's variables disagree with config.json on purpose: SimpleTuner's dtype does not read them.
    monkeypatch.setenv("MIXED_PRECISION", "fp16")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    config = dict(mixed_precision=mixed_precision, model_type=model_type, base_model_precision=base_model_precision,
                  base_model_default_dtype=base_model_default_dtype)
    settings, _ = read_run(write_run(tmp_path, **config))
    monkeypatch.chdir(tmp_path)
    expected = simpletuners_weight_dtype(json.loads((tmp_path / "config" / "config.json").read_text()))
    assert expected is not None, "SimpleTuner refuses the config"
    assert DTYPES[settings.text_dtype] == expected


def test_quantised_text_encoders_are_refused_naming_the_file_and_key(tmp_path):
    from lcm_plugin.cache_build.plan import BuildError

    root = write_run(tmp_path, model_type="lora", text_encoder_2_precision="int8-quanto")
    with pytest.raises(BuildError, match=r"config\.json: /text_encoder_2_precision: 'int8-quanto' quantises"):
        read_run(root)


@pytest.mark.parametrize("vae_dtype", [None, "fp32"])  # None: no key, as the seed
def test_read_run_records_the_vae_dtype_simpletuner_gives_on_this_host(tmp_path, model_dir, vae_dtype):
    settings, _ = read_run(write_run(tmp_path, model_type="lora", **({"vae_dtype": vae_dtype} if vae_dtype else {})))
    sdxl = simpletuner_sdxl({"vae_path": str(model_dir / "vae"), "pretrained_model_name_or_path": str(model_dir),
                             "vae_dtype": vae_dtype or "bf16"}, device())
    sdxl.load_vae(move_to_device=True)
    assert DTYPES[settings.vae_dtype] == sdxl.vae.dtype


# Processes as launchers start them, with the device accelerate gives each on a CPU-only host.
LAUNCHES = {
    "plain": {},  # cpu
    "accelerate launch, 1 process": {"ACCELERATE_USE_CPU": "False"},  # cpu
    # --multi_gpu on a host without a GPU: accelerate finds none and runs each rank as a single process (cpu).
    "accelerate launch --multi_gpu": {"ACCELERATE_USE_CPU": "False", "LOCAL_RANK": "0", "RANK": "0",
                                      "WORLD_SIZE": "1"},
    # With --cpu: MULTI_CPU ranks over gloo, on cpu:0, where SimpleTuner converts its VAE.
    "accelerate launch --cpu --multi_gpu": {"ACCELERATE_USE_CPU": "true", "LOCAL_RANK": "0", "RANK": "0",
                                            "WORLD_SIZE": "1"},
    "ACCELERATE_TORCH_DEVICE": {"ACCELERATE_TORCH_DEVICE": "meta"},
}
PROBE = "from accelerate import Accelerator; print(Accelerator().device)"  # as SimpleTuner's trainer makes it
LAUNCH_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", *CPU_WORLD_SIZE_VARIABLES)


def test_trainer_device_is_the_one_accelerate_gives_on_this_host():
    from accelerate.utils import get_torch_accelerator_backend

    accelerator, module = get_torch_accelerator_backend()
    count = module.device_count() if module is not None else 0
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_") and k not in LAUNCH_VARIABLES}
    clean |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}  # a world of one: its store takes any free port
    probes = {name: subprocess.Popen([sys.executable, "-c", PROBE], env=clean | env, stdout=subprocess.PIPE, text=True)
              for name, env in LAUNCHES.items()}
    for name, env in LAUNCHES.items():
        out, _ = probes[name].communicate(timeout=120)
        assert probes[name].returncode == 0, name
        assert trainer_device(env, accelerator, count) == torch.device(out.strip()), name
    assert device() == trainer_device(os.environ, accelerator, count)


@pytest.mark.parametrize(
    "env, accelerator, count, expected",
    [
        ({}, "cuda", 1, torch.device("cuda")),  # default_device
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, "cuda", 2, torch.device("cuda", 1)),  # MULTI_GPU: set_device
        ({"LOCAL_RANK": "3", "WORLD_SIZE": "4"}, "cuda", 2, torch.device("cuda", 1)),  # LOCAL_RANK % count
        ({"ACCELERATE_USE_CPU": "true"}, "cuda", 1, torch.device("cpu")),  # --cpu, one process
        ({"ACCELERATE_USE_CPU": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "cuda", 1, torch.device("cpu", 0)),
        ({"ACCELERATE_USE_CPU": "yes", "PMI_SIZE": "2"}, None, 0, torch.device("cpu", 0)),  # MPI world size
        ({"ACCELERATE_USE_CPU": "yes", "PMI_SIZE": "1", "WORLD_SIZE": "2"}, None, 0, torch.device("cpu")),  # first set
        ({"ACCELERATE_TORCH_DEVICE": "cuda:3"}, "cuda", 4, torch.device("cuda", 3)),
    ],
)
def test_trainer_device_on_an_accelerator_host_follows_accelerate(env, accelerator, count, expected):
    """accelerate's answers read in its code (AcceleratorState, PartialState._prepare_backend / set_device /
    default_device): a GPU host cannot be probed here."""
    assert trainer_device(env, accelerator, count) == expected
    # And the VAE dtype there, with config.json's vae_dtype absent (SimpleTuner's "bf16") or fp32.
    assert vae_dtype_on(expected, "bf16") == ("fp32" if expected == CPU else "bf16")
    assert vae_dtype_on(expected, "fp32") == "fp32"
