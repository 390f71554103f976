"""What the stores hold against the plan: what to encode and why, entries that disagree with the plan, and
SimpleTuner-format files the plan no longer produces (rank 0, before the other ranks encode)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from lcm_plugin.cache_build.fingerprint import Fingerprints, recipe_of
from lcm_plugin.cache_build.layout import (
    LCM_DIR,
    PT_RECORD,
    TIME_IDS,
    pt_record,
    text_entry,
    time_ids,
)
from lcm_plugin.cache_build.manifest import read_manifest_entries
from lcm_plugin.cache_build.plan import (
    BuildError,
    Dataset,
    ImageItem,
    unique_captions,
)
from lcm_plugin.cache_build.store import (
    latent_file,
    open_reader,
    text_digest_of,
    text_file,
)


def _latent_reasons(item: ImageItem, manifest: dict | None, previous: dict, prints: Fingerprints) -> list[str]:
    """Why `item`'s latent is not in the store, from what the last complete build recorded for it."""
    from lcm_plugin.cache_build.fingerprint import changes

    before = previous.get(item.key)
    if before is None:
        return ["not cached yet (new image, or a build that did not finish)"]
    if before["key"] == item.cache_key:
        return ["missing from the store (a dropped shard or a build that did not finish)"]
    reasons = changes(manifest.get("fingerprint", {}), prints.latent)
    reasons += changes({k: v for k, v in before.get("recipe", {}).items() if k != "fingerprint"},
                       {k: v for k, v in recipe_of(item, prints).items() if k != "fingerprint"})
    return reasons or ["the recipe changed"]


def compare_with_caches(
    datasets: list[Dataset], prints: Fingerprints, simpletuner_format: bool, cleanup: bool
) -> list[str]:
    """Lines saying what the stores lack for the plan and why (one per reason, with counts), and what they hold
    that the plan does not use. Checks every cached latent's shape/dtype and time_ids against the plan (raises
    BuildError on a mismatch: such a store was not written by this build). With `cleanup`, removes
    SimpleTuner-format files the plan no longer produces: ours (proven by their records) whose entry is not
    planned, files at planned paths that are not recorded for the planned entry (with `simpletuner_format`, they
    are rewritten), and bucket files of ours that list other sizes."""
    lines = []
    for dataset in datasets:
        folder = dataset.vae_cache_dir / LCM_DIR
        reader = open_reader(folder)
        stored = set(reader.keys()) if reader else set()
        images = list(dataset.images)
        missing = [item for item in images if item.cache_key not in stored]
        manifest, previous = read_manifest_entries(folder, {item.key for item in missing}) if missing else (None, {})
        reasons: Counter = Counter()
        planned = set()
        for item in images:
            planned.add(item.cache_key)
            if item.cache_key in stored:
                check_entry(reader, folder, item, prints)
        for item in missing:
            reasons.update(_latent_reasons(item, manifest, previous, prints))
        for reason, count in sorted(reasons.items()):
            lines.append(f"cache build: {dataset.id}: {count} latent(s) to encode: {reason}")
        removed = _sweep_files(
            stored, lambda: {latent_file(dataset, i.cache_key): i.cache_key for i in images},
            lambda key: latent_file(dataset, key), simpletuner_format, cleanup,
        )
        if removed:
            lines.append(f"cache build: {dataset.id}: removed {removed} SimpleTuner latent file(s) the current "
                         "settings do not produce (rewritten with --format simpletuner)")
        if cleanup and _remove_stale_bucket_files(dataset):
            lines.append(f"cache build: {dataset.id}: removed SimpleTuner bucket files of an earlier build that "
                         "list other sizes")
        unused = [key for key in stored if key.removesuffix(TIME_IDS) not in planned and PT_RECORD not in key]
        if unused:
            lines.append(f"cache build: {folder}: {len(unused)} entr(ies) from earlier settings or removed images "
                         "stay in the store; they are never read (--prune rewrites the store without them)")
    for text_folder, captions in unique_captions(datasets).items():
        folder = text_folder / LCM_DIR
        reader = open_reader(folder)
        stored = set(reader.keys()) if reader else set()
        wanted = {text_entry(caption, prints.text_digest): caption for caption in captions}
        missing = [k for k in wanted if not prints.has_text(stored, k)]
        if missing:
            earlier = {text_digest_of(key) for key in stored if PT_RECORD not in key} - {prints.text_digest}
            why = "new caption(s)" if not earlier else (
                "the text encoders, tokenizers or their dtype changed since an earlier build"
            )
            lines.append(f"cache build: {text_folder}: {len(missing)} caption(s) to encode: {why}")
        removed = _sweep_files(
            stored, lambda: {text_file(text_folder, key): key for key in wanted},
            lambda key: text_file(text_folder, key), simpletuner_format, cleanup,
        )
        if removed:
            lines.append(f"cache build: {text_folder}: removed {removed} SimpleTuner text file(s) the current "
                         "settings do not produce")
    return lines


def check_entry(reader, folder: Path, item: ImageItem, prints: Fingerprints) -> None:
    """The stored latent of `item` has the plan's shape and dtype, and its stored time_ids are the plan's."""
    import numpy as np

    channels, factor, dtype = prints.latent_shape
    width, height = item.sample["target_size"]
    latent = reader.get(item.cache_key)
    want = (channels, height // factor, width // factor)
    want_dtype = np.uint16 if dtype == "BF16" else np.float32
    problem = None
    if tuple(latent.shape) != want or latent.dtype != want_dtype:
        problem = f"is {latent.dtype} {tuple(latent.shape)}, the plan needs {dtype} {want}"
    elif item.cache_key + TIME_IDS in reader:
        stored = reader.get(item.cache_key + TIME_IDS).tolist()
        if stored != time_ids(item.sample):
            problem = f"has time_ids {stored}, the plan {time_ids(item.sample)}"
    if problem:
        raise BuildError(
            f"{folder}: entry {item.cache_key!r} {problem}; this store was not written by this build of "
            "simpletuner-lcm: move the folder away and build again"
        )


def _sweep_files(stored: set, planned_files, path_of, simpletuner_format: bool, cleanup: bool) -> int:
    """Removes (when `cleanup`) SimpleTuner-format files the plan does not produce; returns how many.

    `planned_files()`: path -> the entry key the plan wants there (called only when a file can be in question).
    A file is ours, holding entry K, when the store has a record of K whose stat matches the file's. Ours holding
    another entry than the planned one (or at a path the plan no longer has) is stale. With `simpletuner_format`,
    a file at a planned path that is not ours for the planned entry is stale too (or someone else's, which the
    build overwrites anyway)."""
    held: dict[Path, dict[str, str]] = {}  # path -> {recorded stat: entry}
    for key in stored:
        if PT_RECORD in key:
            entry, _, stat = key.rpartition(PT_RECORD)
            held.setdefault(path_of(entry), {})[stat] = entry
    if not held and not simpletuner_format:
        return 0
    planned = planned_files()
    valid, doomed = set(), set()
    for path, entries in held.items():
        record = pt_record("", path)
        holds = entries.get(record.rpartition(PT_RECORD)[2]) if record else None
        if holds is not None:
            (valid if planned.get(path) == holds else doomed).add(path)
    if simpletuner_format:
        doomed |= {path for path in planned if path not in valid and path.is_file()}
    if cleanup:
        for path in doomed:
            path.unlink(missing_ok=True)
    return len(doomed)


def _remove_stale_bucket_files(dataset: Dataset) -> bool:
    """Removes SimpleTuner bucket files of ours (an empty "config": SimpleTuner always records its own) whose
    images or sizes differ from the plan; True when it did."""
    from lcm_plugin.cache_build.simpletuner_format import bucket_files, bucket_metadata

    if dataset.remote is not None:  # the trainer rewrites an S3 dataset's files in its bucket at every start
        return False
    index_file, metadata_file = bucket_files(dataset)
    try:
        index = json.loads(index_file.read_text())
        listed = json.loads(metadata_file.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(index, dict) or index.get("config") != {}:
        return False
    planned = bucket_metadata(dataset)
    if all(path in planned and planned[path] == value for path, value in listed.items()):
        return False
    index_file.unlink(missing_ok=True)
    metadata_file.unlink(missing_ok=True)
    return True
