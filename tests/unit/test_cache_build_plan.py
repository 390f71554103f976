"""cache build inputs: config reading, clear errors naming file and key, captions, batches, time_ids (no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lcm_plugin.cache_build.layout import time_ids
from lcm_plugin.cache import scan_inventory
from lcm_plugin.cache_build.plan import BuildError, captions_of, datasets_of, read_run, vae_batches


def write_config(root: Path, backends: list, **config) -> Path:
    (root / "config").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "config" / "multidatabackend.json").write_text(json.dumps(backends))
    base = {
        "model_type": "lora",
        "model_family": "sdxl",
        "output_dir": "output",
        "pretrained_model_name_or_path": "/models/sdxl",
        "data_backend_config": "config/multidatabackend.json",
        "optimizer": "torch-adamw",
        "max_train_steps": 1,
        "num_train_epochs": 0,
    }
    (root / "config" / "config.json").write_text(json.dumps(base | config))
    return root


IMAGES = {"id": "photos", "type": "local", "instance_data_dir": "data", "caption_strategy": "textfile"}
TEXT = {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"}


def test_settings_follow_simpletuner_defaults_and_paths_resolve_from_the_run_folder(tmp_path, monkeypatch):
    root = write_config(tmp_path, [IMAGES, TEXT])
    # The VAE dtype is the one SimpleTuner's trainer gives it on the device accelerate picks: converted to bf16
    # when it moves the VAE (an accelerator, or cpu:0 under `accelerate launch --cpu` with several processes),
    # left in fp32 on the plain CPU it loads on (test_cache_build_dtypes.py checks that rule against SimpleTuner).
    monkeypatch.setenv("ACCELERATE_TORCH_DEVICE", "cpu:0")
    settings, entries = read_run(root)
    assert settings.root == root and settings.vae_dtype == "bf16" and settings.text_dtype == "bf16"
    monkeypatch.setenv("ACCELERATE_TORCH_DEVICE", "cpu")
    on_cpu, _ = read_run(root)
    assert on_cpu.vae_dtype == "fp32" and on_cpu.text_dtype == "bf16"  # weight_dtype does not follow the device
    assert replace(on_cpu, vae_dtype="bf16") == settings  # and nothing else does
    assert settings.vae_batch_size == 4 and settings.aspect_bucket_alignment == 64
    assert settings.vae_path == "madebyollin/sdxl-vae-fp16-fix"  # SimpleTuner's default SDXL VAE
    (dataset,) = datasets_of(settings, entries)
    assert dataset.data_dir == root / "data" and dataset.text_cache_dir == root / "cache" / "text"
    assert dataset.vae_cache_dir == root / "output" / "cache" / "vae" / "sdxl" / "photos"  # SimpleTuner's default
    assert dataset.compress_vae and dataset.compress_text  # compress_disk_cache defaults to true
    assert dataset.bucket_config["resolution_type"] == "pixel_area"  # inherited from config.json's default


def test_vae_dtype_fp32_is_kept_and_mixed_precision_no_gives_fp32_text(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_TORCH_DEVICE", "cpu:0")  # a device where SimpleTuner converts the VAE
    settings, _ = read_run(write_config(tmp_path, [IMAGES, TEXT], vae_dtype="fp32", mixed_precision="no"))
    assert settings.vae_dtype == "fp32" and settings.text_dtype == "fp32"


@pytest.mark.parametrize(
    "backends, config, expected",
    [
        ([IMAGES | {"type": "aws"}, TEXT], {}, "multidatabackend.json: "),
        ([IMAGES | {"instance_data_dir": "nowhere"}, TEXT], {}, "/0/instance_data_dir: folder"),
        ([IMAGES | {"caption_strategy": "parquet", "metadata_backend": "parquet"}, TEXT], {}, "/0/"),
        ([IMAGES], {}, "no text_embeds dataset with a cache_dir for 'photos'"),
        ([IMAGES, TEXT], {"vae_dtype": "fp16"}, "/vae_dtype: fp16"),
        ([IMAGES, TEXT], {"no_such_option": 1}, "/no_such_option: unknown key"),
        ([TEXT], {}, "no enabled image"),
    ],
)
def test_bad_input_is_refused_with_the_file_and_key(tmp_path, backends, config, expected):
    root = write_config(tmp_path, backends, **config)
    with pytest.raises(BuildError, match=None) as error:
        settings, entries = read_run(root)
        datasets_of(settings, entries)
    assert expected in str(error.value)
    assert str(root / "config") in str(error.value)


def test_cli_prints_one_clear_line_and_no_traceback(tmp_path):
    root = write_config(tmp_path, [IMAGES | {"instance_data_dir": "nowhere"}, TEXT])
    result = subprocess.run(
        [sys.executable, "-m", "lcm_plugin.cli", "cache", "build", str(root)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("simpletuner-lcm cache build: ") and "instance_data_dir" in result.stderr
    verify = subprocess.run(
        [sys.executable, "-m", "lcm_plugin.cli", "cache", "verify", str(tmp_path / "missing")],
        capture_output=True, text=True,
    )
    assert verify.returncode == 1 and "Traceback" not in verify.stderr and "no config.json" in verify.stderr


def test_textfile_captions_split_lines_like_simpletuner(tmp_path):
    from simpletuner.helpers.data_backend.local import LocalDataBackend
    from simpletuner.helpers.prompts import PromptHandler

    root = write_config(tmp_path, [IMAGES | {"prepend_instance_prompt": True, "instance_prompt": "sks"}, TEXT])
    (root / "data" / "a.png").write_bytes(b"")
    settings, entries = read_run(root)
    (dataset,) = datasets_of(settings, entries)
    # Windows and old-Mac line ends too: SimpleTuner reads bytes, so a lone "\r" does not split a caption.
    for text in (b"a red circle\n\n on white \n", b"a red circle\r\non white\r\n", b"a red circle\ron white"):
        (root / "data" / "a.txt").write_bytes(text)
        expected = PromptHandler.prepare_instance_prompt_from_textfile(
            str(root / "data" / "a.png"), use_captions=True, prepend_instance_prompt=True,
            data_backend=LocalDataBackend(accelerator=None, id="photos"), instance_prompt="sks",
        )
        expected = [expected] if isinstance(expected, str) else expected
        (read,) = scan_inventory(root / "data", [".png"], ".txt").captions  # the bytes as the scan reads them
        assert captions_of(root / "data" / "a.png", dataset, read) == tuple(c.strip() for c in expected), text
    with pytest.raises(BuildError, match="caption file .*b.txt missing"):
        captions_of(root / "data" / "b.png", dataset, None)


def test_batches_hold_one_bucket_and_every_image_once(tmp_path):
    from planned_folder import planned_folder

    dataset = planned_folder(tmp_path, {f"{i}.png": (64, 64) if i % 3 else (128, 64) for i in range(11)})
    batches = vae_batches([dataset], batch_size=3)
    assert all(len({it.sample["bucket"] for it in b.items}) == 1 and len(b.items) == len(b) <= 3 for b in batches)
    assert sorted(it.key for b in batches for it in b.items) == sorted(it.key for it in dataset.images)
    # buckets in order of first appearance (scan order: 0.png, 1.png, 10.png, ...), images in scan order within each
    wide, square = dataset.images[0].sample["bucket"], dataset.images[1].sample["bucket"]
    assert wide != square and [b.bucket for b in batches] == [wide, wide, square, square, square]
    assert [it.key for it in batches[0].items] == ["0.png", "3.png", "6.png"]


def test_time_ids_are_sdxl_order():
    # diffusers' StableDiffusionXLPipeline._get_add_time_ids: original_size + crops_coords_top_left + target_size,
    # each (height, width); our samples hold sizes as (width, height).
    sample = {"original_size": (300, 200), "crop_coordinates": (5, 7), "target_size": (192, 128)}
    assert time_ids(sample) == [200, 300, 5, 7, 128, 192]
