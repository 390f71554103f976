"""multidatabackend.json: a list of dataset entries, typed by `dataset_type` and `type`, and the cross-entry rules.

Keys, allowed values and defaults follow SimpleTuner 4.10's `helpers/data_backend/config/` validators and
`factory.init_backend_config` / `FactoryRegistry` (which read entries with `.get`, so a misspelt key is
silently ignored there: here it is an error with a suggestion). Entries inherit config.json's
resolution, resolution_type, image-size and caption settings when they leave them out, as in SimpleTuner.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from lcm_plugin.config.problems import Problem, did_you_mean, pointer

# grounding is injected by SimpleTuner itself; create_backend_config refuses it in a user's file.
DatasetKind = Literal["image", "video", "audio", "conditioning", "eval", "caption"]
StorageType = Literal["local", "aws", "csv", "huggingface", "webshart", "memory"]
CropAspect = Literal["square", "preserve", "random", "closest"]
CropStyle = Literal["random", "corner", "center", "centre", "face"]
ResolutionType = Literal["pixel", "area", "pixel_area"]
CaptionStrategy = Literal["filename", "textfile", "instanceprompt", "parquet", "huggingface", "csv", "webshart"]
MetadataBackend = Literal["discovery", "json", "parquet", "huggingface", "webshart", "filesystem"]

# Keys read only for one storage `type` (SimpleTuner ignores them elsewhere).
TYPE_KEYS: dict[str, set[str]] = {
    "aws": {
        "aws_bucket_name",
        "aws_region_name",
        "aws_endpoint_url",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "aws_max_pool_connections",
        "aws_data_prefix",
        "aws",
    },
    "csv": {
        "csv_file",
        "csv_cache_dir",
        "csv_caption_column",
        "csv_url_column",
        "csv_hash_filenames",
        "csv_shorten_filenames",
    },
    "huggingface": {
        "huggingface",
        "dataset_name",
        "dataset_config",
        "data_files",
        "split",
        "revision",
        "image_column",
        "video_column",
        "audio_column",
        "streaming",
        "num_proc",
        "auto_load",
        "split_composite_images",
        "composite_image_column",
    },
    "webshart": {
        "webshart",
        "source",
        "metadata",
        "hf_token",
        "subfolder",
        "shard_cache_gb",
        "parallel_downloads",
        "buffer_size",
        "max_file_size",
        "webshart_optimize_captions",
        "webshart_optimise_captions",
    },
    "memory": {"memory_filesystem_path", "memory_filesystem_size", "memory_filesystem_sudo"},
}
# Required keys per storage type (SimpleTuner's CSV builder, check_aws_config, check_huggingface_config).
TYPE_REQUIRED: dict[str, tuple[str, ...]] = {
    "aws": ("aws_bucket_name", "aws_region_name", "aws_endpoint_url", "aws_access_key_id", "aws_secret_access_key"),
    "csv": ("csv_file", "csv_cache_dir", "csv_caption_column"),  # csv_url_column defaults to "url"
    "huggingface": ("dataset_name",),
}


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_uri: str | None = Field(
        None, alias="$schema", description="JSON Schema, for editors; ignored by SimpleTuner."
    )
    id: str = Field(min_length=1, description="Unique name of this dataset; caches and bucket files carry it.")
    type: StorageType = Field("local", description="Where the data lives.")
    # SimpleTuner tests these by truth value: the string "false" would disable the entry.
    disabled: StrictBool = Field(False, description="Skip this entry (true or false).")
    disable: StrictBool = Field(False, description="Same as disabled (older spelling).")
    compress_cache: bool | None = Field(
        None, description="gzip the cache files (default: config.json's compress_disk_cache)."
    )
    cache_dir: str | None = Field(None, description="Cache folder of this entry.")
    preserve_data_backend_cache: bool = Field(False, description="Keep the cache between runs.")
    write_batch_size: int | None = Field(None, ge=1, description="Cache files written per batch.")
    read_batch_size: int | None = Field(None, ge=1, description="Files read per batch.")
    max_workers: int | None = Field(None, ge=1, description="Parallel workers of this backend.")
    # storage-type keys, checked against `type` in check_entry
    aws_bucket_name: str | None = None
    aws_region_name: str | None = None
    aws_endpoint_url: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    aws_max_pool_connections: int | None = Field(None, ge=1)
    aws_data_prefix: str | list[str] | None = Field(None, description="Key prefix inside the bucket.")
    aws: dict[str, Any] | None = None
    memory_filesystem_path: str | None = None
    memory_filesystem_size: str | int | None = None
    memory_filesystem_sudo: bool | None = None


class TextEmbedsEntry(_Entry):
    """dataset_type text_embeds: where the text encoder outputs are cached."""

    text_encoder_batch_size: int | None = Field(None, ge=1, description="Captions encoded per text-encoder call.")
    dataset_type: Literal["text_embeds"] = Field(description="Text-embedding cache.")
    # SimpleTuner checks `default is True`: "yes" or 1 would silently not be the default.
    default: StrictBool = Field(False, description="The text cache datasets use unless they name one in text_embeds.")
    caption_filter_list: list[str] | str | None = Field(None, description="Strings or regexes removed from captions.")
    text_cache_ondemand: bool = Field(False, description="Encode captions during training instead of up front.")
    text_cache_disable: bool = Field(False, description="Never write text embeddings to disk.")


class ImageEmbedsEntry(_Entry):
    """dataset_type image_embeds / conditioning_image_embeds: a separate VAE-latent store."""

    dataset_type: Literal["image_embeds", "conditioning_image_embeds"] = Field(description="Latent cache store.")


class DistillationCacheEntry(_Entry):
    """dataset_type distillation_cache: teacher outputs cached for a distiller."""

    dataset_type: Literal["distillation_cache"] = Field(description="Distillation cache.")
    distillation_type: str = Field("generic", description="Which distiller writes and reads it.")


class MediaEntry(_Entry):
    """dataset_type image (default), video, audio, conditioning, eval, caption, grounding: training samples."""

    dataset_type: DatasetKind = Field("image", description="What the samples are.")
    instance_data_dir: str | list[str] | None = Field(None, description="Folder of the samples (type local).")
    instance_data_root: str | None = Field(None, description="Older spelling of instance_data_dir.")
    crop: bool = Field(False, description="Crop samples to the bucket instead of resizing the whole image.")
    crop_aspect: CropAspect = Field(
        "square", description="Aspect of the crop; random/closest need crop_aspect_buckets."
    )
    crop_aspect_buckets: list[float | dict[str, float]] | None = Field(
        None, description="Aspect ratios (or {aspect_bucket, weight}) for crop_aspect random/closest."
    )
    crop_style: CropStyle = Field("random", description="Where the crop is taken.")
    resolution: float | None = Field(None, gt=0, description="Target size (default: config.json's resolution).")
    resolution_type: ResolutionType | None = Field(None, description="Units of resolution and the size limits.")
    minimum_image_size: float | None = Field(None, ge=0, description="Skip smaller samples (resolution_type units).")
    maximum_image_size: float | None = Field(
        None, gt=0, description="Downsample larger samples; needs target_downsample_size."
    )
    target_downsample_size: float | None = Field(None, gt=0, description="Size samples above maximum_image_size go to.")
    minimum_aspect_ratio: float | None = Field(None, gt=0, description="Skip samples narrower than this.")
    maximum_aspect_ratio: float | None = Field(None, gt=0, description="Skip samples wider than this.")
    max_num_samples: int | None = Field(None, ge=1, description="Use at most this many samples.")
    caption_strategy: CaptionStrategy | None = Field(None, description="Where captions come from.")
    metadata_backend: MetadataBackend | None = Field(
        None, description="How sample sizes are recorded (default discovery)."
    )
    cache_dir_vae: str | None = Field(None, description="VAE latent cache folder; unique per dataset.")
    cache_file_suffix: str | None = Field(
        None, description="Suffix of this dataset's bucket and metadata files (default: its id)."
    )
    instance_prompt: str | None = Field(None, description="Caption for caption_strategy instanceprompt.")
    prepend_instance_prompt: bool = Field(False, description="Prefix every caption with instance_prompt.")
    only_instance_prompt: bool = Field(False, description="Use instance_prompt as the only caption.")
    caption_file_extensions: list[Annotated[str, Field(pattern=r"[^.\s]")]] | None = Field(
        None, min_length=1, description='Caption file extensions for textfile, e.g. ["txt", "caption"].'
    )
    caption_shuffle: dict[str, Any] | None = Field(None, description="{split_on, count, position_start, seed}.")
    probability: float = Field(1.0, ge=0, description="Relative sampling weight.")
    repeats: int = Field(0, ge=0, description="Extra passes over this dataset per epoch.")
    train_batch_size: (
        Annotated[int, Field(strict=True, ge=1)] | Annotated[str, Field(pattern=r"^[1-9][0-9]*$")] | None
    ) = Field(None, description="Batch size of this dataset (a positive integer).")
    timestep_sampling_offset: float = Field(0.0, description="Shift of sampled timesteps for this dataset.")
    start_epoch: int = Field(1, ge=0, description="First epoch this dataset is sampled.")
    start_step: int = Field(0, ge=0, description="First step this dataset is sampled.")
    end_epoch: int | None = Field(None, ge=0, description="Last epoch this dataset is sampled.")
    end_step: int | None = Field(None, ge=0, description="Last step this dataset is sampled.")
    is_regularisation_data: bool = Field(False, description="Prior-preservation data.")
    is_regularization_data: bool = Field(False, description="Same as is_regularisation_data.")
    disable_validation: bool = Field(False, description="Take no validation prompts from this dataset.")
    vae_cache_clear_each_epoch: bool | None = Field(None, description="Re-encode latents every epoch.")
    vae_cache_ondemand: bool = Field(False, description="Encode latents during training.")
    vae_cache_disable: bool = Field(False, description="Never write latents to disk.")
    vae_cache_scan_behaviour: Literal["recreate", "sync"] | None = Field(
        None, description="What to do with stale latents."
    )
    skip_file_discovery: str | None = Field(
        None, description="Space-separated phases to skip: vae aspect text metadata."
    )
    scan_for_errors: bool = Field(False, description="Check every cached latent at start-up.")
    delete_problematic_images: bool = Field(False, description="Delete images that fail to load.")
    delete_unwanted_images: bool = Field(False, description="Delete images below the size limits.")
    hash_filenames: bool | None = Field(None, description="Hash cache file names.")
    shorten_filenames: bool | None = Field(None, description="Shorten cache file names.")
    metadata_update_interval: int | None = Field(None, ge=1, description="Seconds between metadata saves.")
    text_embeds: str | None = Field(None, description="id of the text_embeds entry to use (default: the default one).")
    image_embeds: str | None = Field(None, description="id of an image_embeds entry to store latents in.")
    conditioning_image_embeds: str | None = Field(None, description="id of a conditioning_image_embeds entry.")
    conditioning: dict[str, Any] | list[dict[str, Any]] | None = Field(None, description="Auto-generated conditioning.")
    conditioning_data: str | list[str] | None = Field(None, description="id(s) of the conditioning dataset(s).")
    conditioning_type: str | None = Field(None, description="controlnet, mask, reference_strict, ...")
    conditioning_config: dict[str, Any] | None = None
    source_dataset_id: str | None = Field(None, description="id of the dataset this conditioning set pairs with.")
    parquet: dict[str, Any] | None = Field(None, description="Parquet captions/metadata: {path, filename_column, ...}.")
    video: dict[str, Any] | None = Field(None, description="{num_frames, min_frames, max_frames, is_i2v, ...}.")
    audio: dict[str, Any] | None = Field(None, description="Audio settings.")
    data_generator: dict[str, Any] | None = Field(None, description="Caption datasets only: generate images.")
    s2v_datasets: list[str] | str | None = None
    slider_strength: float | None = None
    vae_batch_size: int | None = Field(None, ge=1, description="Images per VAE call when caching latents.")
    image_processing_batch_size: int | None = Field(None, ge=1, description="Images per preprocessing batch.")
    conditioning_image_embed_batch_size: int | None = Field(None, ge=1)
    cache_dir_conditioning_image_embeds: str | None = None
    delete_nsfw_images: bool = Field(False, description="Delete images flagged as NSFW.")
    disable_multiline_split: bool = Field(False, description="Keep a multi-line caption file as one caption.")
    shuffle: bool = Field(True, description="Caption datasets: shuffle the captions.")
    # audio datasets: flat aliases of the `audio` block (factory._prepare_audio_settings)
    audio_min_duration_seconds: float | None = None
    audio_max_duration_seconds: float | None = None
    audio_channels: int | None = None
    audio_bucket_strategy: str | None = None
    audio_duration_interval: float | None = None
    audio_duration_interval_seconds: float | None = None
    audio_bucket_interval: float | None = None
    audio_truncation_mode: Literal["beginning", "end", "random"] | None = None
    truncation_mode: Literal["beginning", "end", "random"] | None = None
    lyrics_extension: str | None = None
    lyrics_suffix: str | None = None
    lyrics_filename_format: str | None = None
    audio_only: bool | None = None
    target_resolution: int | None = None
    # type-specific keys (validated against `type`)
    csv_file: str | None = None
    csv_cache_dir: str | None = None
    csv_caption_column: str | None = None
    csv_url_column: str | None = None
    csv_hash_filenames: bool | None = None
    csv_shorten_filenames: bool | None = None
    huggingface: dict[str, Any] | None = None
    dataset_name: str | None = None
    dataset_config: str | None = None
    data_files: Any = None
    split: str | None = None
    revision: str | None = None
    image_column: str | None = None
    video_column: str | None = None
    audio_column: str | None = None
    streaming: bool | None = None
    num_proc: int | None = None
    auto_load: bool | None = None
    split_composite_images: bool | None = None
    composite_image_column: str | None = None
    webshart: dict[str, Any] | None = None
    source: str | None = None
    metadata: str | None = None
    hf_token: str | None = None
    subfolder: str | None = None
    shard_cache_gb: float | None = None
    parallel_downloads: int | None = None
    buffer_size: int | None = None
    max_file_size: int | None = None
    webshart_optimize_captions: bool | None = None
    webshart_optimise_captions: bool | None = None


ENTRY_MODELS: dict[str, type[_Entry]] = {
    "text_embeds": TextEmbedsEntry,
    "image_embeds": ImageEmbedsEntry,
    "conditioning_image_embeds": ImageEmbedsEntry,
    "distillation_cache": DistillationCacheEntry,
    **{kind: MediaEntry for kind in DatasetKind.__args__},
}
# Keys SimpleTuner has removed, with what replaced them.
REMOVED_KEYS = {"disable_vae_cache": "vae_cache_disable"}
# Keys that only a media dataset reads, with the dataset types that accept them.
_ALL_ENTRY_KEYS = {
    field.alias or name for model in set(ENTRY_MODELS.values()) for name, field in model.model_fields.items()
}


def entry_model(entry: dict) -> type[_Entry] | None:
    """The model for an entry's dataset_type (image when absent), or None for an unknown type."""
    return ENTRY_MODELS.get(str(entry.get("dataset_type", "image")).strip().lower())


def is_enabled(entry: dict) -> bool:
    return not entry.get("disabled", False) and not entry.get("disable", False)


def check_entry(entry: Any, index: int, file: str, defaults: dict) -> list[Problem]:
    """Problems of one entry on its own. `defaults`: config.json values entries inherit (SimpleTuner args)."""
    where = lambda *parts: pointer(index, *parts)  # noqa: E731
    if not isinstance(entry, dict):
        return [Problem(file, where(), f"expected an object (one dataset), got {type(entry).__name__}")]
    model = entry_model(entry)
    if model is None:
        kinds = sorted(ENTRY_MODELS)
        value = str(entry.get("dataset_type"))
        return [Problem(file, where("dataset_type"), f"{value!r} is not one of {kinds}" + did_you_mean(value, kinds))]
    problems = _model_problems(entry, model, where, file)
    if any(problem.severity == "error" for problem in problems):
        return problems  # the rules below read typed values: fix these first
    problems += _type_problems(entry, model, where, file)
    if model is MediaEntry:
        problems += _media_problems(entry, where, file, defaults)
    return problems


def _model_problems(entry: dict, model: type[_Entry], where, file: str) -> list[Problem]:
    try:
        model.model_validate(entry)
    except ValidationError as error:
        by_place: dict[tuple, list[dict]] = {}
        # Shorter paths first, so a union member's deeper complaint joins its value's problem.
        for issue in sorted(error.errors(), key=lambda issue: len(_input_path(entry, issue["loc"]))):
            path = _input_path(entry, issue["loc"])
            place = next((known for known in by_place if known and path[: len(known)] == known), path)
            by_place.setdefault(place, []).append(issue)
        return [_problem(entry, model, where, file, place, issues) for place, issues in by_place.items()]
    return []


def _input_path(entry: dict, loc: tuple) -> tuple:
    """`loc` without pydantic's union-member tags ('float', 'constrained-int'): only steps into the input."""
    path, node = [], entry
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif not path and isinstance(part, str):
            node = None  # a missing or extra top-level key
        else:
            continue
        path.append(part)
    return tuple(path)


def _problem(entry: dict, model: type[_Entry], where, file: str, place: tuple, issues: list[dict]) -> Problem:
    """One problem per place; a value that fits no member of a union lists each member's complaint."""
    key = str(place[0]) if place else ""
    issue = issues[0]
    if issue["type"] == "extra_forbidden":
        own_keys = {field.alias or name for name, field in model.model_fields.items()}
        # SimpleTuner reads entries with .get: a key it does not read is ignored, except the few it refuses.
        if key in REMOVED_KEYS:
            return Problem(file, where(key), f"{key!r} was removed from SimpleTuner; use {REMOVED_KEYS[key]!r}")
        if key == "caption_filter_list":
            return Problem(file, where(key), "caption_filter_list is only valid for text_embeds datasets")
        if key == "data_generator":
            return Problem(file, where(key), "data_generator is only valid for dataset_type 'caption'")
        if key in _ALL_ENTRY_KEYS:
            message = f"{key!r} is not read for dataset_type {entry.get('dataset_type', 'image')!r}"
        else:
            message = "unknown key" + did_you_mean(key, own_keys)
        return Problem(file, where(key), message + ": SimpleTuner ignores it", "warning")
    if issue["type"] == "missing":
        return Problem(file, where(*place[:-1]), f"missing required key {key!r}")
    if issue["type"] == "literal_error":
        return Problem(
            file,
            where(*place),
            f"{issue['input']!r} is not one of {issue['ctx']['expected']}"
            + did_you_mean(str(issue["input"]), _literal_choices(model, key)),
        )
    reasons = "; or ".join(dict.fromkeys(i["msg"].removeprefix("Value error, ") for i in issues))
    return Problem(file, where(*place), f"{reasons} (got {issue['input']!r})")


def _literal_choices(model: type[_Entry], key: str) -> list[str]:
    field = model.model_fields.get(key)
    args = getattr(field.annotation, "__args__", ()) if field else ()
    flat = []
    for arg in args:
        flat += list(getattr(arg, "__args__", (arg,)))
    return [str(choice) for choice in flat if isinstance(choice, str)]


def _type_problems(entry: dict, model: type[_Entry], where, file: str) -> list[Problem]:
    """Storage `type`: its own keys only, and the keys it requires."""
    storage = entry.get("type", "local")
    problems = []
    for other, keys in TYPE_KEYS.items():
        if other == storage:
            continue
        for key in sorted(keys & entry.keys()):
            if key == "aws_data_prefix" and model is MediaEntry:
                continue  # also the instance_data_dir fallback for any type
            if key in model.model_fields:
                problems.append(
                    Problem(file, where(key), f"{key!r} is only read when type is {other!r}: ignored here", "warning")
                )
    if storage == "csv" and model is not MediaEntry:
        return problems + [Problem(file, where("type"), f"a {entry['dataset_type']} dataset cannot use a csv backend")]
    missing = [
        key
        for key in TYPE_REQUIRED.get(storage, ())
        if key not in entry and not (storage == "huggingface" and key in (entry.get("huggingface") or {}))
    ]
    if missing:
        problems.append(Problem(file, where(), f"type {storage!r} requires {', '.join(map(repr, missing))}"))
    if storage == "csv":
        if entry.get("caption_strategy") != "csv":
            problems.append(Problem(file, where("caption_strategy"), "a csv backend requires caption_strategy 'csv'"))
        if entry.get("dataset_type") == "caption":
            problems.append(Problem(file, where("type"), "caption datasets cannot use a csv backend"))
    if storage == "webshart" and not (entry.get("source") or (entry.get("webshart") or {}).get("source")):
        problems.append(Problem(file, where(), "type 'webshart' requires 'source'"))
    secrets = (("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"), ("aws_session_token", "AWS_SESSION_TOKEN"))
    for key, variable in secrets:
        if storage == "aws" and isinstance(entry.get(key), str) and entry[key]:
            problems.append(Problem(
                file, where(key),
                f"SimpleTuner 4.10.1 writes each dataset entry whole to debug.log when it starts (\"Configuring data "
                f"backend\"), this secret included; give null and set {variable} (SimpleTuner's client and the plugin "
                "both read it)", "warning"))
    return problems


def _media_problems(entry: dict, where, file: str, defaults: dict) -> list[Problem]:
    """Rules of SimpleTuner's ImageBackendConfig.validate and init_backend_config for one media entry."""
    problems: list[Problem] = []
    storage = entry.get("type", "local")
    kind = entry.get("dataset_type", "image")
    inherit = lambda key: entry.get(key, defaults.get(key))  # noqa: E731
    if storage == "local" and kind not in ("caption",):
        directory = entry.get("instance_data_dir", entry.get("instance_data_root"))
        if directory is None or (isinstance(directory, str) and not directory.strip()):
            problems.append(Problem(file, where(), "a local dataset requires 'instance_data_dir'"))
    if kind != "audio":
        crop_aspect = entry.get("crop_aspect", "square")
        buckets = entry.get("crop_aspect_buckets")
        if crop_aspect in ("random", "closest") and (not buckets or not isinstance(buckets, list)):
            problems.append(
                Problem(
                    file,
                    where("crop_aspect"),
                    f"crop_aspect {crop_aspect!r} requires crop_aspect_buckets "
                    "(a list of aspect ratios, or of {aspect_bucket, weight})",
                )
            )
        problems += _size_problems(entry, where, file, defaults)
    caption_strategy = inherit("caption_strategy")
    metadata_backend = entry.get("metadata_backend") or "discovery"
    if caption_strategy == "parquet" and metadata_backend in ("json", "discovery") and storage != "huggingface":
        problems.append(
            Problem(
                file,
                where("caption_strategy"),
                f"caption_strategy 'parquet' needs metadata_backend 'parquet' " f"(got {metadata_backend!r})",
            )
        )
    for strategy in ("huggingface", "webshart"):
        if caption_strategy == strategy and storage != strategy:
            problems.append(
                Problem(file, where("caption_strategy"), f"caption_strategy {strategy!r} needs type {strategy!r}")
            )
    for strategy in ("huggingface", "webshart"):
        if storage != strategy:
            continue
        if entry.get("metadata_backend") not in (None, strategy):
            problems.append(
                Problem(file, where("metadata_backend"), f"type {strategy!r} needs metadata_backend {strategy!r}")
            )
        if entry.get("caption_strategy") not in (None, strategy, "instanceprompt"):
            problems.append(
                Problem(
                    file,
                    where("caption_strategy"),
                    f"type {strategy!r} needs caption_strategy {strategy!r} or 'instanceprompt'",
                )
            )
    if entry.get("metadata_backend") == "filesystem":
        problems.append(
            Problem(
                file, where("metadata_backend"), "'filesystem' is deprecated; SimpleTuner uses 'discovery'", "warning"
            )
        )
    if entry.get("data_generator") is not None and kind != "caption":
        problems.append(
            Problem(file, where("data_generator"), "data_generator is only valid for dataset_type 'caption'")
        )
    if (
        defaults.get("controlnet") is True
        and kind == "image"
        and entry.get("conditioning_data") is None
        and entry.get("conditioning") is None
    ):
        problems.append(
            Problem(file, where(), "ControlNet training needs 'conditioning_data' or 'conditioning' on image datasets")
        )
    problems += _schedule_problems(entry, where, file)
    problems += _video_problems(entry, where, file, defaults)
    problems += _caption_shuffle_problems(entry, where, file)
    return problems


def _size_problems(entry: dict, where, file: str, defaults: dict) -> list[Problem]:
    """maximum_image_size needs target_downsample_size; both in the units of resolution_type.

    Follows the trainer (SimpleTuner 4.10.1 `FactoryRegistry._handle_resolution_conversion`, then
    `init_backend_config`): with resolution_type 'pixel_area' the entry's own resolution must be an integer
    edge, its own sizes are converted from pixel edges to megapixels (edge * edge / 1e6) and the entry is
    checked as 'area'; sizes inherited from config.json are checked as written.
    """
    problems = []
    resolution_type = entry.get("resolution_type", defaults.get("resolution_type"))
    sizes = {key: entry.get(key, defaults.get(key)) for key in ("maximum_image_size", "target_downsample_size")}
    if resolution_type == "pixel_area":
        edge = entry.get("resolution", defaults.get("resolution"))
        if not (type(edge) is int or (isinstance(edge, str) and edge.isdigit()) or "resolution" not in entry):
            problems.append(
                Problem(
                    file,
                    where("resolution"),
                    f"resolution_type 'pixel_area' needs an integer pixel edge such as 1024, got {edge!r}",
                )
            )
        for key in sizes:
            if key in entry and _number(entry[key]) and entry[key] > 0:
                sizes[key] = entry[key] * entry[key] / 1_000_000
        resolution_type = "area"
    if sizes["maximum_image_size"] and not sizes["target_downsample_size"]:
        problems.append(
            Problem(
                file,
                where("maximum_image_size"),
                "maximum_image_size requires target_downsample_size (the size oversized images are downsampled to)",
            )
        )
    deepfloyd = "deepfloyd" in str(defaults.get("model_type") or "")
    override = os.environ.get("SIMPLETUNER_MAXIMUM_IMAGE_SIZE_OVERRIDE")
    for key, value in sizes.items():
        if not _number(value) or not value:
            continue
        written = entry.get(key, defaults.get(key))
        at = where(key) if key in entry else where()
        source = "" if key in entry else " (from config.json)"
        if resolution_type == "area" and value >= 20 and not override:
            if key in entry and entry.get("resolution_type", defaults.get("resolution_type")) == "pixel_area":
                reason = f"{written} px is {value:g} megapixels; SimpleTuner needs < 20"
            elif entry.get("resolution_type", defaults.get("resolution_type")) == "pixel_area":
                reason = (
                    "SimpleTuner converts pixel_area sizes written in the dataset entry, not ones inherited from "
                    "config.json: set it in this entry, or in megapixels (< 20)"
                )
            else:
                reason = (
                    "SimpleTuner reads it as megapixels with resolution_type 'area' and needs < 20 "
                    "(pixels entered by mistake?)"
                )
            problems.append(Problem(file, at, f"{key} {written}{source}: {reason}"))
        elif resolution_type == "pixel" and value < 512 and not deepfloyd:
            problems.append(
                Problem(
                    file,
                    at,
                    f"{key} {value}{source} is in pixels with resolution_type 'pixel' and must be >= 512 "
                    "(megapixels entered by mistake?)",
                )
            )
    return problems


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _schedule_problems(entry: dict, where, file: str) -> list[Problem]:
    problems = []
    start_epoch, start_step = entry.get("start_epoch", 1), entry.get("start_step", 0)
    end_epoch, end_step = entry.get("end_epoch"), entry.get("end_step")
    if all(_number(v) for v in (start_epoch, end_epoch)) and end_epoch < start_epoch:
        problems.append(
            Problem(file, where("end_epoch"), f"end_epoch ({end_epoch}) must be >= start_epoch ({start_epoch})")
        )
    if all(_number(v) for v in (start_step, end_step)) and start_step > 0 and end_step < start_step:
        problems.append(Problem(file, where("end_step"), f"end_step ({end_step}) must be >= start_step ({start_step})"))
    return problems


# Frame rates video model families set before datasets load, when config.json sets no framerate (4.10.1).
MODEL_FRAMERATES = {
    "wan": 15,
    "wan_s2v": 15,
    "sanavideo": 16,
    "kandinsky5_video": 24,
    "minimaxh3": 24,
    "ltxvideo": 25,
    "ltxvideo2": 25,
    "infinitetalk": 25,
}
# Seconds of video SimpleTuner takes as num_frames when a video dataset sets none.
DEFAULT_VIDEO_SECONDS = 5


def _video_problems(entry: dict, where, file: str, defaults: dict) -> list[Problem]:
    video = entry.get("video")
    if entry.get("dataset_type") != "video" or not isinstance(video, dict):
        return []
    num_frames = video.get("num_frames")
    if num_frames is None:
        framerate = _float(defaults.get("framerate")) or MODEL_FRAMERATES.get(str(defaults.get("model_family")), 30)
        if "min_frames" not in video:
            return []
        default_frames = framerate * DEFAULT_VIDEO_SECONDS
        if isinstance(video["min_frames"], int) and video["min_frames"] < default_frames:
            return [
                Problem(
                    file,
                    where("video", "min_frames"),
                    f"must be >= video.num_frames, which is unset and defaults to {default_frames:g} "
                    f"({DEFAULT_VIDEO_SECONDS} s at {framerate:g} fps): set video.num_frames",
                )
            ]
        return []
    min_frames = video.get("min_frames", num_frames)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (num_frames, min_frames)):
        return [Problem(file, where("video"), "video.num_frames and video.min_frames must be integers")]
    if min(num_frames, min_frames) < 1:
        return [Problem(file, where("video"), "video.num_frames and video.min_frames must be > 0")]
    if min_frames < num_frames:
        return [Problem(file, where("video", "min_frames"), f"must be >= video.num_frames ({num_frames})")]
    return []


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _caption_shuffle_problems(entry: dict, where, file: str) -> list[Problem]:
    shuffle = entry.get("caption_shuffle")
    if not isinstance(shuffle, dict) or not shuffle:
        return []
    problems = []
    if shuffle.get("split_on", "comma") not in ("comma", "space", "period"):
        problems.append(Problem(file, where("caption_shuffle", "split_on"), "must be 'comma', 'space' or 'period'"))
    count = shuffle.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        problems.append(Problem(file, where("caption_shuffle", "count"), "must be a positive integer"))
    start = shuffle.get("position_start", 0)
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        problems.append(Problem(file, where("caption_shuffle", "position_start"), "must be a non-negative integer"))
    return problems


def check_backends(
    entries: Any, file: str, defaults: dict | None = None, base: Path | None = None, cache_build: bool = False
) -> list[Problem]:
    """Every problem of a parsed multidatabackend.json: per entry, then the rules across entries.

    `base`: the folder training starts in, against which relative cache folders resolve (default: here).
    `cache_build`: judge for `simpletuner-lcm cache build`, whose writers need one latent folder per dataset.
    """
    defaults = defaults or {}
    if not isinstance(entries, list):
        return [Problem(file, "", f"expected a JSON list of datasets, got {type(entries).__name__}")]
    if not entries:
        return [Problem(file, "", "no datasets: add at least one image dataset and one text_embeds dataset")]
    problems = []
    for index, entry in enumerate(entries):
        found = check_entry(entry, index, file, defaults)
        if isinstance(entry, dict) and not is_enabled(entry):
            # SimpleTuner skips a disabled entry before reading anything else in it.
            found = [replace(problem, severity="warning") for problem in found]
        problems += found
    valid = [(index, entry) for index, entry in enumerate(entries) if isinstance(entry, dict) and entry_model(entry)]
    # Rules across entries need every entry's type: with one unreadable, they would report noise.
    if len(valid) < len(entries):
        return problems
    return problems + _cross_entry_problems(valid, file, base or Path("."), cache_build)


def _folder(path: Any, base: Path) -> str:
    """A cache folder as the filesystem sees it: `~` expanded, relative to `base`, `..` and links resolved."""
    folder = Path(str(path)).expanduser()
    return str((folder if folder.is_absolute() else base / folder).resolve())


def _cross_entry_problems(entries: list[tuple[int, dict]], file: str, base: Path, cache_build: bool) -> list[Problem]:
    problems: list[Problem] = []
    enabled = [(index, entry) for index, entry in entries if is_enabled(entry)]
    kind_of = lambda entry: str(entry.get("dataset_type", "image"))  # noqa: E731

    first_with_id: dict[str, int] = {}
    for index, entry in enabled:
        backend_id = entry.get("id")
        if isinstance(backend_id, str) and backend_id in first_with_id:
            problems.append(
                Problem(
                    file,
                    pointer(index, "id"),
                    f"id {backend_id!r} is already used by entry {first_with_id[backend_id]}",
                )
            )
        elif isinstance(backend_id, str):
            first_with_id[backend_id] = index
    ids_by_kind: dict[str, set] = {}
    for _, entry in enabled:
        if isinstance(entry.get("id"), str):  # a non-string id is reported on its entry
            ids_by_kind.setdefault(kind_of(entry), set()).add(entry["id"])

    media = [(i, e) for i, e in enabled if entry_model(e) is MediaEntry]
    entries_by_index = dict(media)
    text = [(i, e) for i, e in enabled if kind_of(e) == "text_embeds"]
    vae_dirs: dict[str, int] = {}
    # Folders compare resolved: "cache/vae" and "./cache/vae/" are one folder to both writers.
    text_dirs = {_folder(e["cache_dir"], base) for _, e in text if e.get("cache_dir")}
    for index, entry in media:
        cache_dir = entry.get("cache_dir_vae")
        if not cache_dir or kind_of(entry) in ("caption",):
            continue
        key = _folder(cache_dir, base)
        if key in vae_dirs:
            first = vae_dirs[key]
            problems.append(_shared_vae_cache(file, (first, entries_by_index[first]), (index, entry), cache_build))
        else:
            vae_dirs[key] = index
        if key in text_dirs:
            problems.append(_vae_cache_is_text_cache(file, index, cache_dir, cache_build))

    defaults = [(i, e) for i, e in text if e.get("default") is True]
    for index, _ in defaults[1:]:
        problems.append(
            Problem(
                file,
                pointer(index, "default"),
                f"only one text_embeds dataset can be the default (entry {defaults[0][0]} already is)",
            )
        )
    if len(text) > 1 and not defaults:
        problems.append(
            Problem(
                file,
                pointer(text[0][0]),
                'several text_embeds datasets and none has "default": true; SimpleTuner picks this one',
                "warning",
            )
        )
    if not text:
        problems.append(
            Problem(file, "", "no text_embeds dataset: SimpleTuner creates one under output_dir", "warning")
        )

    references = (
        ("text_embeds", "text_embeds"),
        ("image_embeds", "image_embeds"),
        ("conditioning_image_embeds", "conditioning_image_embeds"),
    )
    for index, entry in media:
        for key, kind in references:
            wanted = entry.get(key)
            if isinstance(wanted, str) and wanted not in ids_by_kind.get(kind, set()):
                known = sorted(str(i) for i in ids_by_kind.get(kind, set()))
                problems.append(
                    Problem(
                        file,
                        pointer(index, key),
                        f"no enabled {kind} dataset with id {wanted!r}" + did_you_mean(wanted, known),
                    )
                )
        linked = entry.get("conditioning_data")
        for wanted in [linked] if isinstance(linked, str) else linked or []:
            if wanted not in first_with_id:
                problems.append(
                    Problem(
                        file,
                        pointer(index, "conditioning_data"),
                        f"no enabled dataset with id {wanted!r}" + did_you_mean(str(wanted), first_with_id),
                    )
                )

    # Caption datasets train on their own (assistant LoRAs) or generate images (data_generator).
    training = [(i, e) for i, e in media if kind_of(e) in ("image", "video", "audio", "conditioning", "caption")]
    if not training:
        problems.append(Problem(file, "", "no enabled image, video, audio or caption dataset to train on"))
    elif not any(_starts_at_once(entry) for _, entry in training):
        problems.append(
            Problem(file, "", "no dataset is available at the start of training (start_epoch <= 1 and start_step <= 1)")
        )
    return problems


def _shared_vae_cache(file: str, first: tuple[int, dict], second: tuple[int, dict], cache_build: bool) -> Problem:
    """Two datasets with one latent folder. SimpleTuner 4.10.1 trains this (its factory never compares the
    folders), but it names a latent after the image's path below its dataset folder: an image with the same
    relative name in both datasets gets one cache file, and one dataset trains on the other's latents. The
    cache build's writers (one store and manifest per folder) would overwrite each other, so it refuses."""
    (first_index, first_entry), (index, entry) = first, second
    where = pointer(index, "cache_dir_vae")
    both = f"{first_entry.get('id')!r} (entry {first_index}) and {entry.get('id')!r} (entry {index})"
    if cache_build:
        message = f"{entry['cache_dir_vae']!r} is the cache_dir_vae of both {both}: cache build needs one per dataset"
        return Problem(file, where, message)
    message = (
        f"{entry['cache_dir_vae']!r} is the cache_dir_vae of both {both}: an image at the same path below its "
        "dataset folder in both gets one latent file, so one dataset trains on the other's latents; give each "
        "dataset its own"
    )
    return Problem(file, where, message, "warning")


def _vae_cache_is_text_cache(file: str, index: int, cache_dir: str, cache_build: bool) -> Problem:
    """A latent folder that is also a text-embedding folder. SimpleTuner 4.10.1 trains this (latent and text files
    have different names), so validate only warns; the cache build keeps both stores in one `lcm/` subfolder of
    their folder, where the latent and text writers would collide, so it refuses."""
    where = pointer(index, "cache_dir_vae")
    if cache_build:
        message = f"{cache_dir!r} is also a text_embeds cache_dir: cache build needs separate folders"
        return Problem(file, where, message)
    message = f"{cache_dir!r} is also a text_embeds cache_dir: latents and text embeddings share one folder"
    return Problem(file, where, message, "warning")


def _starts_at_once(entry: dict) -> bool:
    start_epoch, start_step = entry.get("start_epoch", 1), entry.get("start_step", 0)
    return (not _number(start_epoch) or start_epoch <= 1) and (not _number(start_step) or start_step <= 1)
