"""`simpletuner train` (the stock launcher, the plugin's start-up hook) builds and reads the memory-mapped caches:
no per-file `.pt` for a covered dataset, SimpleTuner's own caching for one it does not cover (one log line), a
second start encodes nothing, and `SIMPLETUNER_LCM_DATA_PATH=simpletuner` gives SimpleTuner's own path back, whose
text embeddings equal the shards' and whose buckets and metadata of a `metadata_backend: parquet` dataset (sizes
and captions from the table, no caption file) equal the plugin's."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import COLOURS, SHAPES, stock_trainer_env, write_lcm_training_dir, write_shapes_dataset
from test_simpletuner_train import assert_lcm_run, run_stock_trainer

SERVED_LINE = "read latents and text embeddings from the memory-mapped caches"
FALLBACK = "simpletuner-lcm data path: dataset 'fallback' uses SimpleTuner's own caching: scan_for_errors"
PREPARATION_LINE = r"simpletuner-lcm: data preparation took [0-9]+\.[0-9]{2} s"


def two_dataset_run(root: Path, model_dir: Path) -> Path:
    """The LCM run of conftest plus a second dataset with `scan_for_errors` (not covered: it checks SimpleTuner's
    per-file cache) and a third, 'tabled', whose sizes and captions come from a parquet table (covered)."""
    run = write_lcm_training_dir(root, model_dir, max_train_steps=3)
    backend_file = run / "config" / "multidatabackend.json"
    entries = json.loads(backend_file.read_text())
    fallback = {**entries[0], "id": "fallback", "scan_for_errors": True,
                "instance_data_dir": str(write_shapes_dataset(run / "data2")),
                "cache_dir_vae": str(run / "cache" / "vae2")}
    backend_file.write_text(json.dumps([entries[0], fallback, tabled_entry(run), entries[1]], indent=2))
    return run


def tabled_entry(run: Path) -> dict:
    """A shapes dataset whose captions moved from its .txt files into `meta.parquet` (ids without extension, padded
    with spaces SimpleTuner strips), with its sizes."""
    data = write_shapes_dataset(run / "data3")
    captions = {path.stem: path.read_text() for path in sorted(data.glob("*.txt"))}
    for path in data.glob("*.txt"):
        path.unlink()
    pq.write_table(pa.table({"id": list(captions), "caption": [f"  {text}  " for text in captions.values()],
                             "width": [64] * len(captions), "height": [64] * len(captions)}), run / "meta.parquet")
    return {"id": "tabled", "type": "local", "instance_data_dir": str(data), "cache_dir_vae": str(run / "cache" / "vae3"),
            "crop": False, "resolution": 64, "resolution_type": "pixel", "minimum_image_size": 32,
            "metadata_backend": "parquet", "caption_strategy": "parquet",
            "parquet": {"path": str(run / "meta.parquet"), "filename_column": "id", "caption_column": "caption"}}


def bucket_files(data: Path, dataset: str) -> tuple[dict, dict]:
    """SimpleTuner's bucket index ({bucket: sorted file names}) and metadata ({file name: entry}) of a dataset."""
    indices = json.loads((data / f"aspect_ratio_bucket_indices_{dataset}.json").read_text())
    metadata = json.loads((data / f"aspect_ratio_bucket_metadata_{dataset}.json").read_text())
    return ({bucket: sorted(Path(path).name for path in paths)
             for bucket, paths in indices["aspect_ratio_bucket_indices"].items() if paths},
            {Path(path).name: entry for path, entry in metadata.items()})


def pt_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.pt")) if folder.is_dir() else []


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory, tiny_sdxl_dir):
    """One run on the plugin's path, started twice (the second start finds everything cached)."""
    env = stock_trainer_env()
    run = two_dataset_run(tmp_path_factory.mktemp("plugin") / "run", tiny_sdxl_dir)
    first = run_stock_trainer(run, env)
    assert_lcm_run(first, run / "output")
    stores = {path: path.stat().st_mtime_ns for path in (run / "cache").rglob("*.safetensors")}
    (run / "output" / "training_metrics.jsonl").unlink()
    second = run_stock_trainer(run, env)
    return run, first, second, stores


def test_a_covered_dataset_trains_from_the_shards_without_pt_files(plugin_run):
    run, log, _, _ = plugin_run
    assert SERVED_LINE in log and "datasets 'shapes', 'tabled'" in log, log[-4000:]
    assert "8 image(s) encoded here" in log, log[-4000:]
    assert "dataset 'tabled' uses SimpleTuner's own caching" not in log, log[-4000:]
    assert pt_files(run / "cache" / "vae3") == [], "latents of the parquet dataset went to .pt files"
    assert pt_files(run / "cache" / "vae") == [], "latents of the covered dataset went to .pt files"
    # the shared text cache: every caption of both datasets (and the dropout caption) is in the shards
    assert pt_files(run / "cache" / "text") == [], "text embeddings went to .pt files"
    assert (run / "cache" / "vae" / "lcm" / "manifest.json").is_file()
    manifest = json.loads((run / "cache" / "vae" / "lcm" / "manifest.json").read_text())
    assert len(manifest["images"]) == len(COLOURS) * len(SHAPES)
    # SimpleTuner's sampler reads the bucket files the build wrote, listing the four images
    indices = json.loads((run / "data" / "aspect_ratio_bucket_indices_shapes.json").read_text())
    assert sorted(Path(p).name for files in indices["aspect_ratio_bucket_indices"].values() for p in files) == [
        f"{i}.png" for i in range(4)]


def test_a_dataset_the_path_does_not_cover_falls_back_with_one_line(plugin_run):
    run, log, _, _ = plugin_run
    assert log.count(FALLBACK) == 1, log[-4000:]
    assert len(pt_files(run / "cache" / "vae2")) == 4  # SimpleTuner's own latents for it


def test_a_second_start_encodes_nothing_and_rewrites_no_shard(plugin_run):
    run, _, log, stores = plugin_run
    assert_lcm_run(log, run / "output")
    assert "0 image(s) encoded here, 8 already cached" in log, log[-4000:]
    assert len(re.findall(PREPARATION_LINE, log)) == 1, log[-4000:]  # what bench/data_path.py (a) reads
    assert {path: path.stat().st_mtime_ns for path in (run / "cache").rglob("*.safetensors")} == stores
    assert pt_files(run / "cache" / "vae") == [] and pt_files(run / "cache" / "text") == []


def test_the_switch_gives_simpletuners_own_path_back_with_equal_text_embeddings(plugin_run, tmp_path, tiny_sdxl_dir,
                                                                              trainer_env):
    from simpletuner.helpers.data_backend.local import LocalDataBackend

    from lcm_plugin.cache import LatentCacheReader

    plugin_dir = plugin_run[0]
    run = two_dataset_run(tmp_path / "run", tiny_sdxl_dir)
    trainer_env["SIMPLETUNER_LCM_DATA_PATH"] = "simpletuner"
    log = run_stock_trainer(run, trainer_env)
    assert_lcm_run(log, run / "output")
    assert SERVED_LINE not in log and FALLBACK not in log, log[-4000:]
    assert "every dataset uses SimpleTuner's own caching (SIMPLETUNER_LCM_DATA_PATH=simpletuner)" in log
    assert len(re.findall(PREPARATION_LINE, log)) == 1, log[-4000:]  # timed on SimpleTuner's own path too
    assert len(pt_files(run / "cache" / "vae")) == 4 and not (run / "cache" / "vae" / "lcm").exists()
    # SimpleTuner's ParquetMetadataBackend bucketed the parquet dataset itself: the build's bucket files are the same
    ours, theirs = bucket_files(plugin_dir / "data3", "tabled"), bucket_files(run / "data3", "tabled")
    assert ours == theirs and sum(map(len, ours[0].values())) == 4

    # SimpleTuner's own text encoding is the reference for what the build put in the shards.
    loader = LocalDataBackend(accelerator=None, id="text", compress_cache=True)  # compress_disk_cache default
    shards = LatentCacheReader(plugin_dir / "cache" / "text" / "lcm")
    captions = [""] + [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    # Every caption of the three datasets, the parquet's stripped as SimpleTuner strips them: the same five
    their_files = {path.name.split("-")[0] for path in (run / "cache" / "text").glob("*.pt")}
    assert {key.partition("@")[0] for key in shards.keys()} == their_files == {
        hashlib.md5(caption.encode()).hexdigest() for caption in captions}
    for caption in captions:
        md5 = hashlib.md5(caption.encode()).hexdigest()
        theirs = loader.torch_load(str(run / "cache" / "text" / f"{md5}-sdxl.pt"))
        (key,) = {k.rpartition("/")[0] for k in shards.keys() if k.startswith(md5 + "@")}
        torch.testing.assert_close(shards.get_torch(key + "/prompt_embeds")[None], theirs["prompt_embeds"],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shards.get_torch(key + "/pooled_prompt_embeds"),
                                   theirs["pooled_prompt_embeds"], atol=1e-5, rtol=1e-5)
