"""Every change the plugin makes to SimpleTuner, in one table (this docstring), and `install()` / `uninstall()`,
which apply and undo all of them (idempotent). Items 1-7 live here; each later group lives in its own module
(`PATCH_GROUPS`), which checks its surfaces before anything changes, patches and restores them.

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

Run outputs (LCM runs only; `run_output_patches.py`; the content is
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

Data path (every run the switch selects; `data_path_patches.py`; the logic is
`lcm_plugin.trainer_cache`, docs/data-path.md "Inside `simpletuner train`"). Covered datasets only; every method
falls through to SimpleTuner's own for the rest, and for any image or caption the shards do not hold:
D1. `training.trainer.configure_multi_databackend` (the trainer's call, after its VAE and text encoders are loaded
    and before any data backend is configured) first builds the memory-mapped caches with those models and writes
    SimpleTuner's bucket metadata (`trainer_cache.prepare`): in the dataset's folder, or for a `type: aws` dataset in
    its bucket, where SimpleTuner keeps it. An S3 dataset's latents are served from a local store
    (`<cache_dir_vae>/lcm` on the machine), not from `.pt` objects in the bucket.
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
D6. `DiscoveryMetadataBackend.load_image_metadata` takes the bucket metadata the build wrote this start as the dicts
    it wrote, instead of parsing the file again, while the file's stamp (an object's size and ETag) is the one
    written (once per dataset).
D7. `LocalDataBackend.list_files` and `S3DataBackend.list_files` answer SimpleTuner's listing of a covered dataset's
    folder (os.walk and a path join per file) or bucket prefix (paginated ListObjectsV2), for every image, video and
    audio extension it knows, from the build's scan, which listed the same files by the same rules a moment before
    (once per dataset; other folders, prefixes and extension lists are SimpleTuner's).
D8. `ParquetMetadataBackend._extract_captions_to_fast_list` (a pass over every row of a `metadata_backend: parquet`
    table) takes the captions the plan read from the same file by column, for a covered dataset whose `parquet`
    block is the one planned (once per dataset).
D9. `MetadataBackend._ensure_metadata_for_cached_buckets` (a metadata lookup, with a path resolution, per bucketed
    image after every discovery) answers by set operations for a covered dataset whose every bucketed image has
    metadata under its own path; otherwise SimpleTuner's own check runs.
D10. `DiscoveryMetadataBackend._discover_new_files` and `MetadataBackend.update_buckets_with_existing_files` (the bucket
    refresh on each machine's first rank: sets of the folder's listing and of every bucketed image, then a membership
    filter of every bucket) find nothing new and nothing missing without the sets or the filter, when SimpleTuner's
    listing is the scan's (D7), every listed image is in the bucket index file the build wrote this start, and the
    buckets SimpleTuner holds were read from that file unchanged (its stamp and bucket sizes). The listing is still
    kept (`StateTracker.set_image_files`) and the buckets still saved (`save_cache`), as SimpleTuner's refresh does.

Model families (every run, LCM or not; `family_patches.py`):
F1. The SD 1.x pipeline classes (`models.sd1x.pipeline`, as listed in `StableDiffusion1.PIPELINE_CLASSES`) build
    without a safety checker when the caller passes neither `safety_checker` nor `feature_extractor`: their
    `__init__` then receives `safety_checker=None, feature_extractor=None, requires_safety_checker=False`.
    Upstream's `_load_pipeline(load_base_model=False)` (text-embedding caching) constructs them from loaded
    components and passes neither, so every `model_family: sd1x` run stops with a TypeError before training.
    `from_pretrained` is unchanged (it sees the original signature). Skipped for a class whose `__init__` no
    longer requires the two arguments.

Sampler (every run, LCM or not; `sampler_patches.py`):
S1. `MultiAspectSampler._sample_path` names an S3 dataset's sample by its object key as it is. Upstream joins the
    dataset's `instance_data_dir` (for `type: aws`, its `aws_data_prefix`) to every sample name: a local sample's
    absolute path survives the join, but an object key already starts with the prefix, and the joined name
    (`photos/photos/a.jpg`) has no metadata, so an S3 dataset with any prefix but `""` stops at its first batch
    ("did not have its metadata"). With the prefix `""` the join changed nothing, and nothing changes.

Quality check (LCM runs with `lcm.quality_check.enabled`; `quality_check_patches.py`; the logic is
`lcm_plugin.quality_check`):
Q1. `Validation.finalize_validation` (called once per validation, on the processes that ran it, while the pipeline
    still exists) first samples the student and teacher on the validation prompts' cached embeddings
    (`Validation._prepare_validation_work_items`, `_gather_prompt_embeds`), logs `lcm_quality/...` with
    `accelerator.log` and saves/logs a comparison grid with `validation_images.save_validation_image` /
    `log_images_to_trackers`, at `StateTracker.get_global_step()`. SimpleTuner has no per-validation metric hook.
    Rank 0 only, under validation's autocast; skipped with one warning under FSDP or DeepSpeed ZeRO-3.
"""

from __future__ import annotations

import functools
import logging
import sys
import types

from lcm_plugin.simpletuner import (
    data_path_patches,
    family_patches,
    quality_check_patches,
    run_output_patches,
    sampler_patches,
)
from lcm_plugin.simpletuner.run_config import METHOD, lcm_block, lcm_config_from_block, parse_distillation_config
from lcm_plugin.simpletuner.run_config import running_config_path
from lcm_plugin.simpletuner.surfaces import (
    TESTED_SIMPLETUNER_VERSIONS,
    has_accelerator,
    import_surface,
    require,
    simpletuner_version,
)

logger = logging.getLogger("simpletuner-lcm")

SUPPORTED_MODEL_TYPES = ("lora", "full")
ALIAS_MODULE = "simpletuner.helpers.distillation.lcm.distiller"

# The patch groups beyond the distiller's own (1-7 above), in the order install() applies them: each module checks
# its SimpleTuner surfaces (`surfaces()`, before anything changes), patches them (`patch(surfaces, saved)`) and puts
# them back (`restore(saved)`).
PATCH_GROUPS = (data_path_patches, run_output_patches, family_patches, sampler_patches, quality_check_patches)

# Originals saved by install() and put back by uninstall(); None while not installed.
_saved: dict | None = None



def is_installed() -> bool:
    return _saved is not None



def validate_before_model_load(trainer) -> None:
    """Checks run by the patched `Trainer.init_data_backend`, before data caching and model loading."""
    config = trainer.config
    if str(getattr(config, "distillation_method", None) or "").lower() != METHOD:
        return
    _validate_config_files(getattr(config, "data_backend_config", None))
    lcm_config = lcm_config_from_block(lcm_block(getattr(config, "distillation_config", None)))
    prediction_type = getattr(trainer.model, "PREDICTION_TYPE", None)
    if prediction_type is not None and prediction_type.is_flow_prediction:
        from lcm_plugin.config.families import flow_refusal

        refusal = flow_refusal(lcm_config, lambda name: getattr(config, name, None))
        if refusal:
            raise ValueError(refusal)
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

    config_path = running_config_path()
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



def install() -> None:
    """Patch SimpleTuner so that `distillation_method: lcm` trains our LcmDistiller. Safe to call twice."""
    global _saved
    if _saved is not None:
        return
    import torch

    installed_version = simpletuner_version()
    if installed_version not in TESTED_SIMPLETUNER_VERSIONS:
        logger.warning(
            "simpletuner-lcm was tested with SimpleTuner %s, found %s; checking its surfaces.",
            ", ".join(TESTED_SIMPLETUNER_VERSIONS), installed_version,
        )

    # Every surface is checked before anything is changed, so a failure leaves SimpleTuner untouched.
    factory = require(import_surface("simpletuner.helpers.distillation.factory"), "DistillerFactory",
                       "simpletuner.helpers.distillation.factory")
    registry = require(import_surface("simpletuner.helpers.distillation.registry"), "DistillationRegistry",
                        "simpletuner.helpers.distillation.registry")
    base = require(import_surface("simpletuner.helpers.distillation.common"), "DistillationBase",
                    "simpletuner.helpers.distillation.common")
    upstream_lcm = import_surface("simpletuner.helpers.distillation.lcm")  # registers upstream's "lcm" now
    trainer_cls = require(import_surface("simpletuner.helpers.training.trainer"), "Trainer",
                           "simpletuner.helpers.training.trainer")
    dataset_types = import_surface("simpletuner.helpers.data_backend.dataset_types")
    json_file = import_surface("simpletuner.helpers.configuration.json_file")
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
        (require(dataset_types, "DatasetType", "simpletuner.helpers.data_backend.dataset_types"), ("IMAGE",),
         "DatasetType"),
    ):
        for name in names:
            require(owner, name, where)
    group_surfaces = [group.surfaces() for group in PATCH_GROUPS]

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
    if not has_accelerator(torch):
        saved["pin_memory"] = torch.Tensor.pin_memory
        torch.Tensor.pin_memory = _unpinned
    for group, surfaces in zip(PATCH_GROUPS, group_surfaces):
        group.patch(surfaces, saved)
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
    for group in PATCH_GROUPS:
        group.restore(saved)

