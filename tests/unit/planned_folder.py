"""A dataset folder written in code and planned as `cache build` plans it (scan, bucket, name), without models:
the fingerprints are fixed strings, so store keys are a function of the files alone."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from lcm_plugin.cache_build.fingerprint import Fingerprints, name_entries
from lcm_plugin.cache_build.plan import Dataset, datasets_of, read_run, scan_dataset

PRINTS = Fingerprints(latent={"vae": "v"}, latent_digest="f" * 16, text={"te": "t"}, text_digest="e" * 16,
                      latent_shape=(4, 8, "BF16"), family="sdxl")


def planned_folder(root: Path, images: dict[str, tuple[int, int]], captions: dict[str, str] | None = None,
                   **entry) -> Dataset:
    """Writes `images` (name -> (W, H); names may hold folders) with `captions` (name -> text; caption files only
    for these) under root/data, a run config around them, and returns the planned, named dataset."""
    (root / "config").mkdir(parents=True, exist_ok=True)
    data = root / "data"
    for number, (name, size) in enumerate(images.items()):
        path = data / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (number % 256, 40, 90)).save(path, format="PNG")
    for name, text in (captions or {}).items():
        (data / name).with_suffix(".txt").write_bytes(text.encode())
    strategy = "textfile" if captions is not None else "filename"
    backends = [
        {"id": "photos", "type": "local", "instance_data_dir": "data", "caption_strategy": strategy,
         "resolution": 64, "resolution_type": "pixel", "cache_dir_vae": "cache/vae"} | entry,
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    (root / "config" / "multidatabackend.json").write_text(json.dumps(backends))
    config = {"model_type": "lora", "model_family": "sdxl", "output_dir": "output",
              "pretrained_model_name_or_path": "/models/sdxl", "data_backend_config": "config/multidatabackend.json",
              "optimizer": "torch-adamw", "max_train_steps": 1, "num_train_epochs": 0}
    (root / "config" / "config.json").write_text(json.dumps(config))
    settings, entries = read_run(root)
    (dataset,) = datasets_of(settings, entries)
    scan_dataset(dataset, settings.seed)
    name_entries([dataset], PRINTS)
    return dataset
