"""`simpletuner-lcm cache build`: fill a run's latent and text caches, resumably, on one or many processes.

Order of work (every rank derives the same plan; the ranks that fill one copy of the stores split it, the r-th of N
taking batches r, r + N, ...: every rank, or with a local cache folder per machine each machine's ranks, `ranks.Crew`),
one module a step:
1. `plan`: read and validate config.json + multidatabackend.json, list and header-scan every image through the scan
   memo, bucket it; `fingerprint`: fingerprint the VAE and text encoders and name every entry by its recipe (each
   machine's first rank plans first and writes the memos, its other ranks plan from them);
2. `store` and `checks` (the crew's first rank): verify the existing stores and drop failing shards, compare them with
   the plan (log what is to encode and why, check the shape and time_ids of every cached entry), remove
   SimpleTuner-format files of ours that the plan no longer produces; all ranks wait. A plan whose completion record
   (`manifest`) matches skips this, and 3-5;
3. `fill`: VAE batches decoded/resized/cropped in Rust (the next batch on a helper thread while the VAE encodes this
   one), encoded in torch, latents + SDXL time_ids put in the stores;
4. `fill`: captions encoded with the run's text encoders, prompt_embeds (+ pooled_prompt_embeds for SDXL) put;
5. ranks exchange the images that failed; the crew's first rank writes each dataset's manifest and completion record
   (`manifest`) and, with --format simpletuner, SimpleTuner's bucket metadata (`simpletuner_format`).
`ranks` says how the processes agree at the end of each step.

`build` runs it all for `simpletuner-lcm cache build` (models loaded from the run's paths, ranks over gloo);
`build_planned` runs steps 2-5 for a caller that planned itself and brings its own models and process group
(`simpletuner train`, lcm_plugin.trainer_cache).

Resumable: a shard is committed atomically, and a batch with any latent missing is re-encoded whole (the same
images, so the same latents) while only its missing keys are written. A kill at any point loses at most the
uncommitted tail. Keys carry their recipe's digest, so nothing committed under an earlier config is ever taken
for the current one.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lcm_plugin.cache_build.checks import check_entry, compare_with_caches
from lcm_plugin.cache_build.faults import fault_point
from lcm_plugin.cache_build.fill import FileModels, encode_captions, encode_images
from lcm_plugin.cache_build.fingerprint import (
    Fingerprints,
    fingerprints,
    name_entries,
    recipe_of,
)
from lcm_plugin.cache_build.layout import (
    LCM_DIR,
    MANIFEST,
    MANIFEST_VERSION,
    TIME_IDS,
    text_entry,
)
from lcm_plugin.cache_build.manifest import (
    read_completion,
    read_manifest,
    write_completion,
    write_manifest,
)
from lcm_plugin.cache_build.plan import (
    BuildError,
    Dataset,
    RunSettings,
    datasets_of,
    read_run,
    scan_dataset,
    vae_batches,
)
from lcm_plugin.cache_build.ranks import Crew
from lcm_plugin.cache_build.store import open_reader, prune_stores, repair


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
    # dataset id -> SimpleTuner's bucket metadata as rank 0 wrote it (simpletuner_format.WrittenMetadata), for a reader
    # in this process that would parse the file again (the trainer's data path)
    bucket_metadata: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0  # the whole build, model loading included
    encode_seconds: float = 0.0  # decode + VAE encode + write of the images


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the process count, from the variables `accelerate launch` / torchrun set."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def plan_run(
    config_dir: Path, threads: int | None, remember: bool = False, shared: frozenset[tuple[int, int]] = frozenset()
) -> tuple[RunSettings, list[Dataset], Fingerprints]:
    """Settings, scanned and keyed datasets, and fingerprints of the run in `config_dir`; with `remember`, the scans
    update their memos; memos whose tokens are `shared` are taken as they are (`scan_dataset`)."""
    settings, entries = read_run(config_dir)
    datasets = [scan_dataset(d, settings.seed, threads, remember=remember, shared_memos=shared)
                for d in datasets_of(settings, entries)]
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

    def close(self, finished: bool) -> None:
        """`finished`: every rank got through every phase, so all of them meet in a last barrier first. Then no rank
        tears gloo down while another's last gather is in flight, and gloo's worker threads have let go of that
        gather's tensors before the interpreter finalises: a worker releasing a Python-made tensor then aborts the
        process ("terminate called without an active exception", seen once in CI on rank 0)."""
        if self.world > 1:
            import torch.distributed as dist

            if finished:
                dist.barrier()
            dist.destroy_process_group()


def build(options: BuildOptions, log=print) -> BuildReport:
    """Run the whole build on this rank. Raises BuildError for bad input (config, model, unwritable cache)."""
    import time

    start = time.perf_counter()
    rank, world = rank_and_world()
    if options.prune and world > 1:
        raise BuildError("--prune rewrites the stores: run it in one process, not under a multi-process launcher")
    from lcm_plugin.cache_build.ranks import plan_on_every_rank

    group = _Group(world)
    finished = False
    try:
        # Each machine's first rank plans first and writes the scan memos; its other ranks plan from them.
        first_on_machine = int(os.environ.get("LOCAL_RANK", rank)) == 0

        def refuse_elsewhere(planned) -> None:
            settings, datasets, _ = planned
            elsewhere = next((d for d in datasets if d.image_reader() is not None), None)
            if options.simpletuner_format and elsewhere is not None:
                where = "an S3 bucket" if elsewhere.remote is not None else f"{elsewhere.packed.kind} files"
                raise BuildError(f"{settings.backend_path}: dataset {elsewhere.id!r} is in {where}: --format "
                                 "simpletuner writes SimpleTuner's files next to local images only; build without it")

        (settings, datasets, prints), crew = plan_on_every_rank(
            group, rank, first_on_machine,
            lambda memos: plan_run(options.config_dir, options.threads, remember=memos is None,
                                   shared=memos or frozenset()),
            check=refuse_elsewhere)
        report = build_planned(
            settings, datasets, prints, options, crew=crew, group=group, models=FileModels(settings),
            write_bucket_files=options.simpletuner_format, remove_stale_files=True, log=log,
        )
        if rank == 0 and options.prune:
            prune_stores(datasets, prints, options.shard_bytes, log)
        finished = True
    finally:
        group.close(finished)
    report.seconds = time.perf_counter() - start
    return report


def build_planned(
    settings: RunSettings, datasets: list[Dataset], prints: Fingerprints, options: BuildOptions, *, crew: Crew,
    group, models, write_bucket_files: bool, remove_stale_files: bool, log,
) -> BuildReport:
    """Steps 2-5 of the module docstring for planned, keyed `datasets`. `group` synchronises the ranks (`gather`);
    `models` gives the VAE and the text encoders (`vae()`, `text_encoders()`), asked only when something is to be
    encoded; `remove_stale_files`: `compare_with_caches`' cleanup of SimpleTuner-format files. Every rank returns with
    the manifests written (`report.failed_on_any_rank` lists what failed), or every rank raises (ranks.Phase: its own
    error where a part failed, `RankFailed` on the others).

    `crew`: the ranks that fill the stores this rank writes to (every rank, or this machine's: ranks.Crew); they
    split the work, and their leader checks the stores and writes the manifests and bucket files.

    Collectives, the same on every rank whatever raised where: one gather at the end of each of three phases (the
    leaders' checks, which also compare the ranks' plans; encoding, which also pools the failed images; the leaders'
    manifests and bucket files). Each gather also holds back the ranks until the leaders' part of its phase is done."""
    from lcm_plugin.cache_build.ranks import Phase, plan_summary, require_same_plan

    report = BuildReport()
    summary = plan_summary(datasets, prints)
    with Phase(group, "the checks of the existing caches") as checks:
        complete_before, failed_before = False, []
        if crew.leads:  # every rank scans; one per crew reports
            fault_point("checks")
            for dataset in datasets:
                report.failed += [(str(path), reason) for path, reason in dataset.skipped]
                for reason, count in Counter(reason for _, reason in dataset.excluded).items():
                    log(f"cache build: {dataset.id}: {count} image(s) left out, as SimpleTuner does: {reason}")
            repaired = repair(datasets, log)
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
    complete_before = checks.shared[crew.leader][1]
    batches = vae_batches(datasets, settings.vae_batch_size)[crew.index::crew.size]
    with Phase(group, "encoding") as encoding:
        if complete_before:
            report.reused = sum(len(batch) for batch in batches)
            report.failed += checks.shared[crew.leader][2] if crew.leads else []
        else:
            encode_images(batches, datasets, settings, prints, options, crew.rank, report, models)
            encode_captions(datasets, prints, options, crew, report, models)
        encoding.share(report.failed)
    failed = dict(pair for failed_on_rank in encoding.shared for pair in failed_on_rank)
    report.failed_on_any_rank = failed
    with Phase(group, "the writing of the manifests and bucket files"):
        if crew.leads:
            for dataset in datasets:
                if not complete_before:
                    fault_point("manifest")
                    write_manifest(dataset, (item for item in dataset.images if item.path not in failed), prints,
                                   failed)
                if write_bucket_files:
                    from lcm_plugin.cache_build.simpletuner_format import (
                        write_bucket_metadata,
                    )

                    report.bucket_metadata[dataset.id] = write_bucket_metadata(
                        dataset, dataset.images.positions_of(failed))
                if not complete_before:
                    write_completion(dataset, summary[0], failed)
    return report


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
        reader = open_reader(folder)
        for item in dataset.images:
            entry = listed.get(item.key)
            if entry is None:
                stale["not in the manifest (a new image)"] += 1
            elif entry["key"] != item.cache_key:
                fields = {k: v for k, v in entry.get("recipe", {}).items() if k != "fingerprint"}
                stale.update(changes(fields, {k: v for k, v in recipe_of(item, prints).items() if k != "fingerprint"})
                             or ["its recipe changed (see the fingerprint line)"])
            elif "reason" in entry:
                continue  # a failure the manifest records, with the same recipe
            elif entry["captions"] != [text_entry(caption, prints.text_digest) for caption in item.captions]:
                stale["its captions changed"] += 1
            else:
                texts = text_readers.setdefault(dataset.text_cache_dir, open_reader(dataset.text_cache_dir / LCM_DIR))
                if not all(prints.has_text(texts, key) for key in entry["captions"]):
                    stale["a caption's embeddings are missing from the text store"] += 1
                if reader is None or item.cache_key not in reader or item.cache_key + TIME_IDS not in reader:
                    stale["listed, but missing from the store"] += 1
                else:
                    try:
                        check_entry(reader, folder, item, prints)
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
