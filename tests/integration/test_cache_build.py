"""`simpletuner-lcm cache build` on a generated dataset with the tiny SDXL: what lands in the caches, checked
against SimpleTuner's own code (file names, transforms, scaling, text encoding); kill -9 and rerun; two ranks.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cache_snapshot import listed_keys
from conftest import simpletuner_sdxl_text_model
from lcm_plugin.cache import LatentCacheReader, decode_batch, verify
from lcm_plugin.cache_build import BuildOptions, build
from lcm_plugin.cache_build.layout import (
    LCM_DIR,
    POOLED_PROMPT_EMBEDS,
    PROMPT_EMBEDS,
    PT_RECORD,
    TIME_IDS,
    text_entry,
)
from lcm_plugin.cache_build.fingerprint import digest
from lcm_plugin.cache_build.encode import sample_seed

BIN = Path(sys.executable).parent
WORDS = ("red", "blue", "circle", "square", "photo")
SIZES = ((160, 128), (128, 160), (128, 128))  # three buckets at resolution 128
GOOD = 30  # RGB images; plus the odd ones below
SHARD_BYTES = 2048  # about one latent per shard: many commits to kill between


def write_dataset(folder: Path) -> list[str]:
    """Images with textfile captions, the same bytes on every call; returns the keys of the decodable ones.

    Odd ones: grayscale, RGBA, palette and 16-bit PNGs, a JPEG in a subfolder (cache names keep the subfolder),
    a file that is no image, and a JPEG cut after its header (the scan passes, the decode fails).
    """
    rng = np.random.default_rng(7)
    (folder / "sub").mkdir(parents=True)
    keys = []

    def save(image: Image.Image, key: str, caption: str, **kwargs) -> None:
        image.save(folder / key, **kwargs)
        (folder / key).with_suffix(".txt").write_text(caption)
        keys.append(key)

    for i in range(GOOD):
        w, h = SIZES[i % 3]
        pixels = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((w, h), Image.BILINEAR)
        save(image, f"img{i:02d}.png", f"{WORDS[i % 2]} {WORDS[2 + i % 2]}" + ("\nphoto" if i % 5 == 0 else ""))
    save(Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8), "L"), "gray.png", "photo")
    save(Image.fromarray(rng.integers(0, 256, (160, 128, 4), dtype=np.uint8), "RGBA"), "rgba.png", "red photo")
    save(Image.fromarray(rng.integers(0, 256, (128, 160, 3), dtype=np.uint8)).quantize(16), "palette.png", "blue")
    save(Image.fromarray(rng.integers(0, 65535, (128, 128), dtype=np.uint16)), "deep.png", "square photo")
    save(Image.fromarray(rng.integers(0, 256, (128, 160, 3), dtype=np.uint8)), "sub/nested.jpg", "red", quality=90)
    (folder / "notes.png").write_bytes(b"this is not an image")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (folder / "cut.jpg").write_bytes(buffer.getvalue()[:400])
    (folder / "cut.txt").write_text("red")
    Image.new("RGB", (128, 128)).save(folder / "uncaptioned.png")
    return keys


BROKEN = ("notes.png", "cut.jpg", "uncaptioned.png")


def write_run(root: Path, model_dir: Path) -> Path:
    """A run folder (config/config.json, config/multidatabackend.json, data/) for 128-px buckets of the tiny SDXL."""
    write_dataset(root / "data")
    (root / "config").mkdir()
    backends = [
        {
            "id": "toy",
            "type": "local",
            "instance_data_dir": "data",
            "crop": False,
            "resolution": 128,
            "resolution_type": "pixel",
            "minimum_image_size": 64,
            "cache_dir_vae": "cache/vae/toy",
            "caption_strategy": "textfile",
        },
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    (root / "config" / "multidatabackend.json").write_text(json.dumps(backends))
    config = {
        "model_type": "lora",
        "model_family": "sdxl",
        "output_dir": "output",
        "pretrained_model_name_or_path": str(model_dir),
        "pretrained_vae_model_name_or_path": str(model_dir / "vae"),
        "data_backend_config": "config/multidatabackend.json",
        "resolution": 128,
        "resolution_type": "pixel",
        "optimizer": "torch-adamw",
        "mixed_precision": "no",
        "vae_batch_size": 2,
        "max_train_steps": 1,
        "num_train_epochs": 0,
        "seed": 3,
    }
    (root / "config" / "config.json").write_text(json.dumps(config))
    return root


def cli_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def build_command(run: Path) -> list[str]:
    return [str(BIN / "simpletuner-lcm"), "cache", "build", str(run), "--format", "simpletuner", "--shard-mb",
            str(SHARD_BYTES / (1 << 20))]


def lcm_keys(folder: Path) -> list[str]:
    """Every entry key the indexes of `folder` list (a key listed twice shows twice), without the records of
    SimpleTuner-format files (their names hold file stats, which differ between two builds)."""
    return [key for key in listed_keys(folder) if PT_RECORD not in key]


def manifest_of(run: Path) -> dict:
    return json.loads((run / "cache/vae/toy" / LCM_DIR / "manifest.json").read_text())


def latent_keys(run: Path) -> dict[str, str]:
    """image key -> latent key in the store, from the manifest."""
    return {entry["image"]: entry["key"] for entry in manifest_of(run)["images"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from lcm_plugin.tiny_sdxl import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"), seed=0, vocabulary=WORDS)


@pytest.fixture(scope="module")
def simpletuner_vae(model_dir):
    """The run's VAE as SimpleTuner's trainer holds it on this host: its ModelFoundation.load_vae, for config.json
    without vae_dtype (SimpleTuner's "bf16"), on the device its Accelerator gets here (a CPU host: the plain CPU,
    where it leaves the VAE in fp32; an accelerator: there, in bf16)."""
    from simpletuner.helpers.models.sdxl.model import SDXL

    from lcm_plugin.cache_build.encode import device

    sdxl = object.__new__(SDXL)
    sdxl.config = SimpleNamespace(
        model_family="sdxl", vae_path=str(model_dir / "vae"), pretrained_model_name_or_path=str(model_dir),
        vae_dtype="bf16", revision=None, variant=None, delete_model_after_load=False, vae_enable_tiling=False,
        vae_enable_slicing=False, ramtorch=False,
    )
    sdxl.accelerator = SimpleNamespace(device=device())  # accelerate's, per test_cache_build_dtypes.py
    sdxl._single_file_component_cache = None
    sdxl.load_vae(move_to_device=True)  # as Trainer.init_vae calls it
    return sdxl.vae


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir):
    """An uninterrupted single-process build with --format simpletuner: (run folder, report)."""
    torch.set_num_threads(1)
    run = write_run(tmp_path_factory.mktemp("reference"), model_dir)
    report = build(BuildOptions(run, simpletuner_format=True, shard_bytes=SHARD_BYTES), log=print)
    return run, report


def good_keys(run: Path) -> list[str]:
    data = run / "data"
    return sorted(
        p.relative_to(data).as_posix() for p in data.rglob("*") if p.suffix in (".png", ".jpg") and p.name not in BROKEN
    )


def test_every_image_is_cached_once_and_broken_files_are_reported(reference):
    run, report = reference
    keys = lcm_keys(run / "cache/vae/toy" / LCM_DIR)
    expected = good_keys(run)
    assert len(expected) == GOOD + 5
    stored = latent_keys(run)
    assert sorted(stored) == expected and all(stored[k].startswith(k + "@") for k in expected)
    assert sorted(keys) == sorted(list(stored.values()) + [k + TIME_IDS for k in stored.values()])
    reasons = {Path(path).name: reason for path, reason in report.failed}
    assert set(reasons) == set(BROKEN)
    assert all(Path(name).stem in reasons[name] for name in BROKEN), reasons  # each message names its file
    assert report.encoded == len(expected) and report.reused == 0
    assert verify(run / "cache/vae/toy" / LCM_DIR) == [] and verify(run / "cache/text" / LCM_DIR) == []


def test_latents_are_simpletuner_scaled_vae_samples(reference, simpletuner_vae):
    """Oracle: SimpleTuner's VAE as its trainer loads it here (device, dtype), its SDXL transforms and
    VaeLatentScalingMixin, on the same pixels and noise."""
    from simpletuner.helpers.models.foundation_mixins import VaeLatentScalingMixin
    from simpletuner.helpers.models.sdxl.model import SDXL

    run, _ = reference
    vae = simpletuner_vae
    # bf16 rounding of a two-step encode, or fp32 (a CPU host) where only the kernels' summation order differs.
    tolerance = dict(atol=0.05, rtol=0.02) if vae.dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    transform = SDXL.get_transforms(object.__new__(SDXL))
    manifest = manifest_of(run)
    metadata = json.loads((run / "data/aspect_ratio_bucket_metadata_toy.json").read_text())
    reader = LatentCacheReader(run / "cache/vae/toy" / LCM_DIR)
    for entry in manifest["images"][::4]:
        path = run / "data" / entry["image"]
        meta = metadata[str(path)]
        pixels, ok, _ = decode_batch([str(path)], [tuple(meta["intermediary_size"])],
                                     [tuple(meta["crop_coordinates"])], tuple(meta["target_size"]))
        assert ok == [0]
        sample = transform(Image.fromarray(pixels[0]))[None].to(vae.device, vae.dtype)
        with torch.no_grad():
            posterior = vae.encode(sample).latent_dist
        noise = torch.randn(posterior.mean.shape[1:], dtype=vae.dtype,
                            generator=torch.Generator().manual_seed(sample_seed(3, entry["image"])))
        latent = posterior.mean + posterior.std * noise.to(vae.device)
        expected = VaeLatentScalingMixin().scale_vae_latents_for_cache(latent, vae)[0].cpu()
        got = reader.get_torch(entry["key"])
        w, h = meta["target_size"]
        assert got.dtype == expected.dtype == vae.dtype and tuple(got.shape) == (4, h // 8, w // 8)
        torch.testing.assert_close(got.float(), expected.float(), **tolerance)
        # A sample, not the mode.
        mode = (posterior.mean[0] * vae.config.scaling_factor).float().cpu()
        assert not torch.allclose(got.float(), mode, atol=1e-3)
        assert reader.get(entry["key"] + TIME_IDS).tolist() == [
            meta["original_size"][1], meta["original_size"][0], *meta["crop_coordinates"],
            meta["target_size"][1], meta["target_size"][0],
        ]


def test_simpletuner_vae_files_have_its_names_and_hold_the_cached_latents(reference, simpletuner_vae):
    from simpletuner.helpers.caching.vae import VAECache
    from simpletuner.helpers.data_backend.local import LocalDataBackend

    run, _ = reference
    oracle = object.__new__(VAECache)
    oracle.image_data_backend = SimpleNamespace()
    oracle.hash_filenames = True
    oracle.instance_data_dir = str(run / "data")
    oracle.cache_dir = str(run / "cache/vae/toy")
    backend = LocalDataBackend(accelerator=None, id="toy", compress_cache=True)  # compress_disk_cache default
    reader = LatentCacheReader(run / "cache/vae/toy" / LCM_DIR)
    stored = latent_keys(run)
    expected_files = set()
    for key in good_keys(run):
        filename, _ = oracle.generate_vae_cache_filename(str(run / "data" / key))
        expected_files.add(Path(filename))
        stored_file = backend.torch_load(filename)
        # The dtype SimpleTuner's VAE encodes in on this host (fp32 on a CPU, bf16 on an accelerator).
        assert stored_file.dtype == simpletuner_vae.dtype and stored_file.shape[0] == 4 and stored_file.ndim == 3
        assert torch.equal(stored_file, reader.get_torch(stored[key]))
    assert set((run / "cache/vae/toy").rglob("*.pt")) == expected_files
    assert any(p.parent.name == "sub" for p in expected_files)


def test_simpletuner_text_files_have_its_names_and_its_encoding(reference, model_dir):
    from simpletuner.helpers.caching.text_embeds import TextEmbeddingCache
    from simpletuner.helpers.data_backend.local import LocalDataBackend
    from simpletuner.helpers.models.sdxl.model import SDXL

    run, _ = reference
    sdxl = simpletuner_sdxl_text_model(model_dir)
    namer = object.__new__(TextEmbeddingCache)
    namer.batch_write_thread = SimpleNamespace(is_alive=lambda: False)
    namer.model, namer.model_type, namer.key_type = sdxl, "sdxl", sdxl.text_embed_cache_key()
    namer._requires_path_based_keys = False
    backend = LocalDataBackend(accelerator=None, id="text", compress_cache=True)
    reader = LatentCacheReader(run / "cache/text" / LCM_DIR)
    captions = {"", "photo", "red photo", "blue", "square photo", "red"}
    captions |= {f"{WORDS[i % 2]} {WORDS[2 + i % 2]}" for i in range(4)}
    files = set()
    for caption in sorted(captions):
        filename = run / "cache/text" / (namer.create_hash(caption) + ".pt")
        files.add(filename)
        stored = backend.torch_load(str(filename))
        with torch.no_grad():
            expected = SDXL._format_text_embedding(sdxl, SDXL._encode_prompts(sdxl, [caption]))
        assert stored.keys() == expected.keys()
        for name in stored:
            assert stored[name].shape == expected[name].shape and stored[name].dtype == torch.float32  # no mixed precision
            torch.testing.assert_close(stored[name], expected[name], atol=1e-5, rtol=1e-5)
        key = text_entry(caption, digest(manifest_of(run)["text_fingerprint"]))
        assert torch.equal(reader.get_torch(key + PROMPT_EMBEDS), stored["prompt_embeds"][0])
        assert torch.equal(reader.get_torch(key + POOLED_PROMPT_EMBEDS), stored["pooled_prompt_embeds"])
    assert set((run / "cache/text").glob("*.pt")) == files


def test_bucket_metadata_lists_the_encoded_images(reference):
    run, _ = reference
    indices = json.loads((run / "data/aspect_ratio_bucket_indices_toy.json").read_text())
    metadata = json.loads((run / "data/aspect_ratio_bucket_metadata_toy.json").read_text())
    listed = sorted(p for paths in indices["aspect_ratio_bucket_indices"].values() for p in paths)
    assert listed == sorted(str(run / "data" / key) for key in good_keys(run)) == sorted(metadata)
    for bucket, paths in indices["aspect_ratio_bucket_indices"].items():
        for path in paths:
            w, h = metadata[path]["target_size"]
            assert bucket == str(metadata[path]["aspect_ratio"]) and w % 64 == 0 and h % 64 == 0


def test_killed_build_resumes_without_redoing_committed_shards(tmp_path, model_dir, reference):
    run = write_run(tmp_path / "run", model_dir)
    latents_dir = run / "cache/vae/toy" / LCM_DIR
    process = subprocess.Popen(build_command(run), env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (latents_dir / "rank0-00002.safetensors").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    committed = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in latents_dir.glob("*.safetensors")}
    before = lcm_keys(latents_dir)
    assert 0 < len(before) < 2 * len(good_keys(run)), "the kill did not land mid-way"

    rerun = build(BuildOptions(run, simpletuner_format=True, shard_bytes=SHARD_BYTES), log=print)
    # Only the latents that no committed shard holds were encoded again.
    assert rerun.encoded == len(good_keys(run)) - len([k for k in before if not k.endswith(TIME_IDS)])
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in latents_dir.glob("*.safetensors")}
    assert {name: after[name] for name in committed} == committed  # committed shards untouched
    keys = lcm_keys(latents_dir)
    assert len(keys) == len(set(keys)) and set(before) <= set(keys)
    assert verify(latents_dir) == [] and verify(run / "cache/text" / LCM_DIR) == []
    check = subprocess.run([str(BIN / "simpletuner-lcm"), "cache", "verify", str(run)], env=cli_env(),
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.count(": OK:") == 3, check.stdout + check.stderr  # 2 stores + the run
    assert_same_latents(run, reference[0])


def assert_same_latents(run: Path, reference_run: Path) -> None:
    """Latents and SimpleTuner files of `run` equal those of the uninterrupted reference build, image by image,
    under the same keys (each holds its image's content hash, not the file's path or times)."""
    ours = LatentCacheReader(run / "cache/vae/toy" / LCM_DIR)
    theirs = LatentCacheReader(reference_run / "cache/vae/toy" / LCM_DIR)
    our_keys, their_keys = latent_keys(run), latent_keys(reference_run)
    assert our_keys == their_keys
    assert len(lcm_keys(run / "cache/vae/toy" / LCM_DIR)) == 2 * len(our_keys)
    for image, key in their_keys.items():
        assert torch.equal(ours.get_torch(our_keys[image]), theirs.get_torch(key)), image
    files = sorted(p.relative_to(reference_run) for p in (reference_run / "cache").rglob("*.pt"))
    assert files == sorted(p.relative_to(run) for p in (run / "cache").rglob("*.pt"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_the_work_and_encode_each_image_once(tmp_path, model_dir, reference):
    # accelerate's --multi_gpu launcher is torchrun; on a host without GPUs the ranks talk over gloo.
    run = write_run(tmp_path / "run", model_dir)
    command = [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "lcm_plugin.cli", *build_command(run)[1:],
    ]
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    encoded = [int(n) for n in re.findall(r"cache build \(rank \d\): (\d+) image\(s\) encoded \(", result.stderr)]
    assert len(encoded) == 2 and all(n > 0 for n in encoded) and sum(encoded) == len(good_keys(run)), encoded
    for folder in (run / "cache/vae/toy" / LCM_DIR, run / "cache/text" / LCM_DIR):
        assert sorted(p.name for p in folder.glob("index.*.json")) == ["index.rank0.json", "index.rank1.json"]
        keys = lcm_keys(folder)
        assert len(keys) == len(set(keys))
    assert_same_latents(run, reference[0])
    assert (run / "data/aspect_ratio_bucket_indices_toy.json").read_text() == (
        reference[0] / "data/aspect_ratio_bucket_indices_toy.json"
    ).read_text().replace(str(reference[0]), str(run))
