"""A dataset with `metadata_backend: parquet` and `caption_strategy: parquet` inside the stock `simpletuner train`:
the plugin's path plans it from the table (no caption file exists), serves it from the shards, and SimpleTuner's
own path on the same data is the judge: the same buckets and image metadata, the same captions (the md5 names of
its text cache files)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lcm_plugin.cache_build.manifest import read_manifest

from conftest import stock_trainer_env, write_lcm_training_dir
from test_simpletuner_train import assert_lcm_run, run_stock_trainer

SERVED_LINE = "datasets 'shapes' read latents and text embeddings from the memory-mapped caches"


def parquet_run(root: Path, model_dir: Path) -> Path:
    """conftest's LCM run, its captions moved from the .txt files into `meta.parquet` (ids without extension)."""
    run = write_lcm_training_dir(root, model_dir, max_train_steps=3)
    data = run / "data"
    captions = {path.stem: path.read_text() for path in sorted(data.glob("*.txt"))}
    for path in data.glob("*.txt"):
        path.unlink()
    pq.write_table(pa.table({
        "id": list(captions),
        "caption": [f"  {caption}  " for caption in captions.values()],  # SimpleTuner strips them
        "width": [64] * len(captions),
        "height": [64] * len(captions),
    }), run / "meta.parquet")
    backend_file = run / "config" / "multidatabackend.json"
    entries = json.loads(backend_file.read_text())
    entries[0] |= {"metadata_backend": "parquet", "caption_strategy": "parquet",
                   "parquet": {"path": str(run / "meta.parquet"), "filename_column": "id", "caption_column": "caption"}}
    backend_file.write_text(json.dumps(entries, indent=2))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sdxl_dir):
    """The same parquet run on the plugin's path and on SimpleTuner's own."""
    ours = parquet_run(tmp_path_factory.mktemp("ours") / "run", tiny_sdxl_dir)
    theirs = tmp_path_factory.mktemp("theirs") / "run"
    shutil.copytree(ours, theirs)
    for file in (theirs / "config" / "multidatabackend.json", theirs / "config" / "config.json"):
        file.write_text(file.read_text().replace(str(ours), str(theirs)))
    our_log = run_stock_trainer(ours, stock_trainer_env())
    their_log = run_stock_trainer(theirs, stock_trainer_env() | {"SIMPLETUNER_LCM_DATA_PATH": "simpletuner"})
    return ours, our_log, theirs, their_log


def bucket_files(run: Path) -> tuple[dict, dict]:
    """SimpleTuner's bucket index ({bucket: sorted file names}) and metadata ({file name: entry}) of the run."""
    data = run / "data"
    indices = json.loads((data / "aspect_ratio_bucket_indices_shapes.json").read_text())["aspect_ratio_bucket_indices"]
    metadata = json.loads((data / "aspect_ratio_bucket_metadata_shapes.json").read_text())
    return ({bucket: sorted(Path(path).name for path in paths) for bucket, paths in indices.items() if paths},
            {Path(path).name: entry for path, entry in metadata.items()})


def test_the_plugin_serves_a_parquet_dataset_from_the_shards(runs):
    ours, log, _, _ = runs
    assert SERVED_LINE in log and "4 image(s) encoded here" in log, log[-4000:]
    assert "uses SimpleTuner's own caching" not in log, log[-4000:]
    assert not list((ours / "cache").rglob("*.pt")), "a latent or text embedding went to a .pt file"
    assert_lcm_run(log, ours / "output")


def test_buckets_and_metadata_equal_simpletuners(runs):
    ours, _, theirs, their_log = runs
    assert_lcm_run(their_log, theirs / "output")
    our_indices, our_metadata = bucket_files(ours)
    their_indices, their_metadata = bucket_files(theirs)
    assert our_indices == their_indices and sum(map(len, our_indices.values())) == 4
    assert our_metadata == their_metadata


def test_captions_are_simpletuners(runs):
    ours, _, theirs, _ = runs
    # SimpleTuner names a caption's embeddings md5(caption)-sdxl.pt; its own path encoded every caption it read
    their_captions = {path.name.split("-")[0] for path in (theirs / "cache" / "text").glob("*.pt")}
    manifest = read_manifest(ours / "cache" / "vae" / "lcm")
    our_captions = {key.split("@")[0] for entry in manifest["images"] for key in entry["captions"]}
    stripped = {hashlib.md5(f"{colour} {shape}".encode()).hexdigest() for colour in ("red", "blue")
                for shape in ("circle", "square")}
    assert our_captions == stripped
    assert our_captions <= their_captions  # theirs also holds the empty caption (dropout)
