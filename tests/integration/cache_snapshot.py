"""What a cache build leaves on disk, read back for bit-for-bit comparisons between two builds (kill campaign,
config changes): store entries, manifest, SimpleTuner-format files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lcm_plugin.cache import LatentCacheReader, check_cache
from lcm_plugin.cache_build.build import LCM_DIR, PT_RECORD, check_run


def listed_keys(folder: Path) -> list[str]:
    """Every key of every shard the indexes list (snapshot `index.<writer>.json` plus journal
    `index.<writer>.journal`, one shard record per line; a torn last line is not a commit): a key stored in two
    shards shows twice."""
    shards = {}
    for snapshot in folder.glob("index.*.json"):
        shards |= {shard["file"]: shard["keys"] for shard in json.loads(snapshot.read_text())["shards"]}
    for journal in folder.glob("index.*.journal"):
        text = journal.read_text()
        lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
        shards |= {record["file"]: record["keys"] for record in map(json.loads, filter(str.strip, lines))}
    return [key for keys in shards.values() for key in keys]


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
