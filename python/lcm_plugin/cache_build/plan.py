"""What a cache build does, decided before any model loads: the datasets of a run, their images, captions,
buckets, and the fixed list of VAE batches every process agrees on.

No torch. The config is read here; the per-image plan (which images, their buckets, their store keys, the VAE
batches) is columns in Rust (`ImageTable`, made from the folder's scan), and Python makes an `ImageItem` only for
the images a caller works on. The plan is a function of the files on disk and the two config files only, so every
rank (and every rerun after a kill) derives the same batches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from lcm_plugin.cache_build.layout import MODEL_ENCODED_FAMILIES
from lcm_plugin.cache_build.parquet import (
    ParquetError,
    ParquetSource,
    ParquetTable,
    caption_id,
    caption_values,
    parquet_source,
    read_table,
    size_id,
)
from lcm_plugin.config import format_problems, has_errors, validate_run
from lcm_plugin.config.databackend import is_enabled
from lcm_plugin.config.problems import pointer
from lcm_plugin.config.run import find_backend_file, find_config, inherited_settings, read_json, run_root
from lcm_plugin.config.training import effective_settings

# SimpleTuner's image extensions that the Rust decoder reads (helpers/training image_file_extensions, minus
# formats it cannot decode).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# Entry keys the bucketer reads; the rest of an entry does not change geometry.
BUCKET_KEYS = (
    "resolution",
    "resolution_type",
    "crop",
    "crop_aspect",
    "crop_aspect_buckets",
    "crop_style",
    "minimum_image_size",
    "maximum_image_size",
    "target_downsample_size",
)
CAPTION_STRATEGIES = ("textfile", "filename", "instanceprompt", "parquet", "huggingface", "webshart")
# SimpleTuner's metadata backends a plan reads sizes for: the images' headers (discovery; "json" and "filesystem"
# are its other names), a parquet table's columns, or a packed source's own index (its kind's backend).
SIZED_BY = ("discovery", "json", "filesystem", "parquet", "huggingface", "webshart")
# Dataset kinds whose images lie inside other files on local disk, read through the source's own index: their
# captions and sizes come from it (caption_strategy and metadata_backend named as the kind).
PACKED_KINDS = ("webshart", "huggingface")


class BuildError(Exception):
    """A problem with the user's input that stops the build; the message names the file and key."""


@dataclass(frozen=True)
class RunSettings:
    """The config.json values a cache build needs (SimpleTuner's defaults where a key is absent)."""

    config_path: Path
    backend_path: Path
    root: Path  # where training starts: relative paths in the files resolve against it
    model_family: str
    model_path: str
    vae_path: str
    vae_dtype: str  # "bf16" or "fp32": SimpleTuner's VAE dtype here (fp32 on a plain CPU, else vae_dtype's)
    vae_batch_size: int
    text_dtype: str  # "bf16", "fp16" or "fp32": SimpleTuner's weight_dtype from mixed_precision
    compress_disk_cache: bool
    seed: int
    aspect_bucket_alignment: int
    aspect_bucket_rounding: int
    inherited: dict
    # (name, value) pairs of the settings the trainer's own model encodes captions with (MODEL_ENCODED_FAMILIES),
    # recorded in the text fingerprint; () for the families encoded here
    text_options: tuple = ()


@dataclass(slots=True)
class ImageItem:
    """One planned image, made from its row of the plan (`Images.at`) for a step that works on it: `key` (its path
    relative to the data folder, '/'-separated; an S3 object's key) names it in every cache. What the latent is a
    function of (`fingerprint.latent_recipe` of `sample` and `content`) is built only where a build writes or explains
    it."""

    path: str  # absolute (a str, not a Path); an S3 object's key
    key: str
    captions: tuple[str, ...] = ()
    sample: dict | None = None  # the bucketer's answer (bucket, sizes, crop_coordinates, ...), shared by equal answers
    content: str = ""  # hash of the file's bytes when scanned (the inventory's xxh3-128)
    cache_key: str = ""  # its latent's key in the store, `<key>@<recipe digest>` ("" until the plan is named)


@dataclass(frozen=True)
class S3Source:
    """Where a `type: aws` dataset's images are, read as SimpleTuner's S3DataBackend reads them: the objects whose
    keys start with `prefix` (a raw string prefix), named by their keys."""

    bucket: object  # lcm_plugin.cache.S3Bucket (its repr shows no credential)
    name: str
    prefix: str

    def __str__(self) -> str:
        return f"s3://{self.name}/{self.prefix}"


@dataclass(frozen=True)
class PackedSource:
    """Where a `type: webshart` or `type: huggingface` dataset's images are: inside tar shards or table files on
    local disk, listed and read by `reader` (cache_build.webshart_source / hf_source: `name`, `listing()`,
    `read(keys)`), named by SimpleTuner's names of its samples."""

    kind: str
    reader: object
    error: type  # what the reader raises for input it cannot read (its message names the file and key)

    @property
    def oriented(self) -> bool:
        """Whether SimpleTuner sees the images after their EXIF orientation (sizes, pixels); known once listed."""
        return self.reader.oriented

    def __str__(self) -> str:
        return self.reader.name


@dataclass
class Dataset:
    """An enabled image dataset of multidatabackend.json (a local folder, or an S3 bucket's prefix: `remote`) and the
    caches it fills."""

    id: str
    data_dir: Path  # the local folder; for an S3 dataset, its s3:// name (never opened)
    vae_cache_dir: Path
    text_cache_dir: Path
    bucket_config: dict
    caption_strategy: str
    instance_prompt: str | None
    prepend_instance_prompt: bool
    compress_vae: bool  # gzip SimpleTuner-format files, as its local backend would (compress_cache)
    compress_text: bool
    # SimpleTuner's bucket filters (MetadataBackend._enforce_min/max_aspect_ratio); None = off.
    minimum_aspect_ratio: float | None = None
    maximum_aspect_ratio: float | None = None
    images: Images | None = None  # set by scan_dataset
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why): unreadable
    excluded: list[tuple[Path, str]] = field(default_factory=list)  # (file, which filter), as SimpleTuner filters
    inventory: object = None  # the folder's scan (lcm_plugin.cache.Inventory), set by scan_dataset
    # (time, CRC) of the scan memo this process wrote or found current (scan_dataset with `remember`): the other
    # ranks of the machine map that memo instead of scanning again
    memo_token: tuple[int, int] | None = None
    # metadata_backend parquet: the sizes (and, for caption_strategy parquet, captions) come from this file
    parquet: ParquetSource | None = None
    parquet_table: ParquetTable | None = None  # set by scan_dataset
    remote: S3Source | None = None  # type aws: the images are this bucket's objects, named by their keys
    packed: PackedSource | None = None  # type webshart / huggingface: the images are samples of shards or tables
    listing: object = None  # the packed source's SourceListing (keys, stamps, sizes, captions), set by scan_dataset
    # what SimpleTuner's bucket file names end in (`_<suffix>.json`): the entry's cache_file_suffix, its id when the
    # key is absent, nothing when it is null (FactoryRegistry and MetadataBackend.__init__)
    bucket_file_suffix: str | None = None

    def image_path(self, key: str) -> str:
        """An image's name in SimpleTuner's metadata and in messages: its path (local), its object key (S3) or
        SimpleTuner's name of the sample (a packed source)."""
        return key if self.remote is not None or self.packed is not None else os.path.join(str(self.data_dir), key)

    def image_reader(self):
        """What reads images by name from memory (`read(names) -> (bytes or None per name, [(position, why)])`), or
        None: a local folder's files are decoded from their paths."""
        if self.remote is not None:
            return self.remote.bucket.get_all
        return None if self.packed is None else self.packed.reader.read

    def oriented(self) -> bool:
        """Whether SimpleTuner applies an image's EXIF orientation: always to a local file, never to an S3 object
        (its backend decodes the bytes whole), as its backend does for a packed source."""
        return self.packed.oriented if self.packed is not None else self.remote is None


@dataclass(frozen=True)
class Batch:
    """Images of one bucket encoded together; the same on every rank and every rerun."""

    dataset: str
    bucket: str
    positions: object  # numpy array of positions in `images`
    images: Images

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def items(self) -> list[ImageItem]:
        return self.images.at(self.positions)


def read_run(config_dir: Path, families: tuple[str, ...] = ("sdxl",)) -> tuple[RunSettings, list[dict]]:
    """Validated config.json and multidatabackend.json of `config_dir` (a folder, or a config.json), for a run of
    one of `families` (`cache build` writes SDXL's SimpleTuner files; the trainer's data path covers more)."""
    config_path = config_dir if config_dir.is_file() else find_config(config_dir)
    if config_path is None:
        raise BuildError(f"no config.json in {config_dir} or {config_dir / 'config'}")
    raw_config, unreadable = read_json(config_path)
    problems = unreadable or validate_run(raw_config, config_path, cache_build=True)
    if has_errors(problems):
        errors = [problem for problem in problems if problem.severity == "error"]
        if len(errors) == 1:  # its line names the file and key
            raise BuildError(format_problems(errors))
        raise BuildError("the config has errors (simpletuner-lcm validate shows them all):\n" + format_problems(errors))
    backend_path, _ = find_backend_file(raw_config, config_path)
    entries, _ = read_json(backend_path)
    setting = effective_settings(raw_config).get
    # The models' dtypes are those SimpleTuner's trainer gives them on this host (the rules in encode.py name the
    # SimpleTuner functions they mirror): the cache must hold what that trainer would encode.
    from lcm_plugin.cache_build.encode import device, vae_dtype_on, weight_dtype

    vae_dtype = str(setting("vae_dtype") or "default").lower()
    if vae_dtype == "fp16":  # refused on every host: SimpleTuner refuses it wherever it has an accelerator
        raise BuildError(f"{config_path}: /vae_dtype: fp16 is not supported for SDXL's VAE (SimpleTuner refuses it)")
    root = run_root(config_path)
    settings = RunSettings(
        config_path=config_path,
        backend_path=backend_path,
        root=root,
        model_family=str(setting("model_family")),
        model_path=str(setting("pretrained_model_name_or_path")),
        vae_path=str(setting("pretrained_vae_model_name_or_path") or setting("pretrained_model_name_or_path")),
        vae_dtype=vae_dtype_on(device(), vae_dtype),
        vae_batch_size=_integer(config_path, "vae_batch_size", setting("vae_batch_size"), 4, 1),
        text_dtype=weight_dtype(
            str(setting("mixed_precision")),
            model_type=str(setting("model_type")),
            base_model_precision=str(setting("base_model_precision")),
            base_model_default_dtype=str(setting("base_model_default_dtype")),
            quantization_config=setting("quantization_config"),
            model_path=str(setting("pretrained_model_name_or_path")),
        ),
        compress_disk_cache=bool(setting("compress_disk_cache")),
        # SimpleTuner seeds numpy with it (accelerate's set_seed): numpy takes 0 to 2**32 - 1.
        seed=_integer(config_path, "seed", setting("seed"), 0, 0, 2**32 - 1),
        aspect_bucket_alignment=_integer(
            config_path, "aspect_bucket_alignment", setting("aspect_bucket_alignment"), 64, 1
        ),
        aspect_bucket_rounding=_integer(config_path, "aspect_bucket_rounding", setting("aspect_bucket_rounding"), 2, 0),
        inherited=inherited_settings(raw_config) | {"output_dir": setting("output_dir"), "cache_dir": setting("cache_dir")},
    )
    if settings.model_family not in families:
        raise BuildError(
            f"{config_path}: /model_family: cache build supports {' and '.join(families)} "
            f"(got {settings.model_family!r})"
        )
    # SimpleTuner quantises these text encoders before it caches their embeddings (Trainer.run: init_precision(
    # preprocessing_models_only=True) before init_data_backend); the build's are not quantised. (The families whose
    # captions the trainer's own model encodes are encoded by its quantised encoders, as SimpleTuner's cache is.)
    encoders = 0 if settings.model_family in MODEL_ENCODED_FAMILIES else 2 if settings.model_family == "sdxl" else 1
    for number in range(1, encoders + 1):
        key = f"text_encoder_{number}_precision"
        if setting(key) != "no_change":
            raise BuildError(
                f"{config_path}: /{key}: {setting(key)!r} quantises the text encoder, which cache build does not; "
                "remove the key (no_change) or let the trainer encode the captions"
            )
    return settings, entries


def _integer(file: Path, name: str, value, default: int, minimum: int, maximum: int | None = None) -> int:
    """config.json's integer `name` (a number or its string, as SimpleTuner's argument parser takes it), checked
    against [minimum, maximum]; `default` when absent. Raises BuildError naming the file and key."""
    if value is None:
        return default
    text = str(value).strip()
    number = int(text) if not isinstance(value, bool) and re.fullmatch(r"-?[0-9]+", text) else None
    if number is None or number < minimum or (maximum is not None and number > maximum):
        valid = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
        raise BuildError(f"{file}: /{name}: {value!r} is not valid; give an integer {valid}")
    return number


def resolve(path: str, root: Path) -> Path:
    """A path from the config files, as the trainer started in `root` sees it (absolute)."""
    # os.path.abspath, as SimpleTuner's local backend names the files it lists (so image paths compare equal).
    return Path(os.path.abspath(root / os.path.expanduser(path)))


def text_embed_entries(entries: list[dict]) -> tuple[dict[str, dict], dict | None]:
    """The enabled text_embeds entries by id, and the default one (marked `default`, else the only one)."""
    text_entries = {e["id"]: e for e in entries if e.get("dataset_type") == "text_embeds" and is_enabled(e)}
    default_text = next((e for e in text_entries.values() if e.get("default") is True), None)
    if default_text is None and len(text_entries) == 1:
        default_text = next(iter(text_entries.values()))
    return text_entries, default_text


def is_image_dataset(entry: dict) -> bool:
    return is_enabled(entry) and entry.get("dataset_type", "image") == "image"


def datasets_of(settings: RunSettings, entries: list[dict]) -> list[Dataset]:
    """The enabled image datasets, with their text cache (the entry's `text_embeds`, else the default one)."""
    text_entries = text_embed_entries(entries)
    datasets = [
        dataset_of(settings, entry, index, text_entries)
        for index, entry in enumerate(entries)
        if is_image_dataset(entry)
    ]
    if not datasets:
        raise BuildError(f"{settings.backend_path}: /: no enabled local image dataset to cache")
    return datasets


def dataset_of(
    settings: RunSettings, entry: dict, index: int, text_entries: tuple[dict[str, dict], dict | None]
) -> Dataset:
    """The image dataset of multidatabackend.json entry number `index`; BuildError naming the key it cannot take."""
    file = str(settings.backend_path)
    by_id, default_text = text_entries
    kind = entry.get("type", "local")
    if kind not in ("local", "aws", *PACKED_KINDS):
        raise BuildError(f"{file}: {pointer(index, 'type')}: cache build reads local folders, S3 buckets, webshart "
                         f"shards and Hugging Face datasets on disk (type local, aws, webshart or huggingface; "
                         f"got {kind!r})")
    remote = _s3_source(entry, index, file) if kind == "aws" else None
    packed = _packed_source(kind, entry, index, file, settings) if kind in PACKED_KINDS else None
    if remote is not None or packed is not None:
        data_dir = Path(str(remote or packed))
    else:
        data_dir = entry.get("instance_data_dir") or entry.get("instance_data_root")
        if not isinstance(data_dir, str):
            raise BuildError(f"{file}: {pointer(index, 'instance_data_dir')}: give one folder (a string)")
        data_dir = resolve(data_dir, settings.root)
        if not data_dir.is_dir():
            raise BuildError(f"{file}: {pointer(index, 'instance_data_dir')}: folder {str(data_dir)!r} does not exist")
    text_entry = by_id.get(entry["text_embeds"]) if "text_embeds" in entry else default_text
    if text_entry is None or not text_entry.get("cache_dir"):
        raise BuildError(f"{file}: {pointer(index)}: no text_embeds dataset with a cache_dir for {entry['id']!r}")
    # A packed kind's own strategy when the entry names none (SimpleTuner's factory), as its reader has it.
    strategy = (packed.reader.caption_strategy if packed is not None else
                entry.get("caption_strategy") or settings.inherited.get("caption_strategy") or "filename")
    if strategy == "instanceprompt" and not entry.get("instance_prompt"):
        raise BuildError(f"{file}: {pointer(index, 'instance_prompt')}: caption_strategy instanceprompt needs it")
    metadata_backend = entry.get("metadata_backend") or (kind if packed is not None else "discovery")
    own = kind if packed is not None else None  # the one strategy and metadata backend a packed kind is read with
    strategies = (own, "instanceprompt") if own else tuple(set(CAPTION_STRATEGIES) - set(PACKED_KINDS))
    if strategy not in strategies:
        raise BuildError(f"{file}: {pointer(index, 'caption_strategy')}: cache build reads the captions of a "
                         f"{kind} dataset with {' or '.join(map(repr, sorted(strategies)))} (got {strategy!r})")
    backends = (own,) if own else tuple(set(SIZED_BY) - set(PACKED_KINDS))
    if metadata_backend not in backends:
        raise BuildError(f"{file}: {pointer(index, 'metadata_backend')}: cache build reads the sizes of a {kind} "
                         f"dataset with {' or '.join(map(repr, sorted(backends)))} (got {metadata_backend!r})")
    try:
        parquet = None
        if metadata_backend == "parquet":
            parquet = parquet_source(entry, index, file, settings.root, remote.bucket if remote is not None else None)
    except ParquetError as error:
        raise BuildError(str(error)) from None
    suffix = entry.get("cache_file_suffix", entry["id"])
    vae_cache = entry.get("cache_dir_vae") or os.path.join(
        str(settings.inherited["output_dir"]), "cache", "vae", settings.model_family, entry["id"]
    )
    return Dataset(
        id=entry["id"],
        data_dir=data_dir,
        vae_cache_dir=resolve(vae_cache, settings.root),
        text_cache_dir=resolve(text_entry["cache_dir"], settings.root),
        bucket_config=bucket_config(entry, settings),
        caption_strategy=strategy,
        instance_prompt=entry.get("instance_prompt"),
        prepend_instance_prompt=bool(entry.get("prepend_instance_prompt", False)),
        compress_vae=_compressed(entry, settings),
        compress_text=_compressed(text_entry, settings),
        minimum_aspect_ratio=_aspect_limit(entry, "minimum_aspect_ratio", file, index),
        maximum_aspect_ratio=_aspect_limit(entry, "maximum_aspect_ratio", file, index),
        parquet=parquet,
        remote=remote,
        packed=packed,
        bucket_file_suffix=None if suffix is None else str(suffix),
    )


def _s3_source(entry: dict, index: int, file: str) -> S3Source:
    """The bucket of a `type: aws` entry (`validate` has checked that SimpleTuner's five aws_ keys are there): a null
    credential taken from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), as boto3 takes it; a
    null endpoint is AWS's own for the region. No message shows a credential."""
    from lcm_plugin.cache import LatentCacheError, S3Bucket

    prefix = entry.get("aws_data_prefix") or ""
    if not isinstance(prefix, str):
        raise BuildError(f"{file}: {pointer(index, 'aws_data_prefix')}: give one key prefix (a string)")
    name = entry["aws_bucket_name"]
    if not isinstance(name, str) or not name:
        raise BuildError(f"{file}: {pointer(index, 'aws_bucket_name')}: give the bucket's name (a string)")
    region = entry["aws_region_name"] or "us-east-1"
    endpoint = entry["aws_endpoint_url"] or f"https://s3.{region}.amazonaws.com"
    key_id = entry["aws_access_key_id"] or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = entry["aws_secret_access_key"] or os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key_id or not secret:
        raise BuildError(f"{file}: {pointer(index, 'aws_access_key_id')}: no credentials: give aws_access_key_id and "
                         "aws_secret_access_key, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    try:
        bucket = S3Bucket(str(endpoint), name, str(key_id), str(secret), region=str(region),
                          session_token=os.environ.get("AWS_SESSION_TOKEN") or None)
    except LatentCacheError as error:
        raise BuildError(f"{file}: {pointer(index, 'aws_endpoint_url')}: {error}") from None
    return S3Source(bucket, name, prefix)


def _packed_source(kind: str, entry: dict, index: int, file: str, settings: RunSettings) -> PackedSource:
    """The shards or tables of a webshart or huggingface entry, as SimpleTuner's backend for the kind reads them."""
    if kind == "webshart":
        from lcm_plugin.cache_build.webshart_source import WebshartError as SourceError
        from lcm_plugin.cache_build.webshart_source import webshart_source as open_source
    else:
        from lcm_plugin.cache_build.hf_source import HuggingfaceError as SourceError
        from lcm_plugin.cache_build.hf_source import hf_source as open_source
    # SimpleTuner's cache_dir (config.json's, else <output_dir>/cache): where its files of the dataset go by default.
    cache_dir = settings.inherited.get("cache_dir") or os.path.join(str(settings.inherited["output_dir"]), "cache")
    try:
        reader = open_source(entry, index, file, settings.root, cache_dir=cache_dir)
    except SourceError as error:
        raise BuildError(str(error)) from None
    return PackedSource(kind, reader, error=SourceError)


def _aspect_limit(entry: dict, name: str, file: str, index: int) -> float | None:
    """SimpleTuner's reading of an aspect-ratio filter: `float(value) if value else None`, 0 meaning off."""
    value = entry.get(name)
    if not value:
        return None
    try:
        limit = float(value)
    except (TypeError, ValueError):
        limit = math.nan
    if isinstance(value, bool) or not math.isfinite(limit) or limit < 0:
        raise BuildError(f"{file}: {pointer(index, name)}: {value!r} is not valid; give a positive number (W/H)")
    return limit or None


def _compressed(entry: dict, settings: RunSettings) -> bool:
    """SimpleTuner's rule: the entry's compress_cache, else config.json's compress_disk_cache."""
    value = entry.get("compress_cache")
    return settings.compress_disk_cache if value is None else bool(value)


def bucket_config(entry: dict, settings: RunSettings) -> dict:
    """The entry's geometry keys, config.json's where the entry leaves them out, plus the global bucket knobs."""
    merged = {key: entry.get(key, settings.inherited.get(key)) for key in BUCKET_KEYS}
    merged = {key: value for key, value in merged.items() if value is not None}
    merged["aspect_bucket_alignment"] = settings.aspect_bucket_alignment
    merged["aspect_bucket_rounding"] = settings.aspect_bucket_rounding
    return merged


def memo_path(dataset: Dataset) -> Path:
    """Where the scan memo of `dataset` lives: next to its latent store, not in it (the scan runs before the build
    repairs the store, and a prune swaps the store folder whole)."""
    name = hashlib.sha256(dataset.id.encode()).hexdigest()[:16]
    return dataset.vae_cache_dir / f"lcm-inventory.{name}.memo"


def captions_of(path: str | Path, dataset: Dataset, text: str | None) -> tuple[str, ...]:
    """The caption(s) SimpleTuner's PromptHandler reads for `path` (every line of a textfile is one), stripped;
    `text` is the caption file's content as the scan read it (bytes decoded as UTF-8, no newline translation, as
    SimpleTuner's LocalDataBackend.read + PromptHandler do), None when there is none. Raises BuildError naming the
    caption file when a textfile caption is missing."""
    if dataset.packed is not None:  # its reader gives SimpleTuner's captions for either of its strategies
        return _packed_captions(str(path), dataset)
    if dataset.caption_strategy == "instanceprompt":
        return (dataset.instance_prompt.strip(),)
    if dataset.caption_strategy == "parquet":
        return _parquet_captions(path, dataset)
    prepend = dataset.prepend_instance_prompt and dataset.instance_prompt
    if text is not None and not prepend and "\n" not in text and dataset.caption_strategy == "textfile":
        return (text.strip(),)  # the common case, once per image of millions
    if dataset.caption_strategy == "filename":
        captions = [os.path.splitext(os.path.basename(path))[0].replace("_", " ")]
    else:
        if text is None:
            raise BuildError(f"caption file {caption_file(path)} missing (caption_strategy textfile)")
        captions = [line for line in text.split("\n") if line] if "\n" in text else [text]
    if prepend:
        captions = [f"{dataset.instance_prompt} {caption}" for caption in captions]
    return tuple([caption.strip() for caption in captions])


def _parquet_captions(path: str | Path, dataset: Dataset) -> tuple[str, ...]:
    """PromptHandler.prepare_instance_prompt_from_parquet's captions of `path`: the table's, the instance prompt and
    a space before each when prepended."""
    name = caption_id(str(path), dataset.parquet)
    cell = dataset.parquet_table.captions.get(name)
    captions = () if cell is None else caption_values(cell)
    if not captions:
        why = "blank" if cell is not None else "missing"
        raise BuildError(f"caption {name!r} {why} in {dataset.parquet.path} (caption_strategy parquet)")
    if dataset.prepend_instance_prompt and dataset.instance_prompt:
        return tuple(f"{dataset.instance_prompt} {caption}" for caption in captions)
    return captions


def _packed_captions(name: str, dataset: Dataset) -> tuple[str, ...]:
    """A packed source's captions of sample `name`, as its listing gives them (SimpleTuner's for the kind)."""
    captions = dataset.listing.captions.get(name)
    if not captions:
        why = dataset.listing.missing_captions.get(name, "no caption")
        raise BuildError(f"{dataset.packed}: {name}: {why} (caption_strategy {dataset.caption_strategy})")
    return captions


def caption_rule(dataset: Dataset) -> str:
    """What turns an image's caption file (or name) into its captions, besides the file itself: the strategy, the
    instance prompt and, for parquet captions, a digest of the table's captions."""
    rule = [dataset.caption_strategy, dataset.instance_prompt or "", str(dataset.prepend_instance_prompt)]
    if dataset.caption_strategy == "parquet":
        cells = json.dumps(dataset.parquet_table.captions, sort_keys=True, default=str)
        rule.append(hashlib.sha256(cells.encode()).hexdigest())
    if dataset.packed is not None:
        cells = json.dumps(dataset.listing.captions, sort_keys=True)
        rule.append(hashlib.sha256(cells.encode()).hexdigest())
    return repr(rule)


def caption_file(path: str | Path) -> str:
    """SimpleTuner's PromptHandler's name for the caption file of image `path`."""
    return os.path.splitext(path)[0] + ".txt"


def scan_dataset(dataset: Dataset, seed: int, threads: int | None = None, *, remember: bool = False,
                 listed_extensions: tuple[str, ...] = (), shared_memos: Collection[tuple[int, int]] = ()) -> Dataset:
    """Fill `dataset.images` (inventory, captions, bucket of each image), `dataset.skipped` (unreadable) and
    `dataset.excluded` (left out by minimum_image_size or the aspect-ratio filters, as SimpleTuner does).

    Files whose stamps match the dataset's scan memo are not read again; with `remember`, the memo is rewritten
    when this scan changed anything (one process per machine should: the others read what it wrote or scan
    themselves), and `dataset.memo_token` names it. A memo whose token is in `shared_memos` (what the machine's
    first rank scanned in this start) is the inventory itself, mapped: nothing is stat'ed. Files with the other
    `listed_extensions` (".ext", lower case) are listed in `dataset.inventory`, not read."""
    from lcm_plugin.cache import LatentCacheError, inventory_of_memo

    memo = memo_path(dataset)
    if dataset.packed is not None:  # the source's index: keys, stamps, sizes and captions, before any image
        try:
            dataset.listing = dataset.packed.reader.listing()
        except dataset.packed.error as error:
            raise BuildError(str(error)) from None
        others = getattr(dataset.listing, "other_samples", None)
        if others:  # SimpleTuner would train them; the decoder reads none of their formats
            raise BuildError(f"{dataset.packed}: {len(others)} sample(s) in formats cache build does not decode "
                             f"(e.g. {next(iter(others))}; it reads {', '.join(IMAGE_EXTENSIONS)})")
    try:
        inventory = inventory_of_memo(memo, list(shared_memos)) if shared_memos else None
        if inventory is None:
            inventory = _scan(dataset, memo, threads, sorted(set(listed_extensions) - set(IMAGE_EXTENSIONS)))
    except (OSError, LatentCacheError) as error:
        raise BuildError(f"cannot list {dataset.data_dir}: {error}") from None
    if inventory.not_utf8:
        shown = inventory.not_utf8[0].decode("utf-8", "backslashreplace")
        raise BuildError(
            f"{shown}: the file name is not valid UTF-8; rename it (cache keys, SimpleTuner's metadata and caption "
            "file names need UTF-8)"
        )
    if dataset.parquet is not None:
        try:
            dataset.parquet_table = read_table(dataset.parquet)
        except ParquetError as error:
            raise BuildError(str(error)) from None
    if remember:
        dataset.memo_token = inventory.memo_token
        if dataset.memo_token is None:
            try:
                dataset.memo_token = inventory.write_memo(memo)
            except (OSError, LatentCacheError):
                pass  # the memo only saves work: an unwritable cache folder is reported by the build itself
    dataset.inventory = inventory
    _plan_images(dataset, inventory, seed)
    return dataset


def _scan(dataset: Dataset, memo: Path, threads: int | None, others: list[str]):
    """The inventory of `dataset`'s folder or bucket, reading what its memo does not hold."""
    from lcm_plugin.cache import scan_blobs, scan_inventory

    if dataset.packed is not None:  # samples read from memory, a chunk at a time, through the source's reader
        listing = dataset.listing
        return scan_blobs(listing.keys, listing.stamps, dataset.packed.reader.read, memo,
                          oriented=dataset.packed.oriented, threads=threads)
    caption_extension = ".txt" if dataset.caption_strategy == "textfile" else None
    if dataset.remote is not None:  # objects read whole, concurrently; the memo is local, next to the store
        return dataset.remote.bucket.scan(dataset.remote.prefix, list(IMAGE_EXTENSIONS), caption_extension, memo,
                                          other_extensions=others)
    return scan_inventory(dataset.data_dir, list(IMAGE_EXTENSIONS), caption_extension, memo, threads=threads,
                          other_extensions=others)


def memo_tokens(datasets: list[Dataset]) -> list[tuple[int, int]]:
    """The tokens of the scan memos `datasets` were planned from (what a machine's first rank shares)."""
    return [dataset.memo_token for dataset in datasets if dataset.memo_token is not None]


def shared_memos(shared: list[list[tuple[int, int]]]) -> frozenset[tuple[int, int]]:
    """Every first rank's memo tokens, as a phase gathered them (`memo_tokens` per rank)."""
    return frozenset(tuple(token) for tokens in shared for token in tokens)


def _plan_images(dataset: Dataset, inventory, seed: int) -> None:
    """`scan_dataset`'s images, skipped and excluded lists from the folder's `inventory`: the plan itself is made in
    Rust (`ImageTable`); Python sees the rows left out, which are few."""
    from lcm_plugin.cache import Bucketer, ImageTable

    dataset.skipped += [(Path(dataset.image_path(inventory.key(i))), message) for i, message in inventory.errors]
    # The folder is absolute and normalised, the keys are names read from it: a join needs no normalising. An S3
    # dataset's images are named by their keys alone.
    folder = "" if dataset.image_reader() is not None else os.path.join(str(dataset.data_dir), "")
    sizes, refused = None, {}
    if dataset.parquet is not None:
        sizes, refused = _parquet_rows(dataset, folder, inventory.keys)
    elif dataset.packed is not None:
        sizes, refused = _packed_rows(dataset, inventory.keys)
    table = ImageTable(inventory, folder, Bucketer(dataset.bucket_config, seed=seed), sizes=sizes,
                       caption_file_required=dataset.caption_strategy == "textfile", refused=list(refused),
                       minimum_aspect_ratio=dataset.minimum_aspect_ratio,
                       maximum_aspect_ratio=dataset.maximum_aspect_ratio)
    unreadable_captions = dict(inventory.caption_errors)
    for row, why in table.left_out:
        path = dataset.image_path(inventory.key(row))
        if why == "no_size" and dataset.packed is not None:  # its reader says why SimpleTuner never buckets it
            dataset.excluded.append((Path(path), dataset.listing.left_out.get(path, "no size in its index")))
        elif why in _EXCLUDED:
            dataset.excluded.append((Path(path), _EXCLUDED[why](dataset)))
        elif why == "caption_unreadable":
            dataset.skipped.append((Path(path), f"caption file {caption_file(path)} unreadable "
                                                f"({unreadable_captions[row]})"))
        elif why == "caption_missing":
            dataset.skipped.append((Path(path), f"caption file {caption_file(path)} missing (caption_strategy "
                                                "textfile)"))
        else:
            dataset.skipped.append((Path(path), refused[row]))
    dataset.images = Images(table, dataset)


# Why `ImageTable` leaves out an image, as SimpleTuner's filters would name it.
_EXCLUDED = {
    "no_size": lambda dataset: f"no row in {os.path.basename(dataset.parquet.path)} (metadata_missing)",
    "too_small": lambda dataset: "below minimum_image_size",
    "aspect_below_minimum": lambda dataset: f"bucket below minimum_aspect_ratio {dataset.minimum_aspect_ratio:g}",
    "aspect_above_maximum": lambda dataset: f"bucket above maximum_aspect_ratio {dataset.maximum_aspect_ratio:g}",
}


def _packed_rows(dataset: Dataset, keys: list[str]) -> tuple[list | None, dict[int, str]]:
    """Per inventory row, the size a packed source's index gives it (None for every row: its metadata backend reads
    the image itself), and the rows it gives no caption for (with why)."""
    listing = dataset.listing
    sizes = None
    if any(size is not None for size in listing.sizes):
        by_key = dict(zip(listing.keys, listing.sizes))
        sizes = [by_key.get(key) for key in keys]
    refused = {row: f"{listing.missing_captions.get(key, 'no caption')} (caption_strategy {dataset.caption_strategy})"
               for row, key in enumerate(keys) if not listing.captions.get(key)}
    return sizes, refused


def _parquet_rows(dataset: Dataset, folder: str, keys: list[str]) -> tuple[list, dict[int, str]]:
    """Per inventory row, the size the parquet table gives it (ParquetMetadataBackend buckets by the table; None
    where it has no row), and the rows whose captions it cannot give (caption_strategy parquet), with why."""
    table, source = dataset.parquet_table, dataset.parquet
    sizes = [table.sizes.get(size_id(folder + key, source)) for key in keys]
    refused = {}
    if dataset.caption_strategy == "parquet":
        for row, key in enumerate(keys):
            if sizes[row] is not None:
                try:
                    _parquet_captions(folder + key, dataset)
                except BuildError as error:
                    refused[row] = str(error)
    return sizes, refused


class Images:
    """A dataset's planned images. The columns stay in Rust (`lcm_plugin.cache.ImageTable`: one row per image, in
    scan order); `ImageItem`s are made only for the rows a caller iterates or picks (what is encoded, checked or
    listed in a manifest), never for a whole dataset at a warm start."""

    _CHUNK = 4096

    def __init__(self, table, dataset: Dataset):
        self.table = table
        self._dataset = dataset
        self._samples: dict[int, dict] = {}  # equal bucketer answers share one dict, as the bucketer gives them

    def __len__(self) -> int:
        return len(self.table)

    def __iter__(self):
        for start in range(0, len(self.table), self._CHUNK):
            yield from self.at(range(start, min(start + self._CHUNK, len(self.table))))

    def __getitem__(self, index):
        positions = range(len(self.table))[index]
        return self.at(positions) if isinstance(positions, range) else self.at([positions])[0]

    def at(self, positions) -> list[ImageItem]:
        """The images at `positions` (indices in scan order)."""
        items = []
        for path, key, text, content, cache_key, sample in self.table.rows(positions):
            shared = self._samples.get(sample)
            if shared is None:
                shared = self._samples[sample] = self.table.sample(sample)
            items.append(ImageItem(path=path, key=key, captions=captions_of(path, self._dataset, text),
                                   sample=shared, content=content, cache_key=cache_key))
        return items

    def positions_of(self, paths) -> list[int]:
        """The positions of those of `paths` (absolute, as the plan names images) that are planned, ascending."""
        return sorted(p for p in self.table.positions_of(list(paths)) if p is not None)


def vae_batches(datasets: list[Dataset], batch_size: int) -> list[Batch]:
    """Each dataset's images grouped by bucket (in scan order) and cut into batches of `batch_size`."""
    return [Batch(dataset.id, bucket, positions, dataset.images)
            for dataset in datasets for bucket, positions in dataset.images.table.batches(batch_size)]


def unique_captions(datasets: list[Dataset]) -> dict[Path, list[str]]:
    """Every text cache folder and the captions (first appearance order, plus "" for caption dropout) it holds."""
    per_cache: dict[Path, dict[str, None]] = {}
    for dataset in datasets:
        captions = per_cache.setdefault(dataset.text_cache_dir, {"": None})
        for item in dataset.images:
            captions.update(dict.fromkeys(item.captions))
    return {folder: list(captions) for folder, captions in per_cache.items()}
