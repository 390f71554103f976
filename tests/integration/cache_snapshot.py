"""Cache-build runs for bit-for-bit comparisons between two builds (kill campaign, config changes): the run folder
they start from, and what a build leaves on disk read back (store entries, manifest, SimpleTuner-format files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from lcm_plugin.cache import LatentCacheReader, check_cache
from lcm_plugin.cache_build.build import check_run
from lcm_plugin.cache_build.layout import LCM_DIR, PT_RECORD


def photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A picture with what photos have and noise lacks, so JPEG and the resize behave as on real data: smooth
    colour gradients, fine texture, and hard-edged shapes."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    corners = rng.uniform(0, 255, (3, 3))
    pixels = corners[0] + x[..., None] * (corners[1] - corners[0]) + y[..., None] * (corners[2] - corners[0])
    pixels += rng.normal(0, 6, pixels.shape)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.uniform(0, 0.7) * width, rng.uniform(0, 0.7) * height
        box = (x0, y0, x0 + rng.uniform(0.15, 0.3) * width, y0 + rng.uniform(0.15, 0.3) * height)
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return image


def write_run(root: Path, model_dir: Path, images: list[tuple[str, tuple[int, int], str]], resolution: int,
              seed: int) -> Path:
    """A run folder: each (name, (width, height), caption) of `images` as `data/<name>.jpg` (quality 90) with a
    textfile caption, one dataset at that pixel resolution without crop, and a one-step LoRA config on the tiny
    SDXL in `model_dir`."""
    rng = np.random.default_rng(seed)
    for name, (width, height), caption in images:
        path = root / "data" / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(width, height, rng).save(path, quality=90)
        path.with_suffix(".txt").write_text(caption)
    (root / "config").mkdir()
    backends = [
        {"id": "toy", "type": "local", "instance_data_dir": "data", "crop": False, "resolution": resolution,
         "resolution_type": "pixel", "minimum_image_size": 32, "cache_dir_vae": "cache/vae/toy",
         "caption_strategy": "textfile"},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    (root / "config" / "multidatabackend.json").write_text(json.dumps(backends))
    config = {
        "model_type": "lora", "model_family": "sdxl", "output_dir": "output",
        "pretrained_model_name_or_path": str(model_dir), "pretrained_vae_model_name_or_path": str(model_dir / "vae"),
        "data_backend_config": "config/multidatabackend.json", "resolution": resolution, "resolution_type": "pixel",
        "optimizer": "torch-adamw", "mixed_precision": "no", "vae_batch_size": 2, "max_train_steps": 1,
        "num_train_epochs": 0, "seed": seed,
    }
    (root / "config" / "config.json").write_text(json.dumps(config))
    return root


def committed_shards(folder: Path) -> dict[str, list[str]]:
    """shard file -> keys, for every shard the indexes of `folder` list (snapshot `index.<writer>.json` plus journal
    `index.<writer>.journal`, one shard record per line; a torn last line is not a commit)."""
    shards = {}
    for snapshot in folder.glob("index.*.json"):
        shards |= {shard["file"]: shard["keys"] for shard in json.loads(snapshot.read_text())["shards"]}
    for journal in folder.glob("index.*.journal"):
        text = journal.read_text()
        lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
        shards |= {record["file"]: record["keys"] for record in map(json.loads, filter(str.strip, lines))}
    return shards


def listed_keys(folder: Path) -> list[str]:
    """Every key of every shard the indexes list: a key stored in two shards shows twice."""
    return [key for keys in committed_shards(folder).values() for key in keys]


def store(folder: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """key -> (dtype, shape, bytes) of every entry but the SimpleTuner-file records (their names hold file stats,
    which differ between two builds); fails on a key listed twice."""
    listed = listed_keys(folder)
    assert len(listed) == len(set(listed)), "a key is stored twice"
    reader = LatentCacheReader(folder)
    return {key: (str(reader.get(key).dtype), reader.get(key).shape, reader.get(key).tobytes())
            for key in reader.keys() if PT_RECORD not in key}


def simpletuner_files(run: Path) -> dict[str, object]:
    """relative path -> content of every SimpleTuner-format file: the tensors as loaded by SimpleTuner's own
    backend (dtype, shape, strides, bytes) and the bucket JSON (with the run folder's path taken out)."""
    from simpletuner.helpers.data_backend.local import LocalDataBackend

    loader = LocalDataBackend(accelerator=None, id="toy", compress_cache=True)
    files = {}
    for path in sorted((run / "cache").rglob("*.pt")):
        value = loader.torch_load(str(path))
        tensors = value.items() if isinstance(value, dict) else [("", value)]
        files[str(path.relative_to(run))] = {
            k: (str(t.dtype), tuple(t.shape), t.stride(), t.contiguous().view(torch.uint8).numpy().tobytes())
            for k, t in tensors
        }
    for path in sorted((run / "data").glob("aspect_ratio_bucket_*.json")):
        files[str(path.relative_to(run))] = path.read_text().replace(str(run), "RUN")
    return files


def snapshot(run: Path, dataset: str = "toy") -> dict:
    return {
        "latents": store(run / "cache/vae" / dataset / LCM_DIR),
        "text": store(run / "cache/text" / LCM_DIR),
        "manifest": (run / "cache/vae" / dataset / LCM_DIR / "manifest.json").read_text().replace(str(run), "RUN"),
        "files": simpletuner_files(run),
    }


def assert_checks_pass(run: Path, dataset: str = "toy") -> None:
    """Every shard passes the full check, and the caches hold what the run's config produces."""
    for folder in (run / "cache/vae" / dataset / LCM_DIR, run / "cache/text" / LCM_DIR):
        report = check_cache(folder, full=True)
        assert report.ok, report.problems
    assert check_run(run) == []
