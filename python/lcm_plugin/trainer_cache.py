"""The Rust data path inside `simpletuner train`: the trainer builds the memory-mapped caches itself, before
SimpleTuner's own VAE and text caching, and reads latents and text embeddings from them (docs/data-path.md,
"Inside `simpletuner train`").

The SimpleTuner side (which methods are replaced, and when they are called) lives in
`lcm_plugin.simpletuner.data_path_patches`; this module holds the logic and imports no SimpleTuner module. Its state is
one `Coverage` per training process: the datasets and text caches it serves, set by `prepare` and read by the
patched cache methods.

Switch: environment variable `SIMPLETUNER_LCM_DATA_PATH`: unset or empty = this path for LCM runs
(`distillation_method: lcm`) and SimpleTuner's own for the rest; `rust` = this path for every run it covers;
`simpletuner` = SimpleTuner's own path for every run.

A dataset this path does not cover goes to SimpleTuner's own path, with one log line naming it and why; so does
every image or caption missing from the shards (an image the build could not decode, a caption SimpleTuner
builds differently): nothing here stops a run that SimpleTuner would train.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from itertools import chain, filterfalse
from dataclasses import dataclass, field, replace
from pathlib import Path

logger = logging.getLogger("simpletuner-lcm")

SWITCH = "SIMPLETUNER_LCM_DATA_PATH"
RUST, SIMPLETUNER = "rust", "simpletuner"
# Entries that describe caches or captions, not training samples: never logged as fallbacks.
NOT_SAMPLES = ("text_embeds", "image_embeds", "conditioning_image_embeds", "distillation_cache", "caption")
# skip_file_discovery words that ask SimpleTuner not to (re)build a cache or the buckets: honoured by its own path.
SKIPPED_DISCOVERY = ("vae", "aspect", "text", "metadata")


class DataPathSwitchError(ValueError):
    """SIMPLETUNER_LCM_DATA_PATH holds a value that is not a mode."""


def data_path_mode(value: str | None, lcm_run: bool) -> str:
    """RUST or SIMPLETUNER for a run, from the switch's value and whether the run distils with LCM."""
    chosen = (value or "").strip().lower()
    if chosen not in ("", RUST, SIMPLETUNER):
        raise DataPathSwitchError(
            f"{SWITCH}={value!r} is not valid; use {RUST!r} (the plugin's memory-mapped caches), "
            f"{SIMPLETUNER!r} (SimpleTuner's own caching) or leave it unset ({RUST} for LCM runs)"
        )
    if chosen:
        return chosen
    return RUST if lcm_run else SIMPLETUNER


@dataclass
class DatasetCache:
    """A covered dataset: its latent store and the key of every image it holds, by SimpleTuner's image path."""

    id: str
    reader: object  # LatentCacheReader over <cache_dir_vae>/lcm
    # SimpleTuner's name of an image (os.path.abspath of its file; an S3 dataset's object key) -> its store key, for
    # the images read from `reader` (lcm_plugin.cache.ServedImages)
    served: Mapping[str, str]
    # the bucket metadata this process wrote (simpletuner_format.WrittenMetadata), until SimpleTuner loads it
    # (`take_bucket_metadata`)
    written_metadata: object | None = None
    # (data folder, or an S3 dataset's key prefix; the extensions it was listed for; its inventory) until SimpleTuner
    # lists the folder or bucket (`take_listing`)
    listed: tuple | None = None
    # (the parquet source the plan read, its caption cells) of a caption_strategy parquet dataset, until SimpleTuner's
    # ParquetMetadataBackend extracts its captions (`take_parquet_captions`)
    parquet_captions: tuple | None = None
    kind: str = "local"  # the entry's type: only a local dataset's images are named by their file paths
    # SimpleTuner's bucket index file as this process wrote it (simpletuner_format.WrittenIndex; local datasets)
    written_index: object | None = None
    listing_answered: bool = False  # `take_listing` answered SimpleTuner's listing of the dataset
    # SimpleTuner's list of the dataset's files, once its bucket refresh is known to find nothing new in it
    # (`finds_nothing_new`), until it checks its buckets against the list (`misses_nothing`)
    refresh_listing: object | None = None

    @property
    def in_bucket(self) -> bool:
        return self.kind == "aws"

    def key_of(self, image_path: str) -> str | None:
        key = self.served.get(image_path)
        if key is None and self.kind == "local":
            key = self.served.get(os.path.abspath(image_path))
        if key is None and self.kind == "webshart":
            key = self.served.get(webshart_sample_id(image_path))
        return key


def webshart_sample_id(image_path: str) -> str:
    """SimpleTuner's name of a webshart sample in a path its sampler or a path join made of it
    (`WebshartDataBackend.normalize_sample_id`: from the `webshart://` marker on, or `webshart:/` as a path
    normalisation leaves it)."""
    marker = image_path.find("webshart://")
    if marker >= 0:
        return image_path[marker:]
    marker = image_path.find("webshart:/")
    return "webshart://" + image_path[marker + len("webshart:/"):] if marker >= 0 else image_path


@dataclass
class TextCache:
    """A covered text cache folder: its store, the text fingerprint digest that names its entries, and the
    model family whose SimpleTuner files it stands for."""

    reader: object  # LatentCacheReader over <cache_dir>/lcm
    digest: str
    family: str

    def entry_of(self, file_name: str) -> str | None:
        """Store key prefix of SimpleTuner's text cache file `file_name` (TextEmbeddingCache.create_hash:
        <md5(caption)>-<model_family>.pt), if the store holds every part of it."""
        from lcm_plugin.cache_build.layout import TEXT_PARTS

        base, suffix = os.path.basename(file_name), f"-{self.family}.pt"
        if not base.endswith(suffix):
            return None
        key = f"{base[: -len(suffix)]}@{self.digest}"
        return key if all(key + part in self.reader for part in TEXT_PARTS[self.family]) else None


@dataclass
class Coverage:
    """What this training process serves from the shards."""

    datasets: dict[str, DatasetCache] = field(default_factory=dict)
    texts: dict[str, TextCache] = field(default_factory=dict)  # os.path.abspath(text cache folder) -> store


_coverage = Coverage()


def coverage() -> Coverage:
    return _coverage


def reset() -> None:
    """Serve nothing (SimpleTuner's own path everywhere) until the next `prepare`."""
    global _coverage
    _coverage = Coverage()


@dataclass
class TrainerModels:
    """The trainer's own VAE and text encoders (already on its device), handed to the build; for the families whose
    captions SimpleTuner's model encodes itself (layout.MODEL_ENCODED_FAMILIES), that encoding too."""

    vae_model: object
    tokenizers: list
    encoders: list
    # one caption -> the dict SimpleTuner's text cache would save for it (None: the build encodes with `encoders`)
    encode_caption: Callable[[str], dict] | None = None
    # (name, value) pairs of the settings `encode_caption` depends on, for the text fingerprint
    text_options: tuple = ()

    def vae(self):
        return self.vae_model

    def text_encoders(self) -> tuple[list, list]:
        return self.tokenizers, self.encoders


class AcceleratorGroup:
    """The build's rank synchronisation over the trainer's own process group (accelerate's): the ranks meet only in
    `gather`, at the end of each phase (cache_build/ranks.py)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def gather(self, value: list) -> list:
        if self.accelerator.num_processes == 1:
            return list(value)
        from accelerate.utils import gather_object

        return list(gather_object(list(value)))


def dtype_name(dtype) -> str | None:
    """The cache's name of a torch dtype ("bf16", "fp16", "fp32"), None for others."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype)


def uncovered_reason(entry: dict, args) -> str | None:
    """Why a dataset entry goes to SimpleTuner's own path, judged from its settings and the run's; None if covered.
    (Entries the build cannot read at all, e.g. non-local ones, are refused later with the build's own message.)"""
    dataset_type = entry.get("dataset_type", "image")
    if dataset_type != "image":
        return f"dataset_type {dataset_type!r} (the path covers still images)"
    from lcm_plugin.cache_build.plan import PACKED_KINDS, SIZED_BY

    if entry.get("type", "local") not in ("local", "aws", *PACKED_KINDS):
        return (f"type {entry.get('type')!r} (the path reads local folders, S3 buckets, webshart shards and Hugging "
                "Face datasets on disk)")
    if entry.get("conditioning_type") or entry.get("conditioning_data") or getattr(args, "controlnet", False):
        return "conditioning datasets and datasets linked to one are not covered"
    if entry.get("crop_style") == "face" or (getattr(args, "crop_style", None) == "face" and "crop_style" not in entry):
        return "crop_style 'face' (face detection is SimpleTuner's)"
    for name in ("vae_cache_ondemand", "vae_cache_disable"):
        if entry.get(name) or (entry.get(name) is None and getattr(args, name, False)):
            return f"{name} (latents are encoded during training)"
    skipped = f"{getattr(args, 'skip_file_discovery', '') or ''} {entry.get('skip_file_discovery', '') or ''}"
    words = [word for word in SKIPPED_DISCOVERY if word in skipped]
    if words:
        return f"skip_file_discovery {', '.join(words)}"
    own = entry.get("type") if entry.get("type") in PACKED_KINDS else None
    if (entry.get("metadata_backend") or "discovery") not in ((own,) if own else set(SIZED_BY) - set(PACKED_KINDS)):
        return f"metadata_backend {entry.get('metadata_backend')!r} (the path sizes images by their headers, a parquet table or a packed source's index)"
    if entry.get("scan_for_errors"):
        return "scan_for_errors (it checks SimpleTuner's per-file cache)"
    if entry.get("only_instance_prompt") or getattr(args, "only_instance_prompt", False):
        return "only_instance_prompt (the build reads each image's own caption)"
    if entry.get("disable_multiline_split"):
        return "disable_multiline_split (the build takes each line of a caption file as one caption)"
    for name in ("prepend_instance_prompt", "instance_prompt"):
        if name not in entry and getattr(args, name, None):
            return f"{name} from config.json (the build reads the dataset entry's)"
    if entry.get("caption_filter_list"):
        return "caption_filter_list (SimpleTuner encodes filtered captions)"
    if getattr(args, "enable_nsfw_check", False):
        return "enable_nsfw_check (SimpleTuner's classifier filters the images)"
    return None


def prepare(config_path: Path | None, args, *, lcm_run: bool, models: TrainerModels, group, rank: int,
            local_rank: int | None = None, threads: int | None = None, listed_extensions=(),
            log=logger.info) -> Coverage:
    """Build the caches of every covered dataset of the run (all ranks call it, with the same files), write
    SimpleTuner's bucket metadata for them, and serve them from now on. Returns what is served.

    The ranks decide together (cache_build/ranks.py): planning, the build's three phases and opening the caches
    each end in one gather that every rank reaches. When any rank's part fails, every rank raises (its own error
    where it failed, `RankFailed` on the others) with nothing served, so every rank takes SimpleTuner's own path or
    none does. `threads`: worker threads of this process's Rust pools (None: rayon's default, RAYON_NUM_THREADS or
    every core). `listed_extensions`: the extensions SimpleTuner lists a dataset's files by (its
    `image_file_extensions`); the scans list them too, and answer its listing of the folder (`take_listing`).

    The first rank of each machine (`local_rank` 0) plans first, on every core, and writes the scan memos; the
    other ranks then plan from those memos (file stamps only: nothing read twice on one machine)."""
    reset()
    mode = data_path_mode(os.environ.get(SWITCH), lcm_run)
    if mode == SIMPLETUNER:
        if os.environ.get(SWITCH) and rank == 0:
            log(f"simpletuner-lcm data path: every dataset uses SimpleTuner's own caching ({SWITCH}={SIMPLETUNER})")
        return _coverage
    if threads is not None and not os.environ.get("RAYON_NUM_THREADS"):
        # The Rust calls that take no thread count (the header scan in _plan, the cache check, the training-time
        # latent gather) run on rayon's global pool, which reads this variable when first used: in the header scan.
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    from lcm_plugin.cache_build.build import BuildOptions, build_planned
    from lcm_plugin.cache_build.plan import IMAGE_EXTENSIONS
    from lcm_plugin.cache_build.ranks import Phase, plan_on_every_rank

    listed = listed_as(listed_extensions)
    if not listed >= set(IMAGE_EXTENSIONS):
        listed = frozenset()  # SimpleTuner would not list every image the scan reads: its listing stays its own
    first_on_machine = (rank if local_rank is None else local_rank) == 0
    # The machine's other ranks wait: its first one scans on every core (unless RAYON_NUM_THREADS sizes the pools).
    scan_threads = None if threads is None else max(threads, os.cpu_count() or 1)

    def plan(memos):
        if memos is None:
            return _plan(config_path, args, models, rank, listed, log, remember=True, threads=scan_threads)
        return _plan(config_path, args, models, rank, listed, log, remember=False, threads=None, shared_memos=memos)

    planned, crew = plan_on_every_rank(group, rank, first_on_machine, plan)
    if planned is None:
        return _coverage
    settings, datasets, prints = planned
    options = BuildOptions(config_dir=settings.config_path, threads=threads)
    report = build_planned(settings, datasets, prints, options, crew=crew, group=group, models=models,
                           # SimpleTuner-format files are neither read nor written here: a trainer leaves them alone
                           write_bucket_files=True, remove_stale_files=False,
                           log=lambda line: log(f"simpletuner-lcm data path: {line}"))
    with Phase(group, "opening the caches"):
        _serve(datasets, prints, report.failed_on_any_rank, report.bucket_metadata, listed)
    if rank == 0 and report.failed_on_any_rank:
        log(f"simpletuner-lcm data path: {len(report.failed_on_any_rank)} image(s) not in the shards; SimpleTuner's "
            "own path takes them (first: " + "; ".join(f"{path}: {why}" for path, why in
                                                         list(report.failed_on_any_rank.items())[:3]) + ")")
    if rank == 0:
        log(f"simpletuner-lcm data path: datasets {', '.join(repr(d.id) for d in datasets)} read latents and text "
            f"embeddings from the memory-mapped caches ({report.encoded} image(s) encoded here, {report.reused} "
            "already cached)")
    return _coverage


def _plan(config_path, args, models: TrainerModels, rank: int, listed: frozenset[str], log, *,
          remember: bool, threads: int | None, shared_memos=frozenset()):
    """(settings, covered and keyed datasets, fingerprints), or None when nothing is covered (logged once). With
    `remember`, the scans update their memos; `threads`: the scans' pool (None: rayon's global one);
    `shared_memos`: the tokens of the memos the machines' first ranks scanned (`scan_dataset`)."""
    from lcm_plugin.cache import BucketConfigError
    from lcm_plugin.cache_build.fingerprint import fingerprints, name_entries
    from lcm_plugin.cache_build.layout import FAMILIES, MODEL_ENCODED_FAMILIES
    from lcm_plugin.cache_build.plan import (
        BuildError,
        dataset_of,
        read_run,
        scan_dataset,
        text_embed_entries,
    )
    from lcm_plugin.config.databackend import is_enabled

    def fall_back(what: str, reason: str) -> None:
        if rank == 0:
            log(f"simpletuner-lcm data path: {what} uses SimpleTuner's own caching: {reason}")

    family = str(getattr(args, "model_family", "") or "")
    if family not in FAMILIES:
        fall_back("every dataset", f"model_family {family!r} (covered: {', '.join(FAMILIES)})")
        return None
    if config_path is None:
        fall_back("every dataset", "no config.json found (the path reads the run's JSON config files)")
        return None
    vae_dtype, text_dtype = dtype_name(models.vae_model.dtype), dtype_name(models.encoders[0].dtype)
    if vae_dtype not in ("bf16", "fp32"):
        fall_back("every dataset", f"the VAE runs in {models.vae_model.dtype} (covered: bf16, fp32)")
        return None
    try:
        settings, entries = read_run(Path(config_path), FAMILIES)
    except BuildError as error:
        fall_back("every dataset", str(error))
        return None
    if family in MODEL_ENCODED_FAMILIES and models.encode_caption is None:
        fall_back("every dataset", f"the trainer's {family} model does not encode captions for its text cache")
        return None
    # The trainer's models and settings decide: the fingerprint records what the entries really are, the VAE is the
    # one SimpleTuner loaded (its `vae_path`: SD3 and Flux drop an SDXL VAE for their own) and the buckets follow the
    # alignment its model may have overridden (SD3 and Flux force 64).
    trainer_vae = getattr(args, "vae_path", None)
    settings = replace(settings, vae_dtype=vae_dtype, text_dtype=text_dtype, text_options=models.text_options,
                       vae_path=trainer_vae if isinstance(trainer_vae, str) and trainer_vae else settings.vae_path,
                       aspect_bucket_alignment=int(getattr(args, "aspect_bucket_alignment",
                                                           settings.aspect_bucket_alignment)))
    text_entries = text_embed_entries(entries)
    datasets = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not is_enabled(entry) or entry.get("dataset_type") in NOT_SAMPLES:
            continue
        name = f"dataset {entry.get('id')!r}"
        reason = uncovered_reason(entry, args)
        text_entry = text_entries[0].get(entry["text_embeds"]) if "text_embeds" in entry else text_entries[1]
        if reason is None and text_entry is not None and text_entry.get("type", "local") != "local":
            reason = f"its text_embeds dataset {text_entry.get('id')!r} is not local"
        if reason is not None:
            fall_back(name, reason)
            continue
        try:
            dataset = scan_dataset(dataset_of(settings, entry, index, text_entries), settings.seed, threads,
                                   remember=remember, listed_extensions=tuple(sorted(listed)),
                                   shared_memos=shared_memos)
        except (BuildError, BucketConfigError) as error:
            fall_back(name, str(error))
            continue
        if not dataset.images:
            fall_back(name, "no image could be read and bucketed")
            continue
        datasets.append(dataset)
    if not datasets:
        return None
    try:
        prints = fingerprints(settings)
    except BuildError as error:
        fall_back("every dataset", str(error))
        return None
    name_entries(datasets, prints)
    return settings, datasets, prints


def _serve(datasets, prints, failed: dict[str, str], written_metadata: dict[str, object],
           listed: frozenset[str]) -> None:
    from lcm_plugin.cache import LatentCacheReader
    from lcm_plugin.cache_build.layout import LCM_DIR

    for dataset in datasets:
        # The build just checked every shard (rank 0, before encoding): no second CRC pass on first use.
        reader = LatentCacheReader(dataset.vae_cache_dir / LCM_DIR, verify=False)
        # Paths are absolute and normalised (plan.scan_dataset), as SimpleTuner's local backend lists them.
        served = dataset.images.table.serve(reader.native, dataset.images.positions_of(failed))
        parquet_captions = None
        if dataset.caption_strategy == "parquet":
            parquet_captions = (dataset.parquet, dataset.parquet_table.captions)
        listed_where = str(dataset.data_dir) if dataset.remote is None else dataset.remote.prefix
        # A packed source's listing stays SimpleTuner's (its backend names samples from its own index).
        answered = listed and dataset.packed is None
        kind = "aws" if dataset.remote is not None else dataset.packed.kind if dataset.packed is not None else "local"
        written = written_metadata.get(dataset.id)
        _coverage.datasets[dataset.id] = DatasetCache(dataset.id, reader, served, written,
                                                      (listed_where, listed, dataset.inventory) if answered else None,
                                                      parquet_captions, kind=kind,
                                                      written_index=getattr(written, "index", None))
        folder = os.path.abspath(dataset.text_cache_dir)
        if folder not in _coverage.texts:
            _coverage.texts[folder] = TextCache(LatentCacheReader(dataset.text_cache_dir / LCM_DIR, verify=False),
                                                prints.text_digest, prints.family)


# --- reads, called by the patched SimpleTuner methods ---------------------------------------------------------------


def cached_images(dataset_id: str):
    """Absolute paths of the images of a covered dataset held in the shards (a read-only view: `in`, `len`,
    iteration); None for a dataset not covered."""
    dataset = _coverage.datasets.get(dataset_id)
    return None if dataset is None else dataset.served


def take_bucket_metadata(dataset_id: str, metadata_file: str) -> dict | None:
    """The bucket metadata this process wrote for a covered dataset, once, if `metadata_file` is that file (a path,
    or an S3 dataset's key) and nobody rewrote it since (its stamp): what SimpleTuner's `load_image_metadata` would
    parse from it. None otherwise."""
    dataset = _coverage.datasets.get(dataset_id)
    if dataset is None or dataset.written_metadata is None:
        return None
    written, dataset.written_metadata = dataset.written_metadata, None
    return written.metadata if written.is_unchanged(metadata_file) else None


def take_listing(dataset_id: str, instance_data_dir, file_extensions) -> list[tuple] | None:
    """What SimpleTuner's `list_files` would return for a covered dataset's folder (LocalDataBackend:
    [(folder as os.walk names it, [], [absolute file paths])]) or bucket prefix (S3DataBackend: [(the keys' folder,
    [], [object keys])]), from the scan's inventory, once. None when the folder or prefix, the extensions
    (SimpleTuner's ".ext" normalisation) or the dataset are not the ones the scan listed."""
    dataset = _coverage.datasets.get(dataset_id)
    if dataset is None or dataset.listed is None or not file_extensions:
        return None
    where, extensions, inventory = dataset.listed
    if dataset.in_bucket:  # S3DataBackend lists its own prefix when given none
        same_place = isinstance(instance_data_dir, (str, type(None))) and (instance_data_dir or "") == where
    else:
        same_place = bool(instance_data_dir) and os.path.abspath(instance_data_dir) == where
    if not same_place or listed_as(file_extensions) != extensions:
        return None
    dataset.listed = None
    dataset.listing_answered = True
    if dataset.in_bucket:
        return [(folder, [], keys) for folder, keys in inventory.bucket_listing()]
    return simpletuner_listing(inventory, instance_data_dir)


def answers_bucket_refresh(dataset_id: str) -> bool:
    """Whether SimpleTuner's bucket refresh of a local covered dataset may be answered (`finds_nothing_new`): this
    process wrote its bucket index file, and the scan still waits to answer SimpleTuner's listing of its folder."""
    dataset = _coverage.datasets.get(dataset_id)
    return dataset is not None and dataset.written_index is not None and dataset.listed is not None


def finds_nothing_new(dataset_id: str, files, cache_file, buckets) -> bool:
    """Whether SimpleTuner's discovery finds no new file in `files` (its list of the dataset's files, as
    `StateTracker.set_image_files` keeps it) against `buckets`, by counting: the list is the scan's answer
    (`take_listing`), every image the scan listed is in the bucket index file this process wrote, and `buckets` were
    read from that file, unchanged (`WrittenIndex.is_loaded_in`). The buckets hold listed images only, each once,
    so equal counts mean equal sets."""
    dataset = _coverage.datasets.get(dataset_id)
    if dataset is None or dataset.written_index is None or not dataset.listing_answered:
        return False
    index = dataset.written_index
    if len(files) != sum(index.sizes.values()) or not index.is_loaded_in(cache_file, buckets):
        return False
    dataset.refresh_listing = files
    return True


def misses_nothing(dataset_id: str, files, cache_file, buckets) -> bool:
    """Whether every image of `buckets` is in `files` and none is there twice (SimpleTuner's
    `update_buckets_with_existing_files` would remove nothing): `files` is the list `finds_nothing_new` judged, once,
    and the buckets are still the ones read from the index file."""
    dataset = _coverage.datasets.get(dataset_id)
    if dataset is None or dataset.refresh_listing is None:
        return False
    judged, dataset.refresh_listing = dataset.refresh_listing, None
    return judged is files and dataset.written_index.is_loaded_in(cache_file, buckets)


def take_parquet_captions(dataset_id: str, parquet_config) -> dict | None:
    """What SimpleTuner's `ParquetMetadataBackend._extract_captions_to_fast_list` (a row-by-row pass over the whole
    table, ~20 s per million rows) would return for a covered dataset, from the plan's column read of the same file,
    once. None when the dataset or its `parquet` block (file, id and caption columns, extension rule) is not the one
    the plan read."""
    dataset = _coverage.datasets.get(dataset_id)
    if dataset is None or dataset.parquet_captions is None or not isinstance(parquet_config, dict):
        return None
    source, captions = dataset.parquet_captions
    planned = (source.path, source.filename_column, source.caption_column, source.identifier_includes_extension)
    path = str(parquet_config.get("path", ""))
    asked = (path if source.bucket is not None else os.path.abspath(path), parquet_config.get("filename_column"),
             parquet_config.get("caption_column"), bool(parquet_config.get("identifier_includes_extension", False)))
    if asked != planned:
        return None
    dataset.parquet_captions = None
    return captions


def unserved(served: Mapping[str, str], paths: Iterable[str]) -> list[str]:
    """Those of `paths` that `served` (`cached_images`) holds under neither their own name nor os.path.abspath's:
    one pass over SimpleTuner's million paths (in Rust for the shards' own mapping), only the misses normalised."""
    from lcm_plugin.cache import ServedImages

    missing = served.missing_from(paths) if isinstance(served, ServedImages) else filterfalse(served.__contains__, paths)
    return [path for path in missing if os.path.abspath(path) not in served]


def listed_as(extensions) -> frozenset[str]:
    """File extensions as LocalDataBackend.list_files matches names against them: ".ext", lower case."""
    return frozenset(f".{str(extension).lower().lstrip('.')}" for extension in extensions)


def simpletuner_listing(inventory, instance_data_dir: str) -> list[tuple]:
    """`inventory`'s files (a scan of `instance_data_dir`) in LocalDataBackend.list_files' shape: per folder, its
    name as os.walk yields it (joined to `instance_data_dir` as given), [] and its files' absolute paths."""
    folder = os.path.abspath(instance_data_dir)
    return [(root, [], files) for root, files in inventory.listing(str(instance_data_dir), folder)]


def serves_every_image(dataset_id: str, buckets: dict | None) -> bool:
    """Whether the shards hold every image of SimpleTuner's buckets of a covered dataset."""
    dataset = _coverage.datasets.get(dataset_id)
    if dataset is None or not isinstance(buckets, dict):
        return False
    served = dataset.served
    return not unserved(served, chain.from_iterable(buckets.values()))


def has_every_bucketed_metadata(dataset_id: str, image_metadata, buckets) -> bool:
    """Whether every image of SimpleTuner's buckets of a covered dataset has metadata that
    `MetadataBackend.get_metadata_by_filepath` finds as it stands (the key itself, a value not None): then its
    `_ensure_metadata_for_cached_buckets` finds nothing missing. Set operations, not a path resolution per image."""
    if dataset_id not in _coverage.datasets or not isinstance(image_metadata, dict) or not isinstance(buckets, dict):
        return False
    # `get` answers None for a path without metadata and for metadata that is None: one C-level pass, no set.
    return None not in map(image_metadata.get, chain.from_iterable(buckets.values()))


def latent(dataset_id: str, image_path: str):
    """The cached latent of one image (a tensor SimpleTuner may change in place), or None when not served."""
    dataset = _coverage.datasets.get(dataset_id)
    key = dataset.key_of(image_path) if dataset else None
    return None if key is None else dataset.reader.get_torch(key)


def gather_latents(dataset_id: str, image_paths: list[str]):
    """One [N, C, H, W] tensor of the latents of a batch (one parallel copy), or None unless every image is served."""
    dataset = _coverage.datasets.get(dataset_id)
    if dataset is None or not image_paths:
        return None
    keys = [dataset.key_of(path) for path in image_paths]
    if None in keys:
        return None
    return dataset.reader.gather_torch(keys)


def text_cache(cache_dir: str) -> TextCache | None:
    return _coverage.texts.get(os.path.abspath(cache_dir))


def has_text_embeddings(cache_dir: str, file_name: str) -> bool:
    store = text_cache(cache_dir)
    return store is not None and store.entry_of(file_name) is not None


def text_embeddings(cache_dir: str, file_name: str) -> dict | None:
    """What SimpleTuner's text cache file `file_name` would hold, from the store: {"prompt_embeds": [1, 77, D],
    "pooled_prompt_embeds": [P]} for SDXL, {"prompt_embeds": [1, 77, D]} for SD 1.x/2.x, the dict its model
    encoded for the others (layout.TEXT_PARTS); None when the store does not hold it."""
    from lcm_plugin.cache_build.layout import MODEL_ENCODED_FAMILIES, TEXT_PARTS

    store = text_cache(cache_dir)
    key = store.entry_of(file_name) if store else None
    if key is None:
        return None
    embeddings = {part[1:]: store.reader.get_torch(key + part) for part in TEXT_PARTS[store.family]}
    if store.family not in MODEL_ENCODED_FAMILIES:  # stored without the batch axis SimpleTuner's file has
        embeddings["prompt_embeds"] = embeddings["prompt_embeds"][None]
    return embeddings
