"""Data path patches D1-D10 (the table is in install.py's docstring; the logic is `lcm_plugin.trainer_cache`)."""

from __future__ import annotations

import functools
import gc
import logging
import os
import time
from itertools import filterfalse

from lcm_plugin.simpletuner.run_config import is_lcm_run, running_config_path
from lcm_plugin.simpletuner.surfaces import import_surface, require

logger = logging.getLogger("simpletuner-lcm")



def surfaces() -> dict:
    """The SimpleTuner objects D1-D10 patch, checked (install() calls this before it changes anything)."""
    trainer_module = import_surface("simpletuner.helpers.training.trainer")
    require(trainer_module, "configure_multi_databackend", "simpletuner.helpers.training.trainer")
    collate = import_surface("simpletuner.helpers.training.collate")
    require(collate, "compute_latents", "simpletuner.helpers.training.collate")
    vae_cache = require(import_surface("simpletuner.helpers.caching.vae"), "VAECache",
                         "simpletuner.helpers.caching.vae")
    for name in ("discover_unprocessed_files", "retrieve_from_cache", "_reduce_bucket", "build_vae_cache_filename_map",
                 "_local_unprocessed_file_set"):
        require(vae_cache, name, "VAECache")
    text_cache = require(import_surface("simpletuner.helpers.caching.text_embeds"), "TextEmbeddingCache",
                          "simpletuner.helpers.caching.text_embeds")
    for name in ("load_from_cache", "compute_embeddings_for_prompts", "encode_dropout_caption",
                 "hash_prompt_with_path", "_normalize_prompt_records"):
        require(text_cache, name, "TextEmbeddingCache")
    factory = require(import_surface("simpletuner.helpers.data_backend.factory"), "FactoryRegistry",
                       "simpletuner.helpers.data_backend.factory")
    for name in ("_process_text_embeddings", "_uses_text_embeddings_cache"):
        require(factory, name, "FactoryRegistry")
    discovery = require(import_surface("simpletuner.helpers.metadata.backends.discovery"), "DiscoveryMetadataBackend",
                        "simpletuner.helpers.metadata.backends.discovery")
    for name in ("load_image_metadata", "_discover_new_files", "save_cache"):
        require(discovery, name, "DiscoveryMetadataBackend")
    local_backend = require(import_surface("simpletuner.helpers.data_backend.local"), "LocalDataBackend",
                            "simpletuner.helpers.data_backend.local")
    require(local_backend, "list_files", "LocalDataBackend")
    aws_backend = require(import_surface("simpletuner.helpers.data_backend.aws"), "S3DataBackend",
                          "simpletuner.helpers.data_backend.aws")
    require(aws_backend, "list_files", "S3DataBackend")
    parquet = require(import_surface("simpletuner.helpers.metadata.backends.parquet"), "ParquetMetadataBackend",
                      "simpletuner.helpers.metadata.backends.parquet")
    require(parquet, "_extract_captions_to_fast_list", "ParquetMetadataBackend")
    metadata_base = require(import_surface("simpletuner.helpers.metadata.backends.base"), "MetadataBackend",
                            "simpletuner.helpers.metadata.backends.base")
    for name in ("_ensure_metadata_for_cached_buckets", "update_buckets_with_existing_files"):
        require(metadata_base, name, "MetadataBackend")
    state_tracker = require(import_surface("simpletuner.helpers.training.state_tracker"), "StateTracker",
                            "simpletuner.helpers.training.state_tracker")
    for name in ("get_image_files", "set_image_files"):
        require(state_tracker, name, "StateTracker")
    require(import_surface("simpletuner.helpers.training"), "image_file_extensions", "simpletuner.helpers.training")
    foundation = require(import_surface("simpletuner.helpers.models.common"), "ModelFoundation",
                         "simpletuner.helpers.models.common")
    for name in ("encode_text_batch", "pack_text_embeddings_for_cache", "text_embed_cache_namespace",
                 "requires_text_embed_image_context", "requires_text_embed_resolution_context"):
        require(foundation, name, "ModelFoundation")  # model_caption_encoding calls them (read, not patched)
    return {"trainer_module": trainer_module, "collate": collate, "vae_cache": vae_cache, "text_cache": text_cache,
            "factory": factory, "discovery": discovery, "local_backend": local_backend, "aws_backend": aws_backend,
            "parquet": parquet,
            "metadata_base": metadata_base}


def _building_configure(original):
    """D1."""
    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)
    def configure_multi_databackend(*args, **kwargs):
        from lcm_plugin import trainer_cache

        started = time.monotonic()
        bound = signature.bind(*args, **kwargs).arguments
        # The trainer's heap (models, SimpleTuner's state) is large, and preparing the data allocates per image,
        # ours and SimpleTuner's passes alike: every full collection the allocations trigger walks that heap (at
        # 2,000 images, 0.4 s of a 0.6 s start). Frozen, the heap that exists now is left out of them until the
        # datasets are configured. SimpleTuner's own path (the switch) runs as without the plugin.
        try:
            ours = trainer_cache.data_path_mode(os.environ.get(trainer_cache.SWITCH),
                                                is_lcm_run(bound["args"])) == trainer_cache.RUST
        except trainer_cache.DataPathSwitchError:
            ours = False  # _prepare_data_path stops the run with the switch's message
        if ours:
            gc.freeze()
        try:
            _prepare_data_path(bound["args"], bound["accelerator"], bound["text_encoders"], bound["tokenizers"],
                               bound["model"])
            result = original(*args, **kwargs)
        finally:
            if ours:
                gc.unfreeze()
        if bound["accelerator"].is_main_process:
            # One figure for either path (bench/data_path.py part a reads it): scans, buckets, VAE and text
            # caches, and the start-up checks of existing caches all happen inside this call.
            logger.info("simpletuner-lcm: data preparation took %.2f s", time.monotonic() - started)
        return result

    return configure_multi_databackend


def model_caption_encoding(model, config) -> tuple:
    """(encode_caption, text_options) for TrainerModels: one caption encoded as SimpleTuner's TextEmbeddingCache
    encodes it at `text_encoder_batch_size` 1 (`model.encode_text_batch([caption])`, then
    `pack_text_embeddings_for_cache`, as `save_to_cache` does), and the settings that encoding reads; (None, ()) for
    the families whose captions the build encodes itself, and for a model whose encoding needs per-image context,
    JSON prompts or a cache namespace (the build passes no metadata; the trainer's data path then falls back)."""
    from importlib.metadata import version

    from lcm_plugin.cache_build.layout import MODEL_ENCODED_FAMILIES

    if str(getattr(config, "model_family", "")) not in MODEL_ENCODED_FAMILIES or model is None:
        return None, ()
    context = ("requires_text_embed_image_context", "requires_text_embed_resolution_context")
    if any(getattr(model, name)() for name in context) or model.text_embed_cache_namespace() is not None:
        return None, ()

    def encode_caption(caption: str) -> dict:
        encoded = model.encode_text_batch([caption], is_negative_prompt=False, prompt_contexts=[{}])
        return model.pack_text_embeddings_for_cache(encoded)

    encoders = getattr(model, "TEXT_ENCODER_CONFIGURATION", None) or {}
    options = (("encoded_by", f"simpletuner {version('simpletuner')} {type(model).__name__}"),
               ("t5_padding", str(getattr(config, "t5_padding", None))),
               ("tokenizer_max_length", getattr(config, "tokenizer_max_length", None)),
               ("text_encoder_paths", tuple(sorted({str(e["path"]) for e in encoders.values() if e.get("path")}))),
               # SimpleTuner quantises the encoders before its text cache runs; so are the ones encode_caption calls
               ("text_encoder_precisions", tuple(str(getattr(config, f"text_encoder_{number}_precision", None))
                                                 for number in range(1, len(encoders) + 1))))
    return encode_caption, options


def _prepare_data_path(config, accelerator, text_encoders, tokenizers, model) -> None:
    from lcm_plugin import trainer_cache
    from lcm_plugin.cache_build.ranks import RanksDisagree, threads_per_rank

    rank = accelerator.process_index
    models = trainer_cache.TrainerModels(getattr(model, "vae", None), list(tokenizers or []),
                                         list(text_encoders or []), *model_caption_encoding(model, config))
    try:
        # Every rank on this machine runs its own Rust pools: each gets its share of the cores, not all of them. A
        # RAYON_NUM_THREADS the user set sizes every pool instead (None: rayon's global pool, which reads it).
        threads = None if os.environ.get("RAYON_NUM_THREADS") else threads_per_rank(accelerator.num_processes)
        from simpletuner.helpers.training import image_file_extensions

        trainer_cache.prepare(
            running_config_path(), config, lcm_run=is_lcm_run(config), models=models,
            group=trainer_cache.AcceleratorGroup(accelerator), rank=rank, local_rank=accelerator.local_process_index,
            threads=threads, listed_extensions=image_file_extensions,
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
        self.local_unprocessed_files = trainer_cache.unserved(served, unprocessed)
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
            all_image_files = list(filterfalse(served.__contains__, all_image_files))
        return original(self, all_image_files)

    return build_vae_cache_filename_map


def _written_metadata_handed_over(original):
    """D6: SimpleTuner parses the bucket metadata file the build wrote a moment ago (a dict per image); the build
    hands it the same dicts instead, while the file is the one it wrote."""

    @functools.wraps(original)
    def load_image_metadata(self):
        from lcm_plugin import trainer_cache

        metadata = trainer_cache.take_bucket_metadata(self.id, self.metadata_file)
        if metadata is None:
            return original(self)
        self.image_metadata = metadata
        self.image_metadata_loaded = True
        return None

    return load_image_metadata


def _listing_from_the_scan(original):
    """D7: SimpleTuner lists a dataset's folder (os.walk, a path join per file) or bucket prefix (a paginated
    ListObjectsV2, 1,000 keys a request) right after the build's scan listed it; the scan's inventory answers
    instead, once, for the folder or prefix and extensions it listed."""

    @functools.wraps(original)
    def list_files(self, file_extensions, instance_data_dir=None):
        from lcm_plugin import trainer_cache

        listing = trainer_cache.take_listing(getattr(self, "id", None), instance_data_dir, file_extensions)
        return original(self, file_extensions, instance_data_dir) if listing is None else listing

    return list_files


def _parquet_captions_from_the_plan(original):
    """D8: SimpleTuner walks a parquet table row by row for its captions at every start; the plan read the same
    columns a moment before and hands over the same dict, once, for a covered dataset."""

    @functools.wraps(original)
    def _extract_captions_to_fast_list(self):
        from lcm_plugin import trainer_cache

        captions = trainer_cache.take_parquet_captions(getattr(self, "id", None), getattr(self, "parquet_config", None))
        return original(self) if captions is None else captions

    return _extract_captions_to_fast_list


def _metadata_check_by_sets(original):
    """D9: after discovery, SimpleTuner looks every bucketed image's metadata up (a path resolution each, ~4 s per
    million images) to find any missing; for a covered dataset two set operations give the same answer when nothing
    is missing, and SimpleTuner's own check runs otherwise."""

    @functools.wraps(original)
    def _ensure_metadata_for_cached_buckets(self):
        from lcm_plugin import trainer_cache

        if trainer_cache.has_every_bucketed_metadata(getattr(self, "id", None), getattr(self, "image_metadata", None),
                                                     getattr(self, "aspect_ratio_bucket_indices", None)):
            return None
        return original(self)

    return _ensure_metadata_for_cached_buckets


def _nothing_new_discovered(original):
    """D10, discovery: at every start SimpleTuner's bucket refresh lists the folder, then builds sets of the listing
    and of every bucketed image to find the new files; when the listing is the scan's (D7) and every image it lists is
    in the bucket index file the build wrote and SimpleTuner read, it finds none, and the sets are skipped. The
    listing is kept as SimpleTuner keeps it (`StateTracker.set_image_files`: its other ranks and passes read it)."""

    @functools.wraps(original)
    def _discover_new_files(self, for_metadata: bool = False, ignore_existing_cache: bool = False):
        from simpletuner.helpers.training import image_file_extensions
        from simpletuner.helpers.training.state_tracker import StateTracker

        from lcm_plugin import trainer_cache

        dataset_id = self.data_backend.id
        if (not for_metadata and not ignore_existing_cache and trainer_cache.answers_bucket_refresh(dataset_id)
                and StateTracker.get_image_files(data_backend_id=dataset_id) is None):
            listing = self.data_backend.list_files(instance_data_dir=self.instance_data_dir,
                                                   file_extensions=image_file_extensions)
            files = StateTracker.set_image_files(listing, data_backend_id=dataset_id)
            if trainer_cache.finds_nothing_new(dataset_id, files, self.cache_file, self.aspect_ratio_bucket_indices):
                return []
        return original(self, for_metadata, ignore_existing_cache)  # on the listing kept above, if any

    return _discover_new_files


def _nothing_missing_removed(original):
    """D10, the check after discovery: SimpleTuner filters every bucket by membership in its listing and drops
    duplicates, then saves the buckets; after D10's discovery found the listing and the buckets to be the same
    images, each once, only the save is left."""

    @functools.wraps(original)
    def update_buckets_with_existing_files(self, existing_files):
        from lcm_plugin import trainer_cache

        if trainer_cache.misses_nothing(self.id, existing_files, self.cache_file, self.aspect_ratio_bucket_indices):
            return self.save_cache()
        return original(self, existing_files)

    return update_buckets_with_existing_files


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
    ("discovery", "load_image_metadata", _written_metadata_handed_over),
    ("discovery", "_discover_new_files", _nothing_new_discovered),
    ("metadata_base", "update_buckets_with_existing_files", _nothing_missing_removed),
    ("local_backend", "list_files", _listing_from_the_scan),
    ("aws_backend", "list_files", _listing_from_the_scan),
    ("parquet", "_extract_captions_to_fast_list", _parquet_captions_from_the_plan),
    ("metadata_base", "_ensure_metadata_for_cached_buckets", _metadata_check_by_sets),
    ("vae_cache", "_reduce_bucket", _reduce_unprocessed_only),
    ("vae_cache", "build_vae_cache_filename_map", _file_names_of_unserved),
    ("vae_cache", "discover_unprocessed_files", _discover_unserved),
    ("vae_cache", "retrieve_from_cache", _served_retrieve),
    ("text_cache", "load_from_cache", _served_text_load),
    ("text_cache", "compute_embeddings_for_prompts", _unserved_prompts_only),
    ("text_cache", "encode_dropout_caption", _dropout_unless_served),
)


def patch(surfaces: dict, saved: dict) -> None:
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


def restore(saved: dict) -> None:
    from simpletuner.helpers.training import collate
    from simpletuner.helpers.training import trainer as trainer_module

    from lcm_plugin import trainer_cache

    originals = saved["data_path"]
    trainer_module.configure_multi_databackend = originals["configure_multi_databackend"]
    collate.compute_latents = originals["compute_latents"]
    for cls, name, original in originals["methods"]:
        setattr(cls, name, original)
    trainer_cache.reset()
