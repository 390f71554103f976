"""The only module that patches SimpleTuner. `install()` and `uninstall()` are idempotent.

What install() changes, and why:
1. `DistillerFactory._create_lcm_distiller` -> builds our `LcmDistiller` from the user's
   `distillation_config.lcm` block (validated as `LcmConfig`). Upstream's imports
   `simpletuner.helpers.distillation.lcm.distiller`, a module that has never existed.
2. `DistillerFactory._method_config` accepts SimpleTuner's string form of `distillation_config`
   (a JSON or Python-literal string, or a JSON file path, read as `validate` reads it) for the "lcm"
   method; upstream returns {} for it.
3. `DistillationRegistry` entry "lcm" -> `LcmDistiller`. Collision policy: we replace upstream's
   entry on purpose (its class computes the target with the teacher and crashes on SDXL), and log it.
   Upstream's module registers itself on import, so it is imported first and cannot overwrite us later.
4. `simpletuner.helpers.distillation.lcm.distiller` becomes importable (exposes `LCMDistiller`).
5. `Trainer.init_data_backend` first runs `simpletuner-lcm validate`'s checks on config.json and
   multidatabackend.json (LCM runs only), so a bad config fails before data caching and model loading,
   not minutes later at distiller creation.
6. On hosts without an accelerator, `torch.Tensor.pin_memory` becomes a no-op: SimpleTuner's collate
   pins every latent and torch raises "Found no NVIDIA driver" there.
7. `json_file.mapping_to_cli_args` drops the `$schema` key (editor autocompletion, see docs/config.md),
   which SimpleTuner's argument parser would refuse.

Run outputs (LCM runs only; `_run_output_surfaces` / `_patch_run_outputs` / `_restore_run_outputs`; the content is
`lcm_plugin.outputs`), so that what a run hands the user samples as validation did:
R1. `publishing.metadata.code_example` -> the model card's inference section uses validation's scheduler
    (`LCMScheduler`; for TCD/PCM `TCDScheduler` and the pipeline call's `eta` = gamma) with the trained settings,
    4 steps, guidance 0, no negative prompt, shows LoRA fusing and (lora_format comfyui) the ComfyUI sampler.
    Upstream's keeps the base scheduler, which samples an LCM non-LCM.
R2. `publishing.huggingface.save_model_card` (what `HubManager.upload_model` calls before pushing) -> first, a
    full-model run's saved pipeline (output_dir/pipeline) gets validation's scheduler in place of the
    base model's scheduler, and its UNet is recorded as diffusers' UNet2DConditionModel (SimpleTuner names its
    own subclass, which plain diffusers cannot load); then the card's tags gain `lcm` (and `lcm-lora`).
R3. `ModelFoundation.save_lora_weights` -> every LoRA file SimpleTuner writes (final, checkpoints, EMA) records the
    LCM settings, validation's scheduler config and the plugin version in its safetensors metadata.

Data path (every run the switch selects; `_data_path_surfaces` / `_patch_data_path` / `_restore_data_path`; the logic is
`lcm_plugin.trainer_cache`, docs/data-path.md "Inside `simpletuner train`"). Covered datasets only; every method
falls through to SimpleTuner's own for the rest, and for any image or caption the shards do not hold:
D1. `training.trainer.configure_multi_databackend` (the trainer's call, after its VAE and text encoders are loaded
    and before any data backend is configured) first builds the memory-mapped caches with those models and writes
    SimpleTuner's bucket metadata (`trainer_cache.prepare`).
D2. `VAECache.discover_unprocessed_files` leaves out the images the shards hold, so `process_buckets` encodes
    nothing for them (it still runs, with its bucket shuffle); its `_reduce_bucket` runs on a bucket's unprocessed
    images only (SimpleTuner's answer, which it computes with a cache file name per image of the bucket), and its
    `build_vae_cache_filename_map` maps only the images the shards do not serve (the maps are read only for images
    that have `.pt` files).
D3. `training.collate.compute_latents` gathers a batch's latents from the shards in one parallel copy (pinned as
    `fetch_latent` pins); `VAECache.retrieve_from_cache` reads one. collate_fn's NaN/Inf and shape checks, caption
    dropout, time_ids and the sampler are SimpleTuner's, unchanged.
D4. `TextEmbeddingCache.load_from_cache` reads a caption's embeddings from the shards (then the model's own
    `unpack_text_embeddings_from_cache`); `compute_embeddings_for_prompts` (start-up caching) and
    `encode_dropout_caption` skip what the shards hold, so no per-file `.pt` is written or read for them.
D5. `FactoryRegistry._process_text_embeddings` (caption collection, one caption file read and prompt record per
    image, then start-up encoding) is skipped for a dataset whose every bucketed image the shards serve: the build
    encoded the captions of every planned image, so SimpleTuner would find nothing to encode. Only what it leaves
    behind is set (`hash_filenames` in the dataset's config).

Model families (every run, LCM or not; `_family_surfaces` / `_patch_families` / `_restore_families`):
F1. The SD 1.x pipeline classes (`models.sd1x.pipeline`, as listed in `StableDiffusion1.PIPELINE_CLASSES`) build
    without a safety checker when the caller passes neither `safety_checker` nor `feature_extractor`: their
    `__init__` then receives `safety_checker=None, feature_extractor=None, requires_safety_checker=False`.
    Upstream's `_load_pipeline(load_base_model=False)` (text-embedding caching) constructs them from loaded
    components and passes neither, so every `model_family: sd1x` run stops with a TypeError before training.
    `from_pretrained` is unchanged (it sees the original signature). Skipped for a class whose `__init__` no
    longer requires the two arguments.

Quality check (LCM runs with `lcm.quality_check.enabled`; `_quality_check_surfaces` / `_patch_quality_check` /
`_restore_quality_check`; the logic is `lcm_plugin.quality_check`):
Q1. `Validation.finalize_validation` (called once per validation, on the processes that ran it, while the pipeline
    still exists) first samples the student and teacher on the validation prompts' cached embeddings
    (`Validation._prepare_validation_work_items`, `_gather_prompt_embeds`), logs `lcm_quality/...` with
    `accelerator.log` and saves/logs a comparison grid with `validation_images.save_validation_image` /
    `log_images_to_trackers`, at `StateTracker.get_global_step()`. SimpleTuner has no per-validation metric hook.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
import types
import weakref
from importlib.metadata import version

from pydantic import ValidationError

from lcm_plugin.config import LcmConfig
from lcm_plugin.config.lcm import settings_at
from lcm_plugin.config import training as config_training

logger = logging.getLogger("simpletuner-lcm")

TESTED_SIMPLETUNER_VERSIONS = ("4.10.1",)
METHOD = "lcm"
SUPPORTED_MODEL_TYPES = ("lora", "full")
ALIAS_MODULE = "simpletuner.helpers.distillation.lcm.distiller"

# Originals saved by install() and put back by uninstall(); None while not installed.
_saved: dict | None = None


class SimpleTunerSurfaceError(RuntimeError):
    """A SimpleTuner surface that install() patches is missing or changed shape."""


def is_installed() -> bool:
    return _saved is not None


def parse_distillation_config(raw) -> dict:
    """`distillation_config` as a dict, read exactly as `simpletuner-lcm validate` reads it (a dict, a JSON or
    Python-literal string, or a JSON file path relative to where training starts); None or "" is {}."""
    if raw is None or raw == "":
        return {}
    parsed = config_training.parse_distillation_config(raw, None)
    if isinstance(parsed, str):
        raise ValueError(f"distillation_config: expected a JSON object; {parsed}")
    return parsed


def lcm_block(distillation_config) -> dict:
    """The "lcm" block, as SimpleTuner selects it: `distillation_config["lcm"]`, or the whole config if absent."""
    block, _ = config_training.lcm_block_of(parse_distillation_config(distillation_config))
    if not isinstance(block, dict):
        raise ValueError(f"distillation_config.{METHOD}: expected a JSON object, got {block!r}")
    return block


def lcm_config_from_block(block: dict) -> LcmConfig:
    """LcmConfig from the user's block; errors name `distillation_config.lcm.<key>` and the valid range."""
    try:
        return LcmConfig.model_validate(block)
    except ValidationError as error:
        lines = [
            f"  distillation_config.{METHOD}"
            + "".join(f".{part}" for part in problem["loc"])
            + f": {problem['msg']}"
            + _hint(problem)
            for problem in error.errors()
        ]
        raise ValueError("invalid LCM settings in config.json:\n" + "\n".join(lines)) from None


def _hint(problem: dict) -> str:
    if problem["type"] == "extra_forbidden":
        return f" (valid keys: {', '.join(settings_at(problem['loc']))})"
    if problem["loc"] and problem["type"] != "missing":
        return f" (got {problem['input']!r})"
    return ""


def validate_before_model_load(trainer) -> None:
    """Checks run by the patched `Trainer.init_data_backend`, before data caching and model loading."""
    config = trainer.config
    if str(getattr(config, "distillation_method", None) or "").lower() != METHOD:
        return
    _validate_config_files(getattr(config, "data_backend_config", None))
    lcm_config_from_block(lcm_block(getattr(config, "distillation_config", None)))
    prediction_type = getattr(trainer.model, "PREDICTION_TYPE", None)
    if prediction_type is not None and prediction_type.is_flow_prediction:
        raise ValueError(
            "distillation_method 'lcm': flow-matching models are not supported yet by simpletuner-lcm "
            f"(model_family {config.model_family!r} predicts {prediction_type.value!r})."
        )
    _check_model_type(config.model_type)


def _validate_config_files(backend_path) -> None:
    """`simpletuner-lcm validate`'s checks on the running config.json and multidatabackend.json.

    Warnings are logged; errors (what SimpleTuner would refuse or crash on, an invalid lcm block) stop the
    run with the same lines the CLI prints. An exception inside these checks is a bug of ours: it is logged
    and the run goes on, since SimpleTuner accepted the config. Only JSON configs are checked (SimpleTuner's
    env/toml backends have no file our validator reads).
    """
    from lcm_plugin.config import format_problems, has_errors

    try:
        problems = _config_file_problems(backend_path)
    except Exception as error:  # noqa: BLE001 - any failure of our checks must not stop a run SimpleTuner accepted
        logger.warning(
            "simpletuner-lcm validate could not check the config files (%s: %s); training goes on without it.",
            type(error).__name__,
            error,
        )
        return
    if has_errors(problems):
        raise ValueError("simpletuner-lcm validate found errors:\n" + format_problems(problems))
    for line in format_problems(problems).splitlines():
        logger.warning("simpletuner-lcm validate: %s", line)


def _config_file_problems(backend_path) -> list:
    """validate_files on the config.json this run read (found as SimpleTuner finds it), or [] without one."""
    from lcm_plugin.config import validate_files

    config_path = _running_config_path()
    if config_path is None:
        logger.info("simpletuner-lcm: no config.json found (env or toml config?); skipping file validation.")
        return []
    return validate_files(config_path, backend_path)


def _mapping_without_schema_key(original):
    """json_file.mapping_to_cli_args minus `$schema`, the editor hint SimpleTuner's parser would refuse."""

    @functools.wraps(original)
    def mapping_to_cli_args(mapping, *args, **kwargs):
        if isinstance(mapping, dict):
            mapping = {key: value for key, value in mapping.items() if key.lstrip("-") != "$schema"}
        return original(mapping, *args, **kwargs)

    return mapping_to_cli_args


def _create_lcm_distiller(
    teacher_model, noise_scheduler, distill_config, model_type, prediction_type, student_model=None
):
    """Replacement for DistillerFactory._create_lcm_distiller (same keyword signature)."""
    del prediction_type  # LcmDistiller reads it from the model and refuses flow matching
    _check_model_type(model_type)
    from lcm_plugin.simpletuner.distiller import LcmDistiller

    return LcmDistiller(
        teacher_model,
        student_model,
        noise_scheduler=noise_scheduler,
        config=lcm_config_from_block(distill_config),
        full_model=model_type == "full",
    )


def _check_model_type(model_type) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"distillation_method 'lcm': model_type {model_type!r} is not supported by simpletuner-lcm; "
            f"use one of {', '.join(SUPPORTED_MODEL_TYPES)}."
        )


def _method_config_accepting_strings(original):
    @functools.wraps(original)
    def method_config(method, config):
        if getattr(method, "value", method) == METHOD and isinstance(config.get("distillation_config"), str):
            config = {**config, "distillation_config": parse_distillation_config(config["distillation_config"])}
        return original(method, config)

    return staticmethod(method_config)


def _validating_init_data_backend(original):
    @functools.wraps(original)
    def init_data_backend(self, *args, **kwargs):
        validate_before_model_load(self)
        return original(self, *args, **kwargs)

    return init_data_backend


def _unpinned(self, *args, **kwargs):
    """Tensor.pin_memory on a host without an accelerator: pinning has no use there, return the tensor."""
    del args, kwargs
    return self


def _require(owner, name: str, where: str):
    if not hasattr(owner, name):
        raise SimpleTunerSurfaceError(
            f"simpletuner-lcm cannot patch SimpleTuner {_simpletuner_version()}: {where}.{name} is missing "
            f"(tested with SimpleTuner {', '.join(TESTED_SIMPLETUNER_VERSIONS)}). "
            "Set SIMPLETUNER_LCM_DISABLE=1 to run SimpleTuner without the plugin."
        )
    return getattr(owner, name)


def _import_surface(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise SimpleTunerSurfaceError(
            f"simpletuner-lcm cannot patch SimpleTuner {_simpletuner_version()}: module {module} does not import "
            f"({error}; tested with SimpleTuner {', '.join(TESTED_SIMPLETUNER_VERSIONS)}). "
            "Set SIMPLETUNER_LCM_DISABLE=1 to run SimpleTuner without the plugin."
        ) from error


def _simpletuner_version() -> str:
    try:
        return version("simpletuner")
    except Exception:  # noqa: BLE001 - a source checkout has no metadata; the seam checks still decide
        return "(unknown version)"


def _has_accelerator(torch) -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()


# --- data path (D1-D4 in the module docstring) ----------------------------------------------------------------------


def _running_config_path():
    """The config.json this training process read (found as SimpleTuner finds it), or None (env/toml configs)."""
    from simpletuner.helpers.configuration import json_file

    env = os.environ.get("SIMPLETUNER_ENVIRONMENT", os.environ.get("SIMPLETUNER_ENV", os.environ.get("ENV")))
    return next((path for path in json_file._candidate_json_paths(env) if path.is_file()), None)


def _data_path_surfaces() -> dict:
    """The SimpleTuner objects D1-D4 patch, checked (install() calls this before it changes anything)."""
    trainer_module = _import_surface("simpletuner.helpers.training.trainer")
    _require(trainer_module, "configure_multi_databackend", "simpletuner.helpers.training.trainer")
    collate = _import_surface("simpletuner.helpers.training.collate")
    _require(collate, "compute_latents", "simpletuner.helpers.training.collate")
    vae_cache = _require(_import_surface("simpletuner.helpers.caching.vae"), "VAECache",
                         "simpletuner.helpers.caching.vae")
    for name in ("discover_unprocessed_files", "retrieve_from_cache", "_reduce_bucket", "build_vae_cache_filename_map",
                 "_local_unprocessed_file_set"):
        _require(vae_cache, name, "VAECache")
    text_cache = _require(_import_surface("simpletuner.helpers.caching.text_embeds"), "TextEmbeddingCache",
                          "simpletuner.helpers.caching.text_embeds")
    for name in ("load_from_cache", "compute_embeddings_for_prompts", "encode_dropout_caption",
                 "hash_prompt_with_path", "_normalize_prompt_records"):
        _require(text_cache, name, "TextEmbeddingCache")
    factory = _require(_import_surface("simpletuner.helpers.data_backend.factory"), "FactoryRegistry",
                       "simpletuner.helpers.data_backend.factory")
    for name in ("_process_text_embeddings", "_uses_text_embeddings_cache"):
        _require(factory, name, "FactoryRegistry")
    return {"trainer_module": trainer_module, "collate": collate, "vae_cache": vae_cache, "text_cache": text_cache,
            "factory": factory}


def _building_configure(original):
    """D1."""
    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)
    def configure_multi_databackend(*args, **kwargs):
        started = time.monotonic()
        bound = signature.bind(*args, **kwargs).arguments
        _prepare_data_path(bound["args"], bound["accelerator"], bound["text_encoders"], bound["tokenizers"],
                           bound["model"])
        result = original(*args, **kwargs)
        if bound["accelerator"].is_main_process:
            # One figure for either path (bench/data_path.py part a reads it): scans, buckets, VAE and text
            # caches, and the start-up checks of existing caches all happen inside this call.
            logger.info("simpletuner-lcm: data preparation took %.2f s", time.monotonic() - started)
        return result

    return configure_multi_databackend


def _prepare_data_path(config, accelerator, text_encoders, tokenizers, model) -> None:
    from lcm_plugin import trainer_cache
    from lcm_plugin.cache_build.ranks import RanksDisagree, threads_per_rank

    rank = accelerator.process_index
    models = trainer_cache.TrainerModels(getattr(model, "vae", None), list(tokenizers or []),
                                         list(text_encoders or []))
    try:
        # Every rank on this machine runs its own Rust pools: each gets its share of the cores, not all of them. A
        # RAYON_NUM_THREADS the user set sizes every pool instead (None: rayon's global pool, which reads it).
        threads = None if os.environ.get("RAYON_NUM_THREADS") else threads_per_rank(accelerator.num_processes)
        trainer_cache.prepare(
            _running_config_path(), config, lcm_run=_is_lcm_run(config), models=models,
            group=trainer_cache.AcceleratorGroup(accelerator), rank=rank, world=accelerator.num_processes,
            threads=threads,
        )
    except trainer_cache.DataPathSwitchError:
        raise
    except RanksDisagree as error:  # decided on every rank alike; a rank that failed itself logs its own error
        trainer_cache.reset()
        logger.warning("simpletuner-lcm data path: rank %d: every dataset uses SimpleTuner's own caching: %s", rank,
                       error)
    except Exception as error:  # noqa: BLE001 - SimpleTuner's own path can still train this run
        trainer_cache.reset()
        logger.warning("simpletuner-lcm data path: rank %d: every dataset uses SimpleTuner's own caching: the build "
                       "failed on this rank (%s: %s)", rank, type(error).__name__, error,
                       exc_info=logger.isEnabledFor(logging.DEBUG))


def _discover_unserved(original):
    """D2."""

    @functools.wraps(original)
    def discover_unprocessed_files(self, *args, **kwargs):
        from lcm_plugin import trainer_cache

        unprocessed = original(self, *args, **kwargs)
        served = trainer_cache.cached_images(self.id)
        if served is None:
            return unprocessed
        self.local_unprocessed_files = [path for path in unprocessed if os.path.abspath(path) not in served]
        return self.local_unprocessed_files

    return discover_unprocessed_files


def _served_retrieve(original):
    """D3, one latent."""

    @functools.wraps(original)
    def retrieve_from_cache(self, filepath):
        from lcm_plugin import trainer_cache

        latent = trainer_cache.latent(self.id, filepath)
        return original(self, filepath) if latent is None else latent

    return retrieve_from_cache


def _gathered_latents(original):
    """D3, a batch: what `fetch_latent` returns per image, from one gather."""

    @functools.wraps(original)
    def compute_latents(filepaths, data_backend_id, model):
        import torch

        from lcm_plugin import trainer_cache

        batch = trainer_cache.gather_latents(data_backend_id, list(filepaths))
        if batch is None:
            return original(filepaths, data_backend_id, model)
        if not torch.backends.mps.is_available():
            batch = batch.pin_memory()
        return list(batch.unbind(0))

    return compute_latents


def _served_text_load(original):
    """D4, reads."""

    @functools.wraps(original)
    def load_from_cache(self, filename):
        from lcm_plugin import trainer_cache

        embeddings = trainer_cache.text_embeddings(self.cache_dir, filename)
        if embeddings is None:
            return original(self, filename)
        return embeddings if self.model is None else self.model.unpack_text_embeddings_from_cache(embeddings)

    return load_from_cache


def _unserved_prompts_only(original):
    """D4, start-up caching: only the prompts the shards do not hold are encoded (and written) by SimpleTuner."""
    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)
    def compute_embeddings_for_prompts(self, *args, **kwargs):
        from lcm_plugin import trainer_cache

        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        if bound.arguments["return_concat"] or trainer_cache.text_cache(self.cache_dir) is None:
            return original(self, *args, **kwargs)
        records = self._normalize_prompt_records(bound.arguments["all_prompts"])
        unserved = [record for record in records
                    if not trainer_cache.has_text_embeddings(self.cache_dir, self.hash_prompt_with_path(record))]
        if not unserved:
            return None
        bound.arguments["all_prompts"] = unserved
        return original(*bound.args, **bound.kwargs)

    return compute_embeddings_for_prompts


def _dropout_unless_served(original):
    """D4, the caption-dropout embedding: SimpleTuner encodes and writes it at every start."""

    @functools.wraps(original)
    def encode_dropout_caption(self, *args, **kwargs):
        from lcm_plugin import trainer_cache

        dropout_file = self.hash_prompt_with_path({"prompt": "", "key": "", "metadata": {}})
        if self._requires_path_based_keys or not trainer_cache.has_text_embeddings(self.cache_dir, dropout_file):
            return original(self, *args, **kwargs)
        return None

    return encode_dropout_caption


def _reduce_unprocessed_only(original):
    """D2, per bucket: SimpleTuner keeps an image only if it is unprocessed, but computes a cache file name for every
    image first; the original runs on the bucket's unprocessed images alone (the same answer, in the same order)."""

    @functools.wraps(original)
    def _reduce_bucket(self, bucket, aspect_bucket_cache, processed_images):
        from lcm_plugin import trainer_cache

        if trainer_cache.cached_images(self.id) is None:
            return original(self, bucket, aspect_bucket_cache, processed_images)
        unprocessed = self._local_unprocessed_file_set()
        candidates = [path for path in aspect_bucket_cache[bucket] if path in unprocessed]
        return original(self, bucket, {bucket: candidates}, processed_images)

    return _reduce_bucket


def _file_names_of_unserved(original):
    """D2, names: SimpleTuner maps every image to its `.pt` name and back (a hash and two dict entries per image);
    the maps are only read for images that have such files, which served images never get."""

    @functools.wraps(original)
    def build_vae_cache_filename_map(self, all_image_files):
        from lcm_plugin import trainer_cache

        served = trainer_cache.cached_images(self.id)
        if served is not None:  # SimpleTuner's local backend lists absolute, normalised paths, as the keys are
            all_image_files = [path for path in all_image_files if path not in served]
        return original(self, all_image_files)

    return build_vae_cache_filename_map


def _text_embeddings_unless_served(original):
    """D5: a dataset whose every bucketed image the shards serve has every caption there too (the build encodes the
    captions of every planned image); SimpleTuner's caption collection and start-up encode (a file read and a
    prompt record per image) would find nothing to do."""

    @functools.wraps(original)
    def _process_text_embeddings(self, backend, init_backend, conditioning_type):
        from simpletuner.helpers.training.state_tracker import StateTracker

        from lcm_plugin import trainer_cache

        buckets = getattr(init_backend.get("metadata_backend"), "aspect_ratio_bucket_indices", None)
        if (conditioning_type is not None or not self._uses_text_embeddings_cache()
                or not trainer_cache.serves_every_image(init_backend["id"], buckets)):
            return original(self, backend, init_backend, conditioning_type)
        # What the original leaves behind once its captions are cached.
        init_backend["config"]["hash_filenames"] = True
        StateTracker.set_data_backend_config(init_backend["id"], init_backend["config"])
        return None

    return _process_text_embeddings


_DATA_PATH_METHODS = (
    ("factory", "_process_text_embeddings", _text_embeddings_unless_served),
    ("vae_cache", "_reduce_bucket", _reduce_unprocessed_only),
    ("vae_cache", "build_vae_cache_filename_map", _file_names_of_unserved),
    ("vae_cache", "discover_unprocessed_files", _discover_unserved),
    ("vae_cache", "retrieve_from_cache", _served_retrieve),
    ("text_cache", "load_from_cache", _served_text_load),
    ("text_cache", "compute_embeddings_for_prompts", _unserved_prompts_only),
    ("text_cache", "encode_dropout_caption", _dropout_unless_served),
)


def _patch_data_path(surfaces: dict, saved: dict) -> None:
    trainer_module, collate = surfaces["trainer_module"], surfaces["collate"]
    saved["data_path"] = {
        "configure_multi_databackend": trainer_module.configure_multi_databackend,
        "compute_latents": collate.compute_latents,
        "methods": [(surfaces[owner], name, surfaces[owner].__dict__[name]) for owner, name, _ in _DATA_PATH_METHODS],
    }
    trainer_module.configure_multi_databackend = _building_configure(trainer_module.configure_multi_databackend)
    collate.compute_latents = _gathered_latents(collate.compute_latents)
    for owner, name, wrap in _DATA_PATH_METHODS:
        setattr(surfaces[owner], name, wrap(surfaces[owner].__dict__[name]))


def _restore_data_path(saved: dict) -> None:
    from simpletuner.helpers.training import collate
    from simpletuner.helpers.training import trainer as trainer_module

    from lcm_plugin import trainer_cache

    originals = saved["data_path"]
    trainer_module.configure_multi_databackend = originals["configure_multi_databackend"]
    collate.compute_latents = originals["compute_latents"]
    for cls, name, original in originals["methods"]:
        setattr(cls, name, original)
    trainer_cache.reset()


# --- end of data path -----------------------------------------------------------------------------------------------


# --- Run outputs (R1-R3 in the module docstring) ------------------------------------------------------------------

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default, what SimpleTuner writes


def _is_lcm_run(config) -> bool:
    method = getattr(config, "distillation_method", None)
    return str(getattr(method, "value", method) or "").lower() == METHOD


def _run_lcm_config(config) -> LcmConfig:
    return lcm_config_from_block(lcm_block(getattr(config, "distillation_config", None)))


def _validation_scheduler_config(model) -> dict:
    """The config of the scheduler `LcmDistiller.get_scheduler()` gives validation: the same function and inputs
    (SimpleTuner's training noise schedule, which the trainer hands the distiller, and the run's LCM block)."""
    from lcm_plugin import outputs

    return outputs.validation_scheduler_config(model.noise_schedule.config, _run_lcm_config(model.config))


def _base_scheduler_config(model) -> dict | None:
    """The base model's own scheduler config (what the card's `pipeline.scheduler.config` will be), None if it
    cannot be read here (the card then spells out every scheduler setting)."""
    from diffusers import LCMScheduler

    try:
        return LCMScheduler.load_config(model._model_config_path(), subfolder="scheduler")
    except (OSError, ValueError) as error:
        logger.info("simpletuner-lcm: base scheduler config unreadable (%s); the card lists every setting.", error)
        return None


def _lcm_code_example(original):
    """R1: the card's inference section for LCM runs."""

    @functools.wraps(original)
    def code_example(args, repo_id=None, model=None, base_model=None):
        lora = "lora" in args.model_type
        # LyCORIS adapters load through lycoris, not diffusers: upstream's card code stays (not covered here).
        lycoris = lora and str(getattr(args, "lora_type", "")).lower() == "lycoris"
        if not _is_lcm_run(args) or model is None or lycoris:
            return original(args, repo_id, model=model, base_model=base_model)
        from lcm_plugin import outputs

        published = repo_id if args.push_to_hub and repo_id else None
        base = getattr(args, "model_card_base_model", None) or args.pretrained_model_name_or_path
        # A full model's saved pipeline carries its scheduler (R2); a LoRA's card rebuilds it on the base model's.
        scheduler_config = _validation_scheduler_config(model)
        overrides = outputs.scheduler_overrides(scheduler_config, _base_scheduler_config(model)) if lora else {}
        width, height = outputs.first_resolution(args.validation_resolution)
        lcm = _run_lcm_config(args)
        settings = outputs.CardSettings(
            model_id=base if lora else published or os.path.join(args.output_dir, "pipeline"),
            base_model_id=None if lora or args.save_text_encoder else base,
            adapter_id=(published or args.output_dir) if lora else None,
            lcm=lcm,
            scheduler_overrides=overrides,
            scheduler_class=scheduler_config["_class_name"],
            eta=outputs.pipeline_eta(model.noise_schedule.config, lcm),
            prompt=args.validation_prompt or outputs.DEFAULT_PROMPT,
            seed=args.validation_seed or args.seed or 42,
            width=width,
            height=height,
            comfyui_lora=lora and str(getattr(args, "lora_format", "") or "").lower() == "comfyui",
        )
        return outputs.inference_section(settings)

    return code_example


def _lcm_save_model_card(original):
    """R2: validation's scheduler in a saved full-model pipeline before the card is written and pushed; tags after."""

    @functools.wraps(original)
    def save_model_card(model, *args, repo_folder=None, **kwargs):
        config = getattr(model, "config", None)
        if not _is_lcm_run(config) or repo_folder is None:
            return original(model, *args, repo_folder=repo_folder, **kwargs)
        from pathlib import Path

        from lcm_plugin import outputs

        lora = "lora" in config.model_type
        pipeline_dir = Path(repo_folder)
        if not lora and (pipeline_dir / "model_index.json").is_file():
            outputs.write_pipeline_scheduler(pipeline_dir, _validation_scheduler_config(model))
            if _plain_unet_under_simpletuner_name(pipeline_dir):
                outputs.name_diffusers_unet(pipeline_dir)
        result = original(model, *args, repo_folder=repo_folder, **kwargs)
        card = Path(repo_folder) / "README.md"
        card.write_text(outputs.add_card_tags(card.read_text(), outputs.LORA_TAGS if lora else outputs.FULL_MODEL_TAGS))
        return result

    return save_model_card


def _plain_unet_under_simpletuner_name(pipeline_dir) -> bool:
    """SimpleTuner saves SDXL's UNet as its `FlowMapUNet2DConditionModel`, which plain diffusers cannot import;
    with flow-map time conditioning off (no `deltatime_type` in its config) it is diffusers' UNet2DConditionModel
    with the same weights and config keys."""
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    unet_config = pipeline_dir / "unet" / "config.json"
    return (
        str((index.get("unet") or [""])[0]).startswith("simpletuner.")
        and unet_config.is_file()
        and json.loads(unet_config.read_text()).get("deltatime_type") is None
    )


def _lcm_save_lora_weights(original):
    """R3: the LCM settings in the metadata of every LoRA file SimpleTuner writes."""

    @functools.wraps(original)
    def save_lora_weights(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if _is_lcm_run(self.config):
            from pathlib import Path

            from lcm_plugin import __version__, outputs

            save_directory = args[0] if args else kwargs["save_directory"]
            path = Path(save_directory) / (kwargs.get("weight_name") or LORA_WEIGHT_NAME)
            if path.is_file():  # diffusers writes nothing on a non-main process
                metadata = outputs.lora_metadata(
                    _run_lcm_config(self.config), _validation_scheduler_config(self), plugin_version=__version__
                )
                outputs.add_safetensors_metadata(path, metadata)
        return result

    return save_lora_weights


def _run_output_surfaces() -> dict:
    """The SimpleTuner objects R1-R3 patch, checked (install() calls this before it changes anything)."""
    metadata = _import_surface("simpletuner.helpers.publishing.metadata")
    huggingface = _import_surface("simpletuner.helpers.publishing.huggingface")
    model_foundation = _require(_import_surface("simpletuner.helpers.models.common"), "ModelFoundation",
                                "simpletuner.helpers.models.common")
    _require(metadata, "code_example", "simpletuner.helpers.publishing.metadata")
    _require(huggingface, "save_model_card", "simpletuner.helpers.publishing.huggingface")
    _require(_require(huggingface, "HubManager", "simpletuner.helpers.publishing.huggingface"), "upload_model",
             "HubManager")
    for name in ("save_lora_weights", "_model_config_path"):
        _require(model_foundation, name, "ModelFoundation")
    return {"metadata": metadata, "huggingface": huggingface, "model_foundation": model_foundation}


def _patch_run_outputs(surfaces: dict, saved: dict) -> None:
    saved["run_outputs"] = {
        "code_example": surfaces["metadata"].code_example,
        "save_model_card": surfaces["huggingface"].save_model_card,
        "save_lora_weights": surfaces["model_foundation"].__dict__["save_lora_weights"],
    }
    surfaces["metadata"].code_example = _lcm_code_example(surfaces["metadata"].code_example)
    surfaces["huggingface"].save_model_card = _lcm_save_model_card(surfaces["huggingface"].save_model_card)
    surfaces["model_foundation"].save_lora_weights = _lcm_save_lora_weights(
        surfaces["model_foundation"].save_lora_weights
    )


def _restore_run_outputs(saved: dict) -> None:
    from simpletuner.helpers.models.common import ModelFoundation
    from simpletuner.helpers.publishing import huggingface, metadata

    originals = saved["run_outputs"]
    metadata.code_example = originals["code_example"]
    huggingface.save_model_card = originals["save_model_card"]
    ModelFoundation.save_lora_weights = originals["save_lora_weights"]


# --- end of run outputs ---------------------------------------------------------------------------------------------


# --- model families (F1) --------------------------------------------------------------------------------------------

SD1X_MODEL_MODULE = "simpletuner.helpers.models.sd1x.model"
# What diffusers' own SD pipelines are given for a model folder without a safety checker.
_NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _requires_safety_components(pipeline_class) -> bool:
    import inspect

    parameters = inspect.signature(pipeline_class.__init__).parameters
    return all(
        name in parameters and parameters[name].default is inspect.Parameter.empty
        for name in ("safety_checker", "feature_extractor")
    )


def _family_surfaces() -> dict:
    """The SimpleTuner objects F1 patches, checked (install() calls this before it changes anything)."""
    sd1x = _require(_import_surface(SD1X_MODEL_MODULE), "StableDiffusion1", SD1X_MODEL_MODULE)
    pipeline_classes = _require(sd1x, "PIPELINE_CLASSES", "StableDiffusion1")
    return {"sd1x_pipelines": [cls for cls in dict.fromkeys(pipeline_classes.values())
                               if _requires_safety_components(cls)]}


def _init_without_safety_checker(original):
    """F1: `__init__` that supplies _NO_SAFETY_CHECKER when neither safety component is passed."""
    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)  # keeps the original signature visible to diffusers' from_pretrained
    def __init__(self, *args, **kwargs):
        passed = signature.bind_partial(self, *args, **kwargs).arguments
        if "safety_checker" not in passed and "feature_extractor" not in passed:
            kwargs = {**_NO_SAFETY_CHECKER, **kwargs}
        original(self, *args, **kwargs)

    return __init__


def _patch_families(surfaces: dict, saved: dict) -> None:
    saved["families"] = {cls: cls.__dict__["__init__"] for cls in surfaces["sd1x_pipelines"]}
    for cls, original in saved["families"].items():
        cls.__init__ = _init_without_safety_checker(original)


def _restore_families(saved: dict) -> None:
    for cls, original in saved["families"].items():
        cls.__init__ = original


# --- end of model families ------------------------------------------------------------------------------------------


# --- quality check (Q1) ---------------------------------------------------------------------------------------------

# One lcm_plugin.quality_check.QualityCheck per Validation object (one per run): it keeps the teacher's sets.
_quality_checks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
UNCONDITIONAL_SHORTNAME = "unconditional"  # validation.prepare_validation_prompt_list's empty-prompt entry


def _quality_check_surfaces() -> dict:
    """The SimpleTuner objects Q1 uses or patches, checked (install() calls this before it changes anything)."""
    validation_module = "simpletuner.helpers.training.validation"
    validation = _require(_import_surface(validation_module), "Validation", validation_module)
    for name in ("finalize_validation", "_prepare_validation_work_items", "_gather_prompt_embeds"):
        _require(validation, name, "Validation")
    images_module = "simpletuner.helpers.training.validation_images"
    images = _import_surface(images_module)
    for name in ("save_validation_image", "log_images_to_trackers"):
        _require(images, name, images_module)
    state_module = "simpletuner.helpers.training.state_tracker"
    state_tracker = _require(_import_surface(state_module), "StateTracker", state_module)
    _require(state_tracker, "get_global_step", "StateTracker")
    return {"validation": validation, "images": images, "state_tracker": state_tracker}


def _finalize_with_quality_check(original, surfaces: dict):
    """Q1: `Validation.finalize_validation` first runs the LCM quality check, while validation's pipeline (with the
    trained weights on the inference device) still exists; then SimpleTuner's own clean-up."""

    @functools.wraps(original)
    def finalize_validation(self, validation_type):
        try:
            _run_quality_check(self, surfaces)
        except Exception as error:  # noqa: BLE001 - a failed measurement must not end a long training run
            logger.error("simpletuner-lcm: the LCM quality check failed (%s: %s); training goes on without it.",
                         type(error).__name__, error, exc_info=logger.isEnabledFor(logging.DEBUG))
        return original(self, validation_type)

    return finalize_validation


def _run_quality_check(validation, surfaces: dict) -> None:
    from lcm_plugin import quality_check
    from lcm_plugin.simpletuner.distiller import LcmDistiller

    config = validation.config
    pipeline = getattr(validation.model, "pipeline", None)
    if not (_is_lcm_run(config) and isinstance(validation.distiller, LcmDistiller) and pipeline is not None):
        return
    if not getattr(validation.accelerator, "is_main_process", True):
        return
    settings = validation.distiller.lcm_config
    if not settings.quality_check.enabled:
        return
    # The user's text prompts; SimpleTuner's added empty-prompt sample ("unconditional") is not one of them.
    items = [item for item in validation._prepare_validation_work_items(
        (validation.validation_prompt_metadata or {}).get("validation_prompts"))
        if item.conditioning is None and item.shortname != UNCONDITIONAL_SHORTNAME]
    if not items:
        logger.info("simpletuner-lcm: no text-only validation prompt; the LCM quality check is skipped.")
        return
    check = _quality_checks.get(validation)
    if check is None:
        check = _quality_checks[validation] = quality_check.QualityCheck(settings.quality_check)
    per_prompt = [
        validation._gather_prompt_embeds(item.prompt, item.shortname, None, cache_shortname=item.shortname)
        for item in items
    ]
    if any(embeds is None for embeds in per_prompt):
        logger.warning("simpletuner-lcm: a validation prompt has no cached text embedding; quality check skipped.")
        return
    # Rounded to a multiple of 16 as validate_prompt rounds its pipeline size.
    width, height = (max(16 * round(value / 16), 16) for value in validation.validation_resolutions[0])
    distiller = validation.distiller
    sample = quality_check.pipeline_sampler(
        pipeline,
        conditioning=quality_check.cycled_conditioning(per_prompt, settings.quality_check.samples),
        width=width,
        height=height,
        teacher_unet=distiller._teacher,
        student_scheduler=distiller.get_scheduler,
        training_scheduler_config=distiller.noise_scheduler.config,
        # A student without a guidance input distils the teacher averaged over U[w_min, w_max]: CFG is linear in
        # the scale, so that is the teacher at the mean scale (as in the demo).
        guidance_scale=(settings.w_min + settings.w_max) / 2.0,
    )
    step = surfaces["state_tracker"].get_global_step()
    report = check.run(sample, step=step)
    for line in report.summary.splitlines():
        logger.info("simpletuner-lcm: %s", line)
    validation.accelerator.log(report.metrics, step=step)
    label = "lcm_quality_grid"
    images = surfaces["images"]
    path = images.save_validation_image(
        report.grid, validation.save_dir, f"step_{step}_{label}", config, label=label, index=0,
        resolution=f"{width}x{height}",
    )
    logger.info("simpletuner-lcm: LCM quality grid (rows: sampler, columns: sample) saved to %s", path)
    images.log_images_to_trackers(validation.accelerator, {label: [report.grid]}, [(width, height)], config)


def _patch_quality_check(surfaces: dict, saved: dict) -> None:
    validation = surfaces["validation"]
    saved["finalize_validation"] = validation.__dict__["finalize_validation"]
    validation.finalize_validation = _finalize_with_quality_check(saved["finalize_validation"], surfaces)


def _restore_quality_check(saved: dict) -> None:
    from simpletuner.helpers.training.validation import Validation

    Validation.finalize_validation = saved["finalize_validation"]


# --- end of quality check -------------------------------------------------------------------------------------------


def install() -> None:
    """Patch SimpleTuner so that `distillation_method: lcm` trains our LcmDistiller. Safe to call twice."""
    global _saved
    if _saved is not None:
        return
    import torch

    installed_version = _simpletuner_version()
    if installed_version not in TESTED_SIMPLETUNER_VERSIONS:
        logger.warning(
            "simpletuner-lcm was tested with SimpleTuner %s, found %s; checking its surfaces.",
            ", ".join(TESTED_SIMPLETUNER_VERSIONS), installed_version,
        )

    # Every surface is checked before anything is changed, so a failure leaves SimpleTuner untouched.
    factory = _require(_import_surface("simpletuner.helpers.distillation.factory"), "DistillerFactory",
                       "simpletuner.helpers.distillation.factory")
    registry = _require(_import_surface("simpletuner.helpers.distillation.registry"), "DistillationRegistry",
                        "simpletuner.helpers.distillation.registry")
    base = _require(_import_surface("simpletuner.helpers.distillation.common"), "DistillationBase",
                    "simpletuner.helpers.distillation.common")
    upstream_lcm = _import_surface("simpletuner.helpers.distillation.lcm")  # registers upstream's "lcm" now
    trainer_cls = _require(_import_surface("simpletuner.helpers.training.trainer"), "Trainer",
                           "simpletuner.helpers.training.trainer")
    dataset_types = _import_surface("simpletuner.helpers.data_backend.dataset_types")
    json_file = _import_surface("simpletuner.helpers.configuration.json_file")
    if _saved is not None:  # importing the trainer fired the start-up hook (simpletuner_lcm_hook), which installed
        return
    for owner, names, where in (
        (factory, ("_create_lcm_distiller", "_method_config"), "DistillerFactory"),
        (registry, ("register", "get", "get_metadata", "_registry", "_metadata", "_requirement_profiles"),
         "DistillationRegistry"),
        (base, ("toggle_adapter", "prepare_batch", "compute_distill_loss", "get_scheduler",
                "_init_scheduler_configs"), "DistillationBase"),
        (trainer_cls, ("init_data_backend",), "Trainer"),
        (json_file, ("mapping_to_cli_args", "_candidate_json_paths"), "simpletuner.helpers.configuration.json_file"),
        (_require(dataset_types, "DatasetType", "simpletuner.helpers.data_backend.dataset_types"), ("IMAGE",),
         "DatasetType"),
    ):
        for name in names:
            _require(owner, name, where)
    data_path = _data_path_surfaces()
    run_outputs = _run_output_surfaces()
    families = _family_surfaces()
    quality_check = _quality_check_surfaces()

    from lcm_plugin.simpletuner.distiller import LcmDistiller

    saved = {
        "create": factory.__dict__["_create_lcm_distiller"],
        "method_config": factory.__dict__["_method_config"],
        "init_data_backend": trainer_cls.__dict__["init_data_backend"],
        "registered": registry.get(METHOD),
        "metadata": registry.get_metadata(METHOD),
        "alias_attr": upstream_lcm.__dict__.get("distiller"),
        "pin_memory": None,
        "mapping_to_cli_args": json_file.mapping_to_cli_args,
    }

    factory._create_lcm_distiller = staticmethod(_create_lcm_distiller)
    factory._method_config = _method_config_accepting_strings(saved["method_config"].__func__)
    trainer_cls.init_data_backend = _validating_init_data_backend(saved["init_data_backend"])
    json_file.mapping_to_cli_args = _mapping_without_schema_key(saved["mapping_to_cli_args"])
    registry.register(
        METHOD,
        LcmDistiller,
        requires_distillation_cache=False,
        data_requirements=[[dataset_types.DatasetType.IMAGE]],
    )
    if saved["registered"] is not None and saved["registered"] is not LcmDistiller:
        logger.info(
            "simpletuner-lcm: distillation method 'lcm' now uses %s.%s (replacing SimpleTuner's %s.%s).",
            LcmDistiller.__module__, LcmDistiller.__qualname__,
            saved["registered"].__module__, saved["registered"].__qualname__,
        )
    alias = types.ModuleType(ALIAS_MODULE, "simpletuner-lcm: the LCM distiller import path the factory expects.")
    alias.LCMDistiller = LcmDistiller
    sys.modules[ALIAS_MODULE] = alias
    upstream_lcm.distiller = alias
    if not _has_accelerator(torch):
        saved["pin_memory"] = torch.Tensor.pin_memory
        torch.Tensor.pin_memory = _unpinned
    _patch_data_path(data_path, saved)
    _patch_run_outputs(run_outputs, saved)
    _patch_families(families, saved)
    _patch_quality_check(quality_check, saved)
    _saved = saved


def uninstall() -> None:
    """Undo install(); a no-op when not installed."""
    global _saved
    if _saved is None:
        return
    import torch
    from simpletuner.helpers.distillation import lcm as upstream_lcm
    from simpletuner.helpers.distillation.factory import DistillerFactory
    from simpletuner.helpers.distillation.registry import DistillationRegistry
    from simpletuner.helpers.configuration import json_file
    from simpletuner.helpers.training.trainer import Trainer

    saved, _saved = _saved, None
    json_file.mapping_to_cli_args = saved["mapping_to_cli_args"]
    DistillerFactory._create_lcm_distiller = saved["create"]
    DistillerFactory._method_config = saved["method_config"]
    Trainer.init_data_backend = saved["init_data_backend"]
    if saved["registered"] is not None:
        DistillationRegistry.register(METHOD, saved["registered"], **saved["metadata"])
    else:
        for table in (DistillationRegistry._registry, DistillationRegistry._metadata,
                      DistillationRegistry._requirement_profiles):
            table.pop(METHOD, None)
    sys.modules.pop(ALIAS_MODULE, None)
    if saved["alias_attr"] is None:
        upstream_lcm.__dict__.pop("distiller", None)
    else:
        upstream_lcm.distiller = saved["alias_attr"]
    if saved["pin_memory"] is not None:
        torch.Tensor.pin_memory = saved["pin_memory"]
    _restore_data_path(saved)
    _restore_run_outputs(saved)
    _restore_families(saved)
    _restore_quality_check(saved)
