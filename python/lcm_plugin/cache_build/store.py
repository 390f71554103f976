"""The stores of a build: opening, repairing and pruning them, their SimpleTuner-format file names, and putting
entries (and the records of SimpleTuner-format files) into them."""

from __future__ import annotations

import os
from pathlib import Path

from lcm_plugin.cache_build.faults import fault_point
from lcm_plugin.cache_build.fingerprint import Fingerprints
from lcm_plugin.cache_build.layout import (
    LCM_DIR,
    MANIFEST,
    TIME_IDS,
    pt_record,
    text_entry,
)
from lcm_plugin.cache_build.plan import (
    BuildError,
    Dataset,
    unique_captions,
)


def open_reader(folder: Path):
    """A reader over `folder`'s store (None when there is none); shards were just verified, so no CRC pass."""
    from lcm_plugin.cache import LatentCacheError, LatentCacheReader

    if not folder.is_dir():
        return None
    try:
        return LatentCacheReader(folder, verify=False)
    except (OSError, LatentCacheError) as error:
        raise BuildError(f"{folder}: cannot read the cache: {error}") from None


def repair(datasets: list[Dataset], log) -> bool:
    """The cheap check of every cache folder (a shard's CRC is read only when its mtime changed since commit);
    shards proven bad are dropped so that their entries are encoded again. True when a store had a problem or is
    missing."""
    from lcm_plugin.cache import check_cache

    folders = {d.vae_cache_dir / LCM_DIR for d in datasets} | {d.text_cache_dir / LCM_DIR for d in datasets}
    troubled = False
    for folder in sorted(folders):
        _finish_pruning(folder)
        if not folder.is_dir():
            troubled = True
            continue
        report = check_cache(folder, full=False, repair=True)
        troubled |= bool(report.problems)
        for problem in report.problems:
            log(f"cache build: {problem.path}: {problem.reason} ({problem.kind}, {problem.action})")
        if report.orphans:
            log(f"cache build: {folder}: {len(report.orphans)} file(s) no index lists (left by a killed build); "
                "never read")
    return troubled


def _pruning_folders(folder: Path) -> tuple[Path, Path]:
    """(the pruned copy being written, the store it replaces once renamed away) next to `folder`."""
    return folder.with_name(folder.name + ".pruning"), folder.with_name(folder.name + ".pruned-away")


def _finish_pruning(folder: Path) -> None:
    """Completes or undoes a prune a kill interrupted: the store is `folder`, or `.pruned-away` when the kill
    fell between the two renames; a half-written copy is dropped."""
    import shutil

    copy, old = _pruning_folders(folder)
    if old.is_dir() and not folder.exists():
        os.replace(old, folder)
    shutil.rmtree(copy, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def prune_stores(datasets: list[Dataset], prints: Fingerprints, shard_bytes: int, log) -> None:
    """Rewrites each store with only the entries the current plan refers to (latents, time_ids, caption
    embeddings, records of SimpleTuner files that still hold them): a copy is written next to it, then swapped in
    by two renames. Readers with the old store open keep what they mapped but see its files gone."""
    from lcm_plugin.cache_build.simpletuner_format import text_cache_path

    keep: dict[Path, set[str]] = {}
    for dataset in datasets:
        wanted = keep.setdefault(dataset.vae_cache_dir / LCM_DIR, set())
        for item in dataset.images:
            record = pt_record(item.cache_key, latent_file(dataset, item.cache_key))
            wanted |= {item.cache_key, item.cache_key + TIME_IDS, record}
    for text_folder, captions in unique_captions(datasets).items():
        wanted = keep.setdefault(text_folder / LCM_DIR, set())
        for caption in captions:
            key = text_entry(caption, prints.text_digest)
            record = pt_record(key, text_cache_path(text_folder, caption))
            wanted |= {key + part for part in prints.text_parts} | {record}
    for folder, wanted in sorted(keep.items()):
        removed = _prune(folder, wanted, shard_bytes)
        if removed:
            log(f"cache build: {folder}: pruned {removed} entr(ies) nothing refers to")


def _prune(folder: Path, keep: set, shard_bytes: int) -> int:
    import shutil

    from lcm_plugin.cache import LatentCacheWriter

    reader = open_reader(folder)
    if reader is None:
        return 0
    kept = [key for key in reader.keys() if key in keep]
    removed = len(reader) - len(kept)
    if not removed:
        return 0
    copy, old = _pruning_folders(folder)
    shutil.rmtree(copy, ignore_errors=True)
    with LatentCacheWriter(copy, writer="rank0", shard_bytes=shard_bytes) as writer:
        for key in kept:
            writer.put(key, reader.get_torch(key))
    if (folder / MANIFEST).is_file():
        shutil.copy2(folder / MANIFEST, copy / MANIFEST)
    reader.close()
    os.replace(folder, old)
    os.replace(copy, folder)
    shutil.rmtree(old)
    return removed


def latent_file(dataset: Dataset, key: str) -> Path:
    from lcm_plugin.cache_build.simpletuner_format import vae_cache_path

    return vae_cache_path(dataset, dataset.data_dir / key.rpartition("@")[0])


def text_file(folder: Path, key: str) -> Path:
    """SimpleTuner's file for the caption whose store key is `key` (`<md5>@<digest>`)."""
    return folder / f"{key.partition('@')[0]}-sdxl.pt"


def text_digest_of(key: str) -> str:
    return key.split("/")[0].rpartition("@")[2]


def open_writer(folder: Path, rank: int, shard_bytes: int):
    from lcm_plugin.cache import LatentCacheError, LatentCacheWriter

    try:
        return LatentCacheWriter(folder, writer=f"rank{rank}", shard_bytes=shard_bytes)
    except (OSError, LatentCacheError) as error:
        raise BuildError(f"{folder}: cannot open the cache for writing: {error}") from None


def put(writer, key: str, value) -> None:
    writer.put(key, value)
    fault_point("put")


def write_pt(writer, key: str, path: Path, value, compress: bool) -> None:
    """SimpleTuner-format file of `key`'s entry, then its record."""
    import numpy as np

    from lcm_plugin.cache_build.simpletuner_format import save_torch

    save_torch(path, value, compress)
    fault_point("pt")
    put(writer, pt_record(key, path), np.ones(1, np.uint8))


def pt_done(writer, key: str, path: Path) -> bool:
    record = pt_record(key, path)
    return record is not None and record in writer
