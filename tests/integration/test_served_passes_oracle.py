"""SimpleTuner's passes get the same answers from the plugin's index as from SimpleTuner's own code on the same
folder (issue 18, item 7).

One stock `simpletuner train` (2 LCM-LoRA steps of the tiny SDXL, SIMPLETUNER_LCM_DATA_PATH unset) over two covered
datasets sharing one text cache:
- "clean": six PNGs in two buckets, every one usable, with the caption files SimpleTuner and the build must read
  alike (trailing newline, CRLF, two captions in one file, a blank line, padding spaces);
- "mixed": the same plus what the build cannot use: a corrupt PNG, a PNG below minimum_image_size (both with
  captions), and a TIFF with a caption (SimpleTuner reads TIFF; the build does not list it), which SimpleTuner
  buckets and then caches and trains itself. (An image without a caption file is left out of the trained run:
  SimpleTuner's discovery buckets it, the build skips it, so D5 hands the pass back and SimpleTuner 4.10.1's own
  `get_all_captions` raises FileNotFoundError: the run stops, as it does with SIMPLETUNER_LCM_DATA_PATH=simpletuner.
  `test_one_unserved_image_in_simpletuners_buckets_makes_serves_every_image_false` covers it on the real buckets.)

Inside the training interpreter a recorder (the `_seam_*` objects below, shipped as the trainer's
sitecustomize.py) wraps each patched seam after the plugin's hook installed it, and at each real call also runs
SimpleTuner's own method (the original install() saved) on the same object and arguments, then records both
answers:
1. D5 `FactoryRegistry._process_text_embeddings`: SimpleTuner's `PromptHandler.get_all_captions` with the
   arguments the original passes it, each caption's record built as the original builds it and named with
   `TextEmbeddingCache.hash_prompt_with_path`, `trainer_cache.has_text_embeddings` for that name, the buckets,
   `serves_every_image`, and whether SimpleTuner's own pass then ran (its `compute_embeddings_for_prompts`);
2. D2 `VAECache._reduce_bucket`: the patched and the original answer per bucket;
3. D2 `VAECache.discover_unprocessed_files`: both answers;
4. D2 `VAECache.build_vae_cache_filename_map`: both pairs of maps; the patched maps are then watched and every key
   looked up in them for the rest of the run (caching and the 2 training steps) is recorded.
The test judges the records against the folder itself: which files it wrote and which of them the build can use.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from pathlib import Path

import pytest

from conftest import stock_trainer_env
from test_simpletuner_train import LORA_FILE, lcm_losses, run_stock_trainer

STEPS = 2
SIZE = 64  # pixels; the tiny VAE makes 8x8 latents of a 64x64 image
SERVED_LINE = "read latents and text embeddings from the memory-mapped caches"
RECORD_ENV = "LCM_SEAM_RECORD"
# Caption files of the usable images: (file stem, (width, height), caption file text). Both datasets hold them.
USABLE = (
    ("a", (SIZE, SIZE), "red circle"),
    ("b", (SIZE, SIZE), "blue square\n"),
    ("c", (SIZE, SIZE), "red square\r\nblue circle"),
    ("d", (SIZE, SIZE), "  blue circle  "),
    ("e", (2 * SIZE, SIZE), "red circle\n\nblue square\n"),
    ("f", (2 * SIZE, SIZE), "blue circle\n  \nred square"),
)
TIFF_CAPTION = "circle blue red"  # no usable image has it: only SimpleTuner's own pass can encode it


def write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (250 - 20 * seed, 30 + 25 * seed, 120))
    ImageDraw.Draw(image).ellipse((8, 8, size[0] - 8, size[1] - 8), fill=(20 * seed, 200, 60))
    image.save(path)


def write_dataset(folder: Path, *, unusable: bool) -> dict[str, list[str]]:
    """The images of one dataset; returns {"usable": paths the build serves, "tiff": [...], "unusable": [...]}."""
    folder.mkdir(parents=True)
    kinds = {"usable": [], "tiff": [], "unusable": []}
    for seed, (stem, size, caption) in enumerate(USABLE):
        write_image(folder / f"{stem}.png", size, seed)
        (folder / f"{stem}.txt").write_bytes(caption.encode())
        kinds["usable"].append(str(folder / f"{stem}.png"))
    if unusable:
        write_image(folder / "g.tiff", (SIZE, SIZE), 7)
        (folder / "g.txt").write_text(TIFF_CAPTION)
        kinds["tiff"].append(str(folder / "g.tiff"))
        (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
        (folder / "corrupt.txt").write_text("blue square")
        write_image(folder / "small.png", (16, 16), 8)
        (folder / "small.txt").write_text("red circle")
        kinds["unusable"] += [str(folder / "corrupt.png"), str(folder / "small.png")]
        # SimpleTuner lists hidden folders (it skips a few named ones only): so does the build
        (folder / ".hidden").mkdir()
        write_image(folder / ".hidden" / "h.png", (SIZE, SIZE), 9)
        (folder / ".hidden" / "h.txt").write_text("red circle")
        kinds["usable"].append(str(folder / ".hidden" / "h.png"))
    return kinds


def write_run(root: Path, model_dir: Path) -> tuple[Path, dict[str, dict[str, list[str]]]]:
    kinds = {"clean": write_dataset(root / "data" / "clean", unusable=False),
             "mixed": write_dataset(root / "data" / "mixed", unusable=True)}
    (root / "config").mkdir(parents=True)
    image = {"type": "local", "crop": False, "resolution": SIZE, "resolution_type": "pixel",
             "minimum_image_size": SIZE // 2, "caption_strategy": "textfile", "metadata_backend": "discovery",
             "repeats": 0}
    backends = [
        *({**image, "id": name, "instance_data_dir": str(root / "data" / name),
           "cache_dir_vae": str(root / "cache" / f"vae-{name}")} for name in kinds),
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(root / "cache" / "text"), "write_batch_size": 8},
    ]
    (root / "config" / "multidatabackend.json").write_text(json.dumps(backends, indent=2))
    config = {
        "model_type": "lora", "model_family": "sdxl", "output_dir": str(root / "output"),
        "pretrained_model_name_or_path": str(model_dir), "pretrained_vae_model_name_or_path": str(model_dir / "vae"),
        "data_backend_config": str(root / "config" / "multidatabackend.json"),
        "distillation_method": "lcm", "distillation_config": {"lcm": {"num_ddim_timesteps": 50, "w_min": 1.0,
                                                                      "w_max": 12.0}},
        "resolution": SIZE, "resolution_type": "pixel", "minimum_image_size": SIZE // 2,
        "learning_rate": 1e-3, "lr_scheduler": "constant", "lr_warmup_steps": 0, "max_train_steps": STEPS,
        "num_train_epochs": 0, "train_batch_size": 2, "gradient_accumulation_steps": 1, "mixed_precision": "no",
        "lora_type": "standard", "lora_rank": 4, "lora_alpha": 4, "optimizer": "torch-adamw", "seed": 42,
        "validation_disable": True, "report_to": "simpletuner", "checkpoint_step_interval": 10_000,
        "push_to_hub": False,
    }
    (root / "config" / "config.json").write_text(json.dumps(config, indent=2))
    return root, kinds


# --- the recorder: shipped as sitecustomize.py of the training interpreter (stdlib at import; only top-level names
# --- of its own; `_seam_arm` puts a one-shot finder before the plugin's hook on sys.meta_path) ------------------------


def _seam_emit(event: dict) -> None:
    import json
    import os
    import threading

    lock = globals().setdefault("_SEAM_LOCK", threading.Lock())
    with lock, open(os.path.join(os.environ["LCM_SEAM_RECORD"], "events.jsonl"), "a") as out:
        out.write(json.dumps(event, default=str) + "\n")


class _SeamWatchedMap(dict):
    """A VAECache name map that records every key looked up in it (module level: picklable)."""

    def __init__(self, data, dataset, name):
        super().__init__(data)
        self.seam_where = (dataset, name)

    def _seen(self, key, how):
        _seam_emit({"seam": "map_lookup", "dataset": self.seam_where[0], "map": self.seam_where[1], "key": key,
                    "how": how})

    def get(self, key, default=None):
        self._seen(key, "get")
        return super().get(key, default)

    def __getitem__(self, key):
        self._seen(key, "[]")
        return super().__getitem__(key)

    def __contains__(self, key):
        self._seen(key, "in")
        return super().__contains__(key)

    def __reduce__(self):
        return (dict, (dict(self),))


def _seam_instrument() -> None:
    """Wrap the patched seams (called once the trainer module imported, after the plugin's hook ran install())."""
    import os
    import sys
    import threading

    from simpletuner.helpers.caching.text_embeds import TextEmbeddingCache
    from simpletuner.helpers.caching.vae import VAECache
    from simpletuner.helpers.data_backend.factory import FactoryRegistry
    from simpletuner.helpers.data_backend.local import LocalDataBackend
    from simpletuner.helpers.metadata.backends.base import MetadataBackend
    from simpletuner.helpers.prompts import PromptHandler

    from lcm_plugin import trainer_cache
    from lcm_plugin.simpletuner import install as installer

    _seam_emit({"seam": "installed", "installed": installer.is_installed()})
    if not installer.is_installed():
        return
    saved = {(cls.__name__, name): original for cls, name, original in installer._saved["data_path"]["methods"]}
    factory = sys.modules[FactoryRegistry.__module__]
    context = threading.local()

    def pair(cls, name):
        patched, original = vars(cls)[name], saved[cls.__name__, name]
        _seam_emit({"seam": "saved", "method": f"{cls.__name__}.{name}",
                    "wraps_saved": getattr(patched, "__wrapped__", None) is original})
        return patched, original

    def served_list(dataset):
        served = trainer_cache.cached_images(dataset)
        return None if served is None else sorted(served)

    def caption_records(self, backend, init_backend):
        """SimpleTuner's captions and prompt records, as its `_process_text_embeddings` collects and builds them."""
        caption_strategy = init_backend["config"].get("caption_strategy")
        use_captions = not (backend.get("only_instance_prompt") or getattr(self.args, "only_instance_prompt", False)
                            or caption_strategy == "instanceprompt")
        captions, missing, paths = PromptHandler.get_all_captions(
            data_backend=init_backend["data_backend"],
            instance_data_dir=init_backend["instance_data_dir"],
            prepend_instance_prompt=backend.get("prepend_instance_prompt", self.args.prepend_instance_prompt),
            instance_prompt=backend.get("instance_prompt", self.args.instance_prompt),
            use_captions=use_captions,
            caption_strategy=caption_strategy,
            return_image_paths=True,
            disable_multiline_split=backend.get("disable_multiline_split", False),
        )
        key_type = self.model.text_embed_cache_key()
        dataset_id, dataset_root = init_backend["id"], init_backend.get("instance_data_dir")
        text_cache = init_backend["text_embed_cache"]
        records = []
        for caption, image_path in zip(captions, paths):
            image_path_str = str(image_path)
            relative = factory.normalize_data_path(image_path_str, dataset_root)
            metadata = {"image_path": image_path_str, "data_backend_id": dataset_id, "prompt": caption,
                        "dataset_relative_path": relative}
            builder = getattr(self.model, "text_embed_cache_metadata_for_filepath", None)
            if callable(builder):
                metadata.update(builder(init_backend=init_backend, image_path=image_path_str, prompt=caption,
                                        data_backend_id=dataset_id, dataset_relative_path=relative))
            if key_type is factory.TextEmbedCacheKey.DATASET_AND_FILENAME:
                key = f"{dataset_id}:{relative}"
            elif key_type is factory.TextEmbedCacheKey.FILENAME:
                key = factory.normalize_data_path(image_path_str, None)
            else:
                key = caption
            key_builder = getattr(self.model, "text_embed_cache_key_value", None)
            if callable(key_builder):
                key = key_builder(prompt=caption, default_key=key, metadata=metadata)
            name = text_cache.hash_prompt_with_path({"prompt": caption, "key": key, "metadata": metadata})
            records.append({"image": image_path_str, "caption": caption, "file": name,
                            "served": trainer_cache.has_text_embeddings(text_cache.cache_dir, name)})
        return records, [str(path) for path in missing]

    process_text, _ = pair(FactoryRegistry, "_process_text_embeddings")

    def process_text_embeddings(self, backend, init_backend, conditioning_type):
        dataset = init_backend["id"]
        buckets = getattr(init_backend.get("metadata_backend"), "aspect_ratio_bucket_indices", None)
        buckets = {str(bucket): list(paths) for bucket, paths in buckets.items()} if isinstance(buckets, dict) else None
        event = {"seam": "D5", "dataset": dataset, "buckets": buckets, "served_images": served_list(dataset),
                 "serves_every_image": trainer_cache.serves_every_image(dataset, buckets)}
        if init_backend.get("config", {}).get("caption_strategy") is not None and conditioning_type is None:
            try:
                event["captions"], event["missing"] = caption_records(self, backend, init_backend)
            except Exception as error:  # noqa: BLE001 - recorded: SimpleTuner's own pass meets it too
                event["captions_error"] = f"{type(error).__name__}: {error}"
        context.dataset = dataset
        try:
            return process_text(self, backend, init_backend, conditioning_type)
        finally:
            context.dataset = None
            after = getattr(init_backend.get("metadata_backend"), "aspect_ratio_bucket_indices", None) or {}
            event["buckets_after"] = {str(bucket): list(paths) for bucket, paths in after.items()}
            event["hash_filenames"] = init_backend["config"].get("hash_filenames")
            _seam_emit(event)

    compute_prompts = vars(TextEmbeddingCache)["compute_embeddings_for_prompts"]

    def compute_embeddings_for_prompts(self, *args, **kwargs):
        prompts = args[0] if args else kwargs.get("all_prompts")
        _seam_emit({"seam": "text_pass", "dataset": getattr(context, "dataset", None),
                    "prompts": [p.get("prompt") if isinstance(p, dict) else p for p in (prompts or [])]})
        return compute_prompts(self, *args, **kwargs)

    discover, discover_original = pair(VAECache, "discover_unprocessed_files")

    def discover_unprocessed_files(self):
        theirs = list(discover_original(self))
        ours = discover(self)
        _seam_emit({"seam": "discover", "dataset": self.id, "original": theirs, "patched": list(ours),
                    "served_images": served_list(self.id)})
        return ours

    reduce, reduce_original = pair(VAECache, "_reduce_bucket")

    def _reduce_bucket(self, bucket, aspect_bucket_cache, processed_images):
        theirs = reduce_original(self, bucket, aspect_bucket_cache, processed_images)
        shortcut = trainer_cache.cached_images(self.id) is not None and not self.local_unprocessed_files
        ours = reduce(self, bucket, aspect_bucket_cache, processed_images)
        _seam_emit({"seam": "reduce", "dataset": self.id, "bucket": str(bucket),
                    "files": list(aspect_bucket_cache[bucket]), "unprocessed": list(self.local_unprocessed_files),
                    "shortcut": shortcut, "original": list(theirs), "patched": list(ours)})
        return ours

    build_map, build_map_original = pair(VAECache, "build_vae_cache_filename_map")

    def build_vae_cache_filename_map(self, all_image_files):
        files = list(all_image_files)
        build_map_original(self, list(files))
        theirs = dict(self.image_path_to_vae_path), dict(self.vae_path_to_image_path)
        result = build_map(self, all_image_files)
        _seam_emit({"seam": "map", "dataset": self.id, "files": files, "served_images": served_list(self.id),
                    "original": theirs, "patched": (dict(self.image_path_to_vae_path),
                                                    dict(self.vae_path_to_image_path))})
        self.image_path_to_vae_path = _SeamWatchedMap(self.image_path_to_vae_path, self.id, "image_path_to_vae_path")
        self.vae_path_to_image_path = _SeamWatchedMap(self.vae_path_to_image_path, self.id, "vae_path_to_image_path")
        return result

    list_files, list_files_original = pair(LocalDataBackend, "list_files")

    def grouped(listing):
        merged = {}
        for root, _, files in listing:
            merged.setdefault(root, []).extend(files)
        return {root: sorted(files) for root, files in merged.items()}

    def list_files_recorded(self, file_extensions, instance_data_dir):
        theirs = list_files_original(self, file_extensions, instance_data_dir)
        cached = trainer_cache.coverage().datasets.get(self.id)
        waiting = cached is not None and cached.listed is not None
        ours = list_files(self, file_extensions, instance_data_dir)
        _seam_emit({"seam": "D7", "dataset": self.id, "dir": str(instance_data_dir),
                    "extensions": sorted(file_extensions or []),
                    "from_scan": waiting and cached.listed is None, "original": grouped(theirs),
                    "patched": grouped(ours)})
        return ours

    ensure_metadata, _ = pair(MetadataBackend, "_ensure_metadata_for_cached_buckets")

    def ensure_metadata_recorded(self):
        buckets = self.aspect_ratio_bucket_indices or {}
        bucketed = sorted(set().union(*buckets.values())) if buckets else []
        missing = [path for path in bucketed if self.get_metadata_by_filepath(path) is None]  # SimpleTuner's lookup
        shortcut = trainer_cache.has_every_bucketed_metadata(self.id, self.image_metadata, buckets)
        _seam_emit({"seam": "D9", "dataset": self.id, "bucketed": len(bucketed), "missing": missing,
                    "shortcut": shortcut})
        return ensure_metadata(self)

    from simpletuner.helpers.metadata.backends.discovery import DiscoveryMetadataBackend
    from simpletuner.helpers.training.state_tracker import StateTracker

    answers = {}  # what the D10 judges answered in the latest call, by name

    def spied(name):
        judge = getattr(trainer_cache, name)

        def answer(*args):
            answers[name] = judge(*args)
            return answers[name]

        setattr(trainer_cache, name, answer)

    spied("finds_nothing_new")
    spied("misses_nothing")
    discover_new, discover_new_original = pair(DiscoveryMetadataBackend, "_discover_new_files")

    def discover_new_recorded(self, for_metadata=False, ignore_existing_cache=False):
        answers.pop("finds_nothing_new", None)
        ours = list(discover_new(self, for_metadata, ignore_existing_cache))
        shortcut = answers.get("finds_nothing_new") is True
        # SimpleTuner's own discovery, on the listing the patched call kept (D7's oracle judges the listing itself)
        theirs = list(discover_new_original(self, for_metadata, ignore_existing_cache))
        listed = StateTracker.get_image_files(data_backend_id=self.data_backend.id) or {}
        _seam_emit({"seam": "D10_discover", "dataset": self.id, "shortcut": shortcut, "listed": sorted(listed),
                    "original": sorted(theirs), "patched": sorted(ours)})
        return ours

    update, update_original = pair(MetadataBackend, "update_buckets_with_existing_files")

    def update_recorded(self, existing_files):
        def state():
            with open(self.cache_file, "rb") as saved:
                return {str(b): list(p) for b, p in self.aspect_ratio_bucket_indices.items()}, saved.read().decode()

        before = {bucket: list(paths) for bucket, paths in self.aspect_ratio_bucket_indices.items()}
        answers.pop("misses_nothing", None)
        update(self, existing_files)
        ours = state()
        shortcut = answers.get("misses_nothing") is True
        self.aspect_ratio_bucket_indices = {bucket: list(paths) for bucket, paths in before.items()}
        update_original(self, existing_files)
        theirs = state()
        _seam_emit({"seam": "D10_update", "dataset": self.id, "shortcut": shortcut, "before": before,
                    "original": theirs[0], "patched": ours[0], "same_file": theirs[1] == ours[1]})

    DiscoveryMetadataBackend._discover_new_files = discover_new_recorded
    MetadataBackend.update_buckets_with_existing_files = update_recorded
    MetadataBackend._ensure_metadata_for_cached_buckets = ensure_metadata_recorded
    LocalDataBackend.list_files = list_files_recorded
    FactoryRegistry._process_text_embeddings = process_text_embeddings
    TextEmbeddingCache.compute_embeddings_for_prompts = compute_embeddings_for_prompts
    VAECache.discover_unprocessed_files = discover_unprocessed_files
    VAECache._reduce_bucket = _reduce_bucket
    VAECache.build_vae_cache_filename_map = build_vae_cache_filename_map
    _seam_emit({"seam": "armed", "pid": os.getpid()})


def _seam_arm() -> None:
    import importlib.util
    import os
    import sys

    trigger = "simpletuner.helpers.training.trainer"

    class Loader:
        def __init__(self, loader):
            self._loader = loader

        def create_module(self, spec):
            return self._loader.create_module(spec)

        def exec_module(self, module):
            self._loader.exec_module(module)  # the plugin's hook loader: installs the plugin after the body ran
            _seam_instrument()

        def __getattr__(self, name):
            return getattr(self._loader, name)

    class Finder:
        def find_spec(self, fullname, path, target=None):
            if fullname != trigger:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            if spec is not None and spec.loader is not None:
                spec.loader = Loader(spec.loader)
            return spec

    if os.environ.get("LCM_SEAM_RECORD"):
        sys.meta_path.insert(0, Finder())


def write_recorder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    parts = [inspect.getsource(item) for item in (_seam_emit, _SeamWatchedMap, _seam_instrument, _seam_arm)]
    (folder / "sitecustomize.py").write_text(
        '"""Written by tests/integration/test_served_passes_oracle.py."""\n\n\n' + "\n\n".join(parts)
        + "\n\n_seam_arm()\n")
    return folder


# --- the run ----------------------------------------------------------------------------------------------------------


def read_events(folder: Path) -> list[dict]:
    path = folder / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_sdxl_dir):
    """(run folder, the kinds of files per dataset, the trainer's log, the recorded events)."""
    root = tmp_path_factory.mktemp("served-passes")
    folder, kinds = write_run(root / "run", tiny_sdxl_dir)
    record = root / "record"
    record.mkdir()
    env = stock_trainer_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(write_recorder(root / "recorder")), env.get("PYTHONPATH")]))
    env[RECORD_ENV] = str(record)
    log = run_stock_trainer(folder, env)
    return folder, kinds, log, read_events(record)


def of(events: list[dict], seam: str, dataset: str | None = None) -> list[dict]:
    return [e for e in events if e["seam"] == seam and (dataset is None or e.get("dataset") == dataset)]


def served_set(kinds: dict, dataset: str) -> set[str]:
    """The images of `dataset` the build can use, by what the test wrote (SimpleTuner's absolute paths)."""
    return {os.path.abspath(path) for path in kinds[dataset]["usable"]}


def test_the_stock_trainer_trained_two_steps_on_the_plugins_path(run):
    folder, _, log, events = run
    tail = log[-4000:]
    assert "now uses lcm_plugin.simpletuner.distiller.LcmDistiller" in log, tail
    assert SERVED_LINE in log and "datasets 'clean', 'mixed'" in log, tail
    losses = lcm_losses(folder / "output" / "training_metrics.jsonl")
    assert len(losses) >= STEPS and all(math.isfinite(v) and v >= 0 for v in losses.values()), (losses, tail)
    assert (folder / "output" / LORA_FILE).is_file(), tail
    # the recorder ran inside the training interpreter, after the hook installed the plugin, around the saved originals
    assert of(events, "installed") == [{"seam": "installed", "installed": True}], tail
    assert len(of(events, "armed")) == 1
    assert {e["method"]: e["wraps_saved"] for e in of(events, "saved")} == {
        "FactoryRegistry._process_text_embeddings": True, "VAECache.discover_unprocessed_files": True,
        "VAECache._reduce_bucket": True, "VAECache.build_vae_cache_filename_map": True,
        "LocalDataBackend.list_files": True, "MetadataBackend._ensure_metadata_for_cached_buckets": True,
        "DiscoveryMetadataBackend._discover_new_files": True, "MetadataBackend.update_buckets_with_existing_files": True}


def test_the_shards_serve_exactly_the_usable_images(run):
    """The oracle of "served" for the other checks: what the test wrote, not what the plugin says."""
    _, kinds, _, events = run
    for dataset in ("clean", "mixed"):
        (d5,) = of(events, "D5", dataset)
        assert set(d5["served_images"]) == served_set(kinds, dataset), dataset


def test_d5_every_caption_simpletuner_collects_for_a_bucketed_image_is_served(run):
    """D5: where SimpleTuner's own caption pass is skipped, every caption it would have collected for an image in
    its buckets names embeddings the shards hold."""
    _, kinds, _, events = run
    (d5,) = of(events, "D5", "clean")
    assert "captions_error" not in d5 and d5["missing"] == [], d5
    bucketed = {path for paths in d5["buckets"].values() for path in paths}
    assert bucketed == served_set(kinds, "clean"), d5["buckets"]
    captions = [c for c in d5["captions"] if c["image"] in bucketed]
    # SimpleTuner's reading of the caption files: one caption per non-blank line, stripped
    assert sorted(c["caption"] for c in captions) == sorted(
        line.strip() for _, _, text in USABLE for line in text.split("\n") if line.strip())
    unserved = [c for c in captions if not c["served"]]
    assert unserved == [], unserved
    assert d5["serves_every_image"] is True
    assert of(events, "text_pass", "clean") == [], "SimpleTuner's caption pass ran for a dataset the shards serve"
    assert d5["hash_filenames"] is True  # what SimpleTuner's pass leaves behind
    assert d5["buckets_after"] == d5["buckets"]


def test_d5_with_one_unserved_bucketed_image_simpletuners_pass_runs(run):
    """"mixed" buckets the TIFF, which the shards do not hold: serves_every_image is False, SimpleTuner's own pass
    runs and encodes exactly the captions the shards lack (its `.pt` files), and still every caption of a served
    image names embeddings in the shards."""
    folder, kinds, _, events = run
    (d5,) = of(events, "D5", "mixed")
    assert "captions_error" not in d5, d5
    bucketed = {path for paths in d5["buckets"].values() for path in paths}
    assert bucketed == served_set(kinds, "mixed") | {os.path.abspath(p) for p in kinds["mixed"]["tiff"]}
    assert d5["serves_every_image"] is False
    assert [c for c in d5["captions"] if c["image"] in served_set(kinds, "mixed") and not c["served"]] == []
    passes = of(events, "text_pass", "mixed")
    assert len(passes) == 1, passes
    # the pass got every caption (SimpleTuner's own list); D4 lets only the ones the shards lack be encoded
    assert sorted(passes[0]["prompts"]) == sorted(c["caption"] for c in d5["captions"])
    lacking = {Path(c["file"]).name for c in d5["captions"] if not c["served"]}
    tiff_caption = hashlib.md5(TIFF_CAPTION.encode()).hexdigest() + "-sdxl.pt"
    assert tiff_caption in lacking
    assert {p.name for p in (folder / "cache" / "text").glob("*.pt")} == lacking


def test_one_unserved_image_in_simpletuners_buckets_makes_serves_every_image_false(run):
    """serves_every_image on SimpleTuner's recorded buckets of "clean" (served as the test wrote them): True as
    they are, False with one image added that the shards do not hold: an image without a caption file (its path;
    see the module docstring), the corrupt and the too-small PNG, the TIFF."""
    from lcm_plugin import trainer_cache

    _, kinds, _, events = run
    (d5,) = of(events, "D5", "clean")
    served = served_set(kinds, "clean")
    coverage = trainer_cache.coverage()
    saved = dict(coverage.datasets)
    try:
        coverage.datasets["clean"] = trainer_cache.DatasetCache("clean", None, {path: "k" for path in served})
        assert trainer_cache.serves_every_image("clean", d5["buckets"]) is True
        folder = Path(kinds["clean"]["usable"][0]).parent
        for extra in [str(folder / "no-caption.png"), *kinds["mixed"]["unusable"], *kinds["mixed"]["tiff"]]:
            bucket = next(iter(d5["buckets"]))
            buckets = {**d5["buckets"], bucket: [*d5["buckets"][bucket], extra]}
            assert trainer_cache.serves_every_image("clean", buckets) is False, extra
    finally:
        coverage.datasets.clear()
        coverage.datasets.update(saved)


def test_d2_reduce_bucket_answers_as_simpletuners_for_every_bucket(run):
    """D2 `_reduce_bucket`: the patched answer equals the original's on the same VAECache, bucket and arguments;
    "clean" (nothing unprocessed) takes the shortcut for every bucket, "mixed" gives SimpleTuner the TIFF."""
    _, kinds, _, events = run
    reduces = of(events, "reduce")
    assert reduces
    for event in reduces:
        assert event["patched"] == event["original"], event
    clean = of(events, "reduce", "clean")
    assert clean and all(e["shortcut"] and e["original"] == [] for e in clean), clean
    assert {e["bucket"] for e in clean} == set(of(events, "D5", "clean")[0]["buckets"])
    mixed = of(events, "reduce", "mixed")
    assert mixed and not any(e["shortcut"] for e in mixed), mixed
    assert sorted(p for e in mixed for p in e["patched"]) == sorted(kinds["mixed"]["tiff"])


def test_d2_discovery_is_simpletuners_minus_exactly_the_served_images(run):
    _, kinds, _, events = run
    for dataset in ("clean", "mixed"):
        (event,) = of(events, "discover", dataset)
        original, patched = event["original"], event["patched"]
        assert len(patched) == len(set(patched)), patched
        assert set(patched) == set(original) - served_set(kinds, dataset), event
        assert set(original) - set(patched) == served_set(kinds, dataset), event  # every served image was there
    mixed = of(events, "discover", "mixed")[0]
    assert set(mixed["patched"]) == {os.path.abspath(p) for p in kinds["mixed"]["tiff"] + kinds["mixed"]["unusable"]}
    assert of(events, "discover", "clean")[0]["patched"] == []


def test_d2_name_maps_are_simpletuners_restricted_to_unserved_images_and_never_asked_for_a_served_one(run):
    """D2 `build_vae_cache_filename_map`: both maps equal the original's restricted to the images the shards do not
    serve; no served image (nor its `.pt` name) is looked up in them while SimpleTuner caches and trains 2 steps."""
    folder, kinds, _, events = run
    for dataset in ("clean", "mixed"):
        maps = of(events, "map", dataset)
        assert maps, dataset
        served = served_set(kinds, dataset)
        for event in maps:
            (to_pt, to_image), (ours_to_pt, ours_to_image) = event["original"], event["patched"]
            assert set(to_pt) == set(event["files"])  # SimpleTuner maps every listed file
            assert ours_to_pt == {k: v for k, v in to_pt.items() if k not in served}, dataset
            assert ours_to_image == {k: v for k, v in to_image.items() if v not in served}, dataset
        served_names = {event["original"][0][path] for event in maps for path in served}
        lookups = of(events, "map_lookup", dataset)
        asked = [e for e in lookups if e["key"] in served or e["key"] in served_names]
        assert asked == [], asked
    # the maps are really read on this run: SimpleTuner's own VAE cache looked its TIFF latent up
    tiff = os.path.abspath(kinds["mixed"]["tiff"][0])
    tiff_names = {e["original"][0][tiff] for e in of(events, "map", "mixed")}
    assert any(e["key"] in tiff_names | {tiff} for e in of(events, "map_lookup", "mixed"))
    assert [p.name for p in (folder / "cache" / "vae-mixed").rglob("*.pt")] == [Path(n).name for n in tiff_names]
    assert list((folder / "cache" / "vae-clean").rglob("*.pt")) == []


def test_d7_the_scan_answers_simpletuners_listing_of_each_folder_as_its_own_walk_does(run):
    """D7 `LocalDataBackend.list_files`: the first listing of each covered folder (SimpleTuner's discovery) comes
    from the scan, equal to SimpleTuner's own walk run on the same call (hidden folder, TIFF, unusable files and
    all); every other call is SimpleTuner's own."""
    from simpletuner.helpers.training import image_file_extensions

    _, kinds, _, events = run
    for dataset in ("clean", "mixed"):
        listings = of(events, "D7", dataset)
        folder = os.path.dirname(os.path.abspath(kinds[dataset]["usable"][0]))
        from_scan = [e for e in listings if e["from_scan"]]
        assert len(from_scan) == 1, listings
        assert os.path.abspath(from_scan[0]["dir"]) == folder
        assert sorted(from_scan[0]["extensions"]) == sorted(image_file_extensions)
        for event in listings:
            assert event["patched"] == event["original"], event
        files = {path for paths in from_scan[0]["original"].values() for path in paths}
        written = {os.path.abspath(path) for kind in kinds[dataset].values() for path in kind}
        assert files == written, files ^ written


def test_d9_the_metadata_check_is_answered_by_sets_only_when_simpletuners_lookup_misses_nothing(run):
    """D9 `MetadataBackend._ensure_metadata_for_cached_buckets`: the set answer is taken only where SimpleTuner's own
    `get_metadata_by_filepath` finds every bucketed image's metadata, and it is taken on both covered datasets
    (the clean one after a discovery that found nothing new, the mixed one after SimpleTuner processed its TIFF and
    the files the build could not use)."""
    _, _, _, events = run
    for dataset in ("clean", "mixed"):
        checks = of(events, "D9", dataset)
        assert checks, f"{dataset}: SimpleTuner never checked its metadata"
        for event in checks:
            assert not (event["shortcut"] and event["missing"]), event
        assert any(e["shortcut"] and e["bucketed"] for e in checks), checks


def test_d10_the_bucket_refresh_finds_what_simpletuners_own_finds_and_skips_its_sets_only_when_nothing_is_new(run):
    _, kinds, _, events = run
    for dataset in ("clean", "mixed"):
        discovered, updated = of(events, "D10_discover", dataset), of(events, "D10_update", dataset)
        assert len(discovered) == len(updated) == 1, dataset  # one refresh per dataset, on the only rank
        discovered, updated = discovered[0], updated[0]
        assert discovered["patched"] == discovered["original"], dataset
        assert updated["patched"] == updated["original"] and updated["same_file"], dataset
        # the shortcut is taken where every listed image is bucketed, and only there
        bucketed = set().union(*updated["before"].values())
        assert discovered["shortcut"] is updated["shortcut"] is (set(discovered["listed"]) == bucketed), dataset
    clean, mixed = of(events, "D10_discover", "clean")[0], of(events, "D10_discover", "mixed")[0]
    assert clean["shortcut"] and clean["patched"] == [] and set(clean["listed"]) == served_set(kinds, "clean")
    # what the build did not bucket (a TIFF, a corrupt and a too-small PNG) is new to SimpleTuner: its own pass runs
    assert not mixed["shortcut"]
    assert set(mixed["original"]) == {os.path.abspath(p) for p in kinds["mixed"]["tiff"] + kinds["mixed"]["unusable"]}
