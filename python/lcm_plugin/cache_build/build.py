"""`simpletuner-lcm cache build`: fill a run's latent and text caches, resumably, on one or many processes.

Order of work (every rank derives the same plan; rank r takes batches r, r + N, ...):
1. read and validate config.json + multidatabackend.json; header-scan and bucket every image; fingerprint the
   VAE and text encoders and name every entry by its recipe (fingerprint.py);
2. rank 0 verifies existing caches and drops failing shards, compares the stores with the plan (logs what is
   to encode and why, checks the shape and time_ids of every cached entry), and removes SimpleTuner-format
   files of ours that the plan no longer produces; all ranks wait;
3. VAE batches: decode/resize/crop in Rust (the next batch decodes on a helper thread while the VAE encodes this
   one), encode in torch, put latents + SDXL time_ids in the mmap cache;
4. captions: encode with the run's text encoders, put prompt_embeds (+ pooled_prompt_embeds for SDXL);
5. ranks exchange the images that failed; rank 0 writes each dataset's manifest (and, with --format
   simpletuner, SimpleTuner's bucket metadata).

`build` runs it all for `simpletuner-lcm cache build` (models loaded from the run's paths, ranks over gloo);
`build_planned` runs steps 2-5 for a caller that planned itself and brings its own models and process group
(`simpletuner train`, lcm_plugin.trainer_cache).

Resumable: a shard is committed atomically, and a batch with any latent missing is re-encoded whole (the same
images, so the same latents) while only its missing keys are written. A kill at any point loses at most the
uncommitted tail. Keys carry their recipe's digest, so nothing committed under an earlier config is ever taken
for the current one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from itertools import chain
from dataclasses import dataclass, field
from pathlib import Path

from lcm_plugin.cache_build.faults import fault_point
from lcm_plugin.cache_build.layout import (
    LCM_DIR,
    MANIFEST,
    MANIFEST_VERSION,
    POOLED_PROMPT_EMBEDS,
    PROMPT_EMBEDS,
    PT_RECORD,
    TEXT_PARTS,
    TIME_IDS,
    pt_record,
    text_entry,
    time_ids,
)
from lcm_plugin.cache_build.plan import (
    Batch,
    BuildError,
    Dataset,
    ImageItem,
    RunSettings,
    datasets_of,
    read_run,
    scan_dataset,
    unique_captions,
    vae_batches,
)

TEXT_BATCH = 32  # captions per text-encoder call


@dataclass(frozen=True)
class BuildOptions:
    config_dir: Path
    simpletuner_format: bool = False
    shard_bytes: int = 256 << 20
    threads: int | None = None
    prune: bool = False  # after the build, rewrite each store without the entries nothing refers to


@dataclass
class BuildReport:
    encoded: int = 0  # images VAE-encoded by this rank in this run
    reused: int = 0  # images of this rank found already cached
    captions: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    failed_on_any_rank: dict[str, str] = field(default_factory=dict)  # file -> reason, gathered from every rank
    # dataset id -> (metadata file, its stamp as written, its content): SimpleTuner's bucket metadata as rank 0 wrote
    # it, for a reader in this process that would parse the file again (the trainer's data path)
    bucket_metadata: dict[str, tuple] = field(default_factory=dict)
    seconds: float = 0.0  # the whole build, model loading included
    encode_seconds: float = 0.0  # decode + VAE encode + write of the images


@dataclass(frozen=True)
class Fingerprints:
    """The run's cache fingerprints (fingerprint.py) and their digests, which name the entries."""

    latent: dict
    latent_digest: str
    text: dict
    text_digest: str
    latent_shape: tuple[int, int, str]  # (channels, pixel-to-latent factor, stored dtype)
    family: str  # the run's model_family: what its text embeddings are (TEXT_PARTS)

    @property
    def text_parts(self) -> tuple[str, ...]:
        return TEXT_PARTS[self.family]

    def has_text(self, store, key: str) -> bool:
        """Whether `store` (a reader, writer or key set) holds every part of the caption entry `key`."""
        return store is not None and all(key + part in store for part in self.text_parts)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the process count, from the variables `accelerate launch` / torchrun set."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def fingerprints(settings: RunSettings) -> Fingerprints:
    from lcm_plugin.cache_build.fingerprint import (
        IdentityError,
        digest,
        latent_fingerprint,
        latent_geometry,
        text_fingerprint,
    )

    try:
        latent = latent_fingerprint(settings.vae_path, settings.vae_dtype, settings.seed)
        text = text_fingerprint(settings.model_path, settings.text_dtype)
        shape = latent_geometry(settings.vae_path, settings.vae_dtype)
    except IdentityError as error:
        raise BuildError(f"cannot identify the models of {settings.config_path}: {error}") from None
    return Fingerprints(latent, digest(latent), text, digest(text), shape, settings.model_family)


def name_entries(datasets: list[Dataset], prints: Fingerprints) -> None:
    """Give every image its store key."""
    from lcm_plugin.cache_build.fingerprint import recipe_digest

    for dataset in datasets:
        for item in dataset.images:
            item.cache_key = f"{item.key}@{recipe_digest(prints.latent_digest, item.sample, item.content)}"


def _recipe(item: ImageItem, prints: Fingerprints) -> dict:
    """What `item`'s latent is a function of (its key's digest names it)."""
    from lcm_plugin.cache_build.fingerprint import latent_recipe

    return latent_recipe(prints.latent_digest, item.sample, item.content)


def plan_run(
    config_dir: Path, threads: int | None, remember: bool = False
) -> tuple[RunSettings, list[Dataset], Fingerprints]:
    """Settings, scanned and keyed datasets, and fingerprints of the run in `config_dir`; with `remember`, the scans
    update their memos."""
    settings, entries = read_run(config_dir)
    datasets = [scan_dataset(d, settings.seed, threads, remember=remember) for d in datasets_of(settings, entries)]
    prints = fingerprints(settings)
    name_entries(datasets, prints)
    return settings, datasets, prints


class _Group:
    """torch.distributed over gloo when several processes run; no-ops for one. The ranks meet only in `gather`, at
    the end of each phase of `build_planned` (ranks.py)."""

    def __init__(self, world: int):
        self.world = world
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")

    def gather(self, value: list) -> list:
        """Concatenation of every rank's `value`."""
        if self.world == 1:
            return list(value)
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, value)
        return [x for part in parts for x in part]

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


class FileModels:
    """The VAE and text encoders loaded from the run's model paths (once, when first needed)."""

    def __init__(self, settings: RunSettings):
        self.settings = settings
        self._vae = None
        self._text = None

    def vae(self):
        if self._vae is None:
            from lcm_plugin.cache_build.encode import load_vae

            self._vae = _load(load_vae, self.settings.vae_path, self.settings.vae_dtype, what="VAE")
        return self._vae

    def text_encoders(self) -> tuple[list, list]:
        """(tokenizers, text encoders)."""
        if self._text is None:
            from lcm_plugin.cache_build.encode import load_text_encoders

            self._text = _load(
                load_text_encoders, self.settings.model_path, self.settings.text_dtype, what="text encoders"
            )
        return self._text


def build(options: BuildOptions, log=print) -> BuildReport:
    """Run the whole build on this rank. Raises BuildError for bad input (config, model, unwritable cache)."""
    import time

    start = time.perf_counter()
    rank, world = rank_and_world()
    if options.prune and world > 1:
        raise BuildError("--prune rewrites the stores: run it in one process, not under a multi-process launcher")
    from lcm_plugin.cache_build.ranks import Phase

    group = _Group(world)
    try:
        # Each machine's first rank plans first and writes the scan memos; its other ranks plan from them.
        first_on_machine = int(os.environ.get("LOCAL_RANK", rank)) == 0
        with Phase(group, "planning on each machine's first rank"):
            planned = plan_run(options.config_dir, options.threads, remember=True) if first_on_machine else None
        with Phase(group, "planning"):
            settings, datasets, prints = planned or plan_run(options.config_dir, options.threads)
        report = build_planned(
            settings, datasets, prints, options, rank=rank, world=world, group=group, models=FileModels(settings),
            write_bucket_files=options.simpletuner_format, remove_stale_files=True, log=log,
        )
        if rank == 0 and options.prune:
            prune_stores(datasets, prints, options.shard_bytes, log)
    finally:
        group.close()
    report.seconds = time.perf_counter() - start
    return report


def build_planned(
    settings: RunSettings, datasets: list[Dataset], prints: Fingerprints, options: BuildOptions, *, rank: int,
    world: int, group, models, write_bucket_files: bool, remove_stale_files: bool, log,
) -> BuildReport:
    """Steps 2-5 of the module docstring for planned, keyed `datasets`. `group` synchronises the ranks (`gather`);
    `models` gives the VAE and the text encoders (`vae()`, `text_encoders()`), asked only when something is to be
    encoded; `remove_stale_files`: `compare_with_caches`' cleanup of SimpleTuner-format files. Every rank returns with
    the manifests written (`report.failed_on_any_rank` lists what failed), or every rank raises (ranks.Phase: its own
    error where a part failed, `RankFailed` on the others).

    Collectives, the same on every rank whatever raised where: one gather at the end of each of three phases (rank 0's
    checks, which also compare the ranks' plans; encoding, which also pools the failed images; rank 0's manifests
    and bucket files). Each gather also holds back the ranks until rank 0's part of its phase is done."""
    from lcm_plugin.cache_build.ranks import Phase, plan_summary, require_same_plan

    report = BuildReport()
    summary = plan_summary(datasets, prints)
    with Phase(group, "the rank-0 checks of the existing caches") as checks:
        complete_before, failed_before = False, []
        if rank == 0:  # every rank scans; one reports
            fault_point("checks")
            for dataset in datasets:
                report.failed += [(str(path), reason) for path, reason in dataset.skipped]
                for reason, count in Counter(reason for _, reason in dataset.excluded).items():
                    log(f"cache build: {dataset.id}: {count} image(s) left out, as SimpleTuner does: {reason}")
            repaired = _repair(datasets, log)
            records = [read_completion(dataset) or {} for dataset in datasets]
            complete_before = not repaired and not options.simpletuner_format and all(
                record.get("plan") == summary[0] and (dataset.vae_cache_dir / LCM_DIR / MANIFEST).is_file()
                for dataset, record in zip(datasets, records)
            )
            if complete_before:
                failed_before = [tuple(pair) for record in records for pair in record["failed"]]
            else:
                for line in compare_with_caches(datasets, prints, options.simpletuner_format,
                                                cleanup=remove_stale_files):
                    log(line)
        checks.share((summary, complete_before, failed_before))
    require_same_plan([shared[0] for shared in checks.shared])
    # The same plan completed before on the same stores (none of their shards dropped since): nothing to encode,
    # check or rewrite; what failed then fails now (the same files, per the plan's content hashes).
    complete_before = checks.shared[0][1]
    batches = vae_batches(datasets, settings.vae_batch_size)
    with Phase(group, "encoding") as encoding:
        if complete_before:
            report.reused = sum(len(batch.items) for batch in batches[rank::world])
            report.failed += checks.shared[0][2] if rank == 0 else []
        else:
            _encode_images(batches[rank::world], datasets, settings, prints, options, rank, report, models)
            _encode_captions(datasets, prints, options, rank, world, report, models)
        encoding.share(report.failed)
    failed = dict(pair for failed_on_rank in encoding.shared for pair in failed_on_rank)
    report.failed_on_any_rank = failed
    with Phase(group, "the rank-0 writing of the manifests and bucket files"):
        if rank == 0:
            for dataset in datasets:
                encoded = [item for item in dataset.images if str(item.path) not in failed]
                if not complete_before:
                    fault_point("manifest")
                    write_manifest(dataset, encoded, prints, failed)
                if write_bucket_files:
                    from lcm_plugin.cache_build.simpletuner_format import write_bucket_metadata

                    report.bucket_metadata[dataset.id] = write_bucket_metadata(dataset, encoded)
                if not complete_before:
                    write_completion(dataset, summary[0], failed)
    return report


def _completion_path(dataset: Dataset) -> Path:
    return dataset.vae_cache_dir / LCM_DIR / f"complete.{hashlib.sha256(dataset.id.encode()).hexdigest()[:16]}.json"


def write_completion(dataset: Dataset, plan: str, failed: dict[str, str]) -> None:
    """Records that the plan with digest `plan` (ranks.plan_summary: every dataset's keys and captions, the
    fingerprints) is complete in the stores: the next start with the same plan skips the checks and encoding."""
    from lcm_plugin.cache_build.simpletuner_format import write_atomic

    mine = [(str(item.path), failed[str(item.path)]) for item in dataset.images if str(item.path) in failed]
    record = {"format_version": MANIFEST_VERSION, "plan": plan, "failed": mine}
    write_atomic(_completion_path(dataset), json.dumps(record).encode())


def read_completion(dataset: Dataset) -> dict | None:
    try:
        record = json.loads(_completion_path(dataset).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format_version") != MANIFEST_VERSION:
        return None
    return record


def _repair(datasets: list[Dataset], log) -> bool:
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
            record = pt_record(item.cache_key, _latent_file(dataset, item.cache_key))
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

    reader = _open_reader(folder)
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


def _open_reader(folder: Path):
    """A reader over `folder`'s store (None when there is none); shards were just verified, so no CRC pass."""
    from lcm_plugin.cache import LatentCacheError, LatentCacheReader

    if not folder.is_dir():
        return None
    try:
        return LatentCacheReader(folder, verify=False)
    except (OSError, LatentCacheError) as error:
        raise BuildError(f"{folder}: cannot read the cache: {error}") from None


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a latent cache folder, None when absent or not one we can read."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format_version") == MANIFEST_VERSION else None


_IMAGE_ENTRY = '{"image": '


def read_manifest_entries(folder: Path, images: set[str]) -> tuple[dict | None, dict[str, dict]]:
    """(the manifest's fields but its image lists, {image key: its entry} for the keys in `images`), read line by line
    (`write_manifest` puts one entry per line): a restart that changed a few images of millions parses a few entries.
    (None, {}) when there is no readable manifest."""
    head, entries = None, {}
    decoder = json.JSONDecoder()
    try:
        with open(folder / MANIFEST, encoding="utf-8") as lines:
            head = json.loads(next(lines).rstrip().removesuffix(",") + "}")
            if not isinstance(head, dict) or head.get("format_version") != MANIFEST_VERSION:
                return None, {}
            for line in lines:
                if line.startswith("]"):
                    break  # the end of "images"; "failed" follows
                if not line.startswith(_IMAGE_ENTRY):
                    continue
                image, _ = decoder.raw_decode(line, len(_IMAGE_ENTRY))
                if image in images:
                    entries[image] = json.loads(line.rstrip().removesuffix(","))
    except (OSError, ValueError, StopIteration):
        return None, {}
    return head, entries


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
                       {k: v for k, v in _recipe(item, prints).items() if k != "fingerprint"})
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
        reader = _open_reader(folder)
        stored = set(reader.keys()) if reader else set()
        missing = [item for item in dataset.images if item.cache_key not in stored]
        manifest, previous = read_manifest_entries(folder, {item.key for item in missing}) if missing else (None, {})
        reasons: Counter = Counter()
        planned = set()
        for item in dataset.images:
            planned.add(item.cache_key)
            if item.cache_key in stored:
                _check_entry(reader, folder, item, prints)
        for item in missing:
            reasons.update(_latent_reasons(item, manifest, previous, prints))
        for reason, count in sorted(reasons.items()):
            lines.append(f"cache build: {dataset.id}: {count} latent(s) to encode: {reason}")
        removed = _sweep_files(
            stored, lambda: {_latent_file(dataset, i.cache_key): i.cache_key for i in dataset.images},
            lambda key: _latent_file(dataset, key), simpletuner_format, cleanup,
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
        reader = _open_reader(folder)
        stored = set(reader.keys()) if reader else set()
        wanted = {text_entry(caption, prints.text_digest): caption for caption in captions}
        missing = [k for k in wanted if not prints.has_text(stored, k)]
        if missing:
            earlier = {_text_digest_of(key) for key in stored if PT_RECORD not in key} - {prints.text_digest}
            why = "new caption(s)" if not earlier else (
                "the text encoders, tokenizers or their dtype changed since an earlier build"
            )
            lines.append(f"cache build: {text_folder}: {len(missing)} caption(s) to encode: {why}")
        removed = _sweep_files(
            stored, lambda: {_text_file(text_folder, key): key for key in wanted},
            lambda key: _text_file(text_folder, key), simpletuner_format, cleanup,
        )
        if removed:
            lines.append(f"cache build: {text_folder}: removed {removed} SimpleTuner text file(s) the current "
                         "settings do not produce")
    return lines


def _text_file(folder: Path, key: str) -> Path:
    """SimpleTuner's file for the caption whose store key is `key` (`<md5>@<digest>`)."""
    return folder / f"{key.partition('@')[0]}-sdxl.pt"


def _text_digest_of(key: str) -> str:
    return key.split("/")[0].rpartition("@")[2]


def _latent_file(dataset: Dataset, key: str) -> Path:
    from lcm_plugin.cache_build.simpletuner_format import vae_cache_path

    return vae_cache_path(dataset, dataset.data_dir / key.rpartition("@")[0])


def _check_entry(reader, folder: Path, item: ImageItem, prints: Fingerprints) -> None:
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

    index_file, metadata_file = bucket_files(dataset)
    try:
        index = json.loads(index_file.read_text())
        listed = json.loads(metadata_file.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(index, dict) or index.get("config") != {}:
        return False
    _, planned = bucket_metadata(dataset.images)
    if all(path in planned and planned[path] == value for path, value in listed.items()):
        return False
    index_file.unlink(missing_ok=True)
    metadata_file.unlink(missing_ok=True)
    return True


def _open_writer(folder: Path, rank: int, shard_bytes: int):
    from lcm_plugin.cache import LatentCacheError, LatentCacheWriter

    try:
        return LatentCacheWriter(folder, writer=f"rank{rank}", shard_bytes=shard_bytes)
    except (OSError, LatentCacheError) as error:
        raise BuildError(f"{folder}: cannot open the cache for writing: {error}") from None


def _put(writer, key: str, value) -> None:
    writer.put(key, value)
    fault_point("put")


def _write_pt(writer, key: str, path: Path, value, compress: bool) -> None:
    """SimpleTuner-format file of `key`'s entry, then its record."""
    import numpy as np

    from lcm_plugin.cache_build.simpletuner_format import save_torch

    save_torch(path, value, compress)
    fault_point("pt")
    _put(writer, pt_record(key, path), np.ones(1, np.uint8))


def _pt_done(writer, key: str, path: Path) -> bool:
    record = pt_record(key, path)
    return record is not None and record in writer


def _decode(batch: Batch, threads: int | None):
    """(pixels, ok, errors) of `decode_batch` for every image of `batch`: the same images give the same batch."""
    from lcm_plugin.cache import decode_batch

    return decode_batch(
        [str(item.path) for item in batch.items],
        [item.sample["resize_size"] for item in batch.items],
        [item.sample["crop_coordinates"] for item in batch.items],
        batch.items[0].sample["target_size"],
        threads=threads,
    )


def _encode_images(
    batches: list[Batch], datasets: list[Dataset], settings: RunSettings, prints: Fingerprints,
    options: BuildOptions, rank: int, report: BuildReport, models,
) -> None:
    """Decodes batch i + 1 on a helper thread (the Rust decode releases the GIL) while the VAE encodes batch i."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from tqdm import tqdm

    from lcm_plugin.cache_build.encode import vae_memory_problem

    by_id = {d.id: d for d in datasets}
    writers = {d.id: _open_writer(d.vae_cache_dir / LCM_DIR, rank, options.shard_bytes) for d in datasets}
    readers: dict[str, object] = {}

    def todo(batch: Batch) -> tuple[list[ImageItem], list[ImageItem]]:
        """(items whose latent is missing, items whose latent is stored but time_ids or SimpleTuner file are not)."""
        writer, dataset = writers[batch.dataset], by_id[batch.dataset]
        missing = [item for item in batch.items if item.cache_key not in writer]

        def lacks_file(item: ImageItem) -> bool:
            if not options.simpletuner_format:
                return False
            return not _pt_done(writer, item.cache_key, _latent_file(dataset, item.cache_key))

        incomplete = [
            item for item in batch.items
            if item.cache_key in writer and (item.cache_key + TIME_IDS not in writer or lacks_file(item))
        ]
        return missing, incomplete

    work = [(batch, *todo(batch)) for batch in batches]
    work = [(batch, missing, incomplete) for batch, missing, incomplete in work if missing or incomplete]
    report.reused += sum(len(b.items) for b in batches) - sum(len(missing) for _, missing, _ in work)
    vae = models.vae() if any(missing for _, missing, _ in work) else None
    # Why each batch with something to encode cannot be (None: it can), decided before anything is decoded.
    problems = [vae_memory_problem(vae, batch.items[0].sample["target_size"]) if missing else None
                for batch, missing, _ in work]
    bar = tqdm(total=sum(len(b.items) for b, _, _ in work), unit="img", desc=f"latents (rank {rank})",
               disable=rank != 0 or not work)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcm-decode") as decoder:
        decoding = {}

        def decode_ahead(index: int) -> None:
            if index < len(work) and work[index][1] and problems[index] is None:
                decoding[index] = decoder.submit(_decode, work[index][0], options.threads)

        decode_ahead(0)
        for index, (batch, missing, incomplete) in enumerate(work):
            decode_ahead(index + 1)
            dataset, writer = by_id[batch.dataset], writers[batch.dataset]
            for item in incomplete:
                if item.cache_key + TIME_IDS not in writer:
                    _put(writer, item.cache_key + TIME_IDS, torch.tensor(time_ids(item.sample), dtype=torch.int64))
                path = _latent_file(dataset, item.cache_key)
                if options.simpletuner_format and not _pt_done(writer, item.cache_key, path):
                    if batch.dataset not in readers:
                        readers[batch.dataset] = _open_reader(dataset.vae_cache_dir / LCM_DIR)
                    latent = readers[batch.dataset].get_torch(item.cache_key).clone()
                    _write_pt(writer, item.cache_key, path, latent, dataset.compress_vae)
            if problems[index]:
                report.failed += [(str(item.path), problems[index]) for item in missing]
            elif missing:
                _encode_decoded(decoding.pop(index).result(), batch, dataset, writer, vae, settings, options, report)
            bar.update(len(batch.items))
    bar.close()
    for writer in writers.values():
        fault_point("commit")
        writer.close()
    if work:
        report.encode_seconds = time.perf_counter() - start


def _encode_decoded(decoded, batch: Batch, dataset: Dataset, writer, vae, settings: RunSettings,
                    options: BuildOptions, report: BuildReport) -> None:
    """VAE-encodes one decoded batch and puts what the store lacks (latent, time_ids, SimpleTuner file)."""
    import torch

    from lcm_plugin.cache_build.encode import encode_latents

    pixels, ok, errors = decoded
    report.failed += [(str(batch.items[i].path), message) for i, message in errors]
    if not ok:
        return
    items = [batch.items[i] for i in ok]
    try:
        latents = encode_latents(vae, pixels, [item.key for item in items], settings.seed)
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not isinstance(error, torch.OutOfMemoryError) and "allocate" not in str(error):
            raise
        w, h = batch.items[0].sample["target_size"]
        report.failed += [
            (str(item.path), f"the VAE ran out of memory on its {w}x{h} target (batch of {len(items)}); "
             "leave such images out with minimum_aspect_ratio / maximum_aspect_ratio or "
             "minimum_image_size, or lower vae_batch_size")
            for item in items if item.cache_key not in writer
        ]
        return
    fault_point("encoded")
    for item, latent in zip(items, latents):
        if item.cache_key not in writer:
            _put(writer, item.cache_key, latent)
            report.encoded += 1
        if item.cache_key + TIME_IDS not in writer:
            _put(writer, item.cache_key + TIME_IDS, torch.tensor(time_ids(item.sample), dtype=torch.int64))
        path = _latent_file(dataset, item.cache_key)
        if options.simpletuner_format and not _pt_done(writer, item.cache_key, path):
            value = latent.clone(memory_format=torch.contiguous_format)  # the VAE's may be channels-last
            _write_pt(writer, item.cache_key, path, value, dataset.compress_vae)


def _encode_captions(
    datasets: list[Dataset], prints: Fingerprints, options: BuildOptions, rank: int, world: int,
    report: BuildReport, models,
) -> None:
    """Captions in fixed chunks of TEXT_BATCH (rank r takes chunks r, r + N, ...). A chunk with any caption missing
    is encoded whole, as latents are: an encoder's output bits can depend on the batch it ran in, and the same
    chunk gives the same embeddings after a kill, whatever the number of processes."""
    from tqdm import tqdm

    from lcm_plugin.cache_build.encode import encode_prompts
    from lcm_plugin.cache_build.simpletuner_format import text_cache_path

    compress = {d.text_cache_dir: d.compress_text for d in datasets}
    work = []  # (folder, writer, chunks with a caption to encode, captions stored but missing their SimpleTuner file)
    for folder, captions in unique_captions(datasets).items():
        writer = _open_writer(folder / LCM_DIR, rank, options.shard_bytes)
        chunks = [captions[start : start + TEXT_BATCH] for start in range(0, len(captions), TEXT_BATCH)][rank::world]
        encode, files = [], []
        for chunk in chunks:
            keys = [text_entry(caption, prints.text_digest) for caption in chunk]
            if not all(prints.has_text(writer, key) for key in keys):
                encode.append(chunk)
            elif options.simpletuner_format:
                files += [c for c, k in zip(chunk, keys) if not _pt_done(writer, k, text_cache_path(folder, c))]
        work.append((folder, writer, encode, files))
    for folder, writer, _, files in work:
        reader = _open_reader(folder / LCM_DIR) if files else None
        for caption in files:
            key = text_entry(caption, prints.text_digest)
            value = {
                "prompt_embeds": reader.get_torch(key + PROMPT_EMBEDS)[None].clone(),
                "pooled_prompt_embeds": reader.get_torch(key + POOLED_PROMPT_EMBEDS).clone(),
            }
            _write_pt(writer, key, text_cache_path(folder, caption), value, compress[folder])
    if any(chunks for _, _, chunks, _ in work):
        tokenizers, encoders = models.text_encoders()
        bar = tqdm(total=sum(len(c) for _, _, chunks, _ in work for c in chunks), unit="caption",
                   desc=f"text (rank {rank})", disable=rank != 0)
        for folder, writer, chunks, _ in work:
            for chunk in chunks:
                prompt_embeds, pooled = encode_prompts(tokenizers, encoders, chunk, prints.family)
                fault_point("encoded")
                for index, (caption, embeds) in enumerate(zip(chunk, prompt_embeds)):
                    key = text_entry(caption, prints.text_digest)
                    if key + PROMPT_EMBEDS not in writer:
                        _put(writer, key + PROMPT_EMBEDS, embeds)
                        report.captions += 1
                    if pooled is not None and key + POOLED_PROMPT_EMBEDS not in writer:
                        _put(writer, key + POOLED_PROMPT_EMBEDS, pooled[index])
                    path = text_cache_path(folder, caption)
                    if options.simpletuner_format and not _pt_done(writer, key, path):  # `cache build`: SDXL only
                        value = {"prompt_embeds": embeds[None].clone(), "pooled_prompt_embeds": pooled[index].clone()}
                        _write_pt(writer, key, path, value, compress[folder])
                bar.update(len(chunk))
        bar.close()
    for _, writer, _, _ in work:
        fault_point("commit")
        writer.close()


def _load(loader, path: str, dtype: str, what: str):
    try:
        return loader(path, dtype)
    except (OSError, ValueError, EnvironmentError) as error:
        raise BuildError(f"cannot load the {what} from {path!r}: {str(error).splitlines()[0]}") from None


def write_manifest(dataset: Dataset, items: list[ImageItem], prints: Fingerprints, failed: dict[str, str]) -> None:
    """<cache_dir_vae>/lcm/manifest.json: the fingerprints, the settings, per image its latent key (with the
    recipe that names it), bucket, time_ids and caption keys, and the planned images that could not be encoded
    (`failed`: path -> reason). A reader takes keys from here after checking them against its own config
    (`check_run`, which `simpletuner-lcm cache verify RUN` runs).

    Written entry by entry, one per line (`read_manifest_entries` relies on it): first line the other fields, then
    `"images": [`, the entries, `],`, `"failed": [`, its entries, `]}`."""
    from lcm_plugin.cache_build.simpletuner_format import write_atomic_parts

    head = {
        "format": "simpletuner-lcm-manifest",
        "format_version": MANIFEST_VERSION,
        "dataset": dataset.id,
        "instance_data_dir": str(dataset.data_dir),
        "text_cache": str(dataset.text_cache_dir / LCM_DIR),
        "fingerprint": prints.latent,
        "text_fingerprint": prints.text,
        "settings": {
            "bucket": dataset.bucket_config,
            "minimum_aspect_ratio": dataset.minimum_aspect_ratio,
            "maximum_aspect_ratio": dataset.maximum_aspect_ratio,
            "caption_strategy": dataset.caption_strategy,
            "instance_prompt": dataset.instance_prompt,
            "prepend_instance_prompt": dataset.prepend_instance_prompt,
        },
    }
    images = (
        {
            "image": item.key,
            "key": item.cache_key,
            "recipe": _recipe(item, prints),
            "bucket": item.sample["bucket"],
            "time_ids": time_ids(item.sample),
            "captions": [text_entry(caption, prints.text_digest) for caption in item.captions],
        }
        for item in items
    )
    failures = (
        {"image": item.key, "key": item.cache_key, "recipe": _recipe(item, prints), "reason": failed[item.path]}
        for item in dataset.images
        if item.path in failed
    )

    def listed(entries):
        for number, entry in enumerate(entries):
            yield ("" if number == 0 else ",\n") + json.dumps(entry)

    write_atomic_parts(dataset.vae_cache_dir / LCM_DIR / MANIFEST, chain(
        (json.dumps(head)[:-1] + ",\n", '"images": [\n'), listed(images), ('\n],\n', '"failed": [\n'),
        listed(failures), ("\n]}\n",),
    ))


def check_run(config_dir: Path) -> list[str]:
    """What makes the caches of the run in `config_dir` differ from what its current config produces, one line
    per folder and reason (empty when they match): the manifest's fingerprints and keys against the plan, and
    every listed entry against the store (present, shape, dtype, time_ids)."""
    from lcm_plugin.cache_build.fingerprint import changes

    _, datasets, prints = plan_run(config_dir, None)
    problems = []
    text_readers: dict[Path, object] = {}
    for dataset in datasets:
        folder = dataset.vae_cache_dir / LCM_DIR
        manifest = read_manifest(folder)
        if manifest is None:
            problems.append(f"{folder}: no {MANIFEST} of format {MANIFEST_VERSION}; run simpletuner-lcm cache build")
            continue
        for name, current in (("fingerprint", prints.latent), ("text_fingerprint", prints.text)):
            if manifest.get(name) != current:
                reasons = changes(manifest.get(name) or {}, current) or ["its fingerprint differs"]
                problems.append(f"{folder}: built with other settings: {'; '.join(reasons)}")
        listed = {entry["image"]: entry for entry in manifest["images"] + manifest.get("failed", [])}
        stale: Counter = Counter()
        reader = _open_reader(folder)
        for item in dataset.images:
            entry = listed.get(item.key)
            if entry is None:
                stale["not in the manifest (a new image)"] += 1
            elif entry["key"] != item.cache_key:
                fields = {k: v for k, v in entry.get("recipe", {}).items() if k != "fingerprint"}
                stale.update(changes(fields, {k: v for k, v in _recipe(item, prints).items() if k != "fingerprint"})
                             or ["its recipe changed (see the fingerprint line)"])
            elif "reason" in entry:
                continue  # a failure the manifest records, with the same recipe
            elif entry["captions"] != [text_entry(caption, prints.text_digest) for caption in item.captions]:
                stale["its captions changed"] += 1
            else:
                texts = text_readers.setdefault(dataset.text_cache_dir, _open_reader(dataset.text_cache_dir / LCM_DIR))
                if not all(prints.has_text(texts, key) for key in entry["captions"]):
                    stale["a caption's embeddings are missing from the text store"] += 1
                if reader is None or item.cache_key not in reader or item.cache_key + TIME_IDS not in reader:
                    stale["listed, but missing from the store"] += 1
                else:
                    try:
                        _check_entry(reader, folder, item, prints)
                    except BuildError as error:
                        problems.append(str(error))
        stale["listed, but no longer in the dataset (removed, unreadable or left out)"] += len(
            listed.keys() - {item.key for item in dataset.images}
        )
        problems += [f"{folder}: {count} image(s) stale: {reason}" for reason, count in sorted(stale.items()) if count]
    return problems


def print_report(report: BuildReport, rank: int) -> None:
    rate = report.encoded / report.encode_seconds if report.encode_seconds else 0.0
    print(
        f"cache build (rank {rank}): {report.encoded} image(s) encoded ({rate:.1f} images/s), {report.reused} "
        f"already cached, {report.captions} caption(s) encoded, {len(report.failed)} file(s) skipped; "
        f"{report.seconds:.1f} s in all",
        file=sys.stderr,
    )
