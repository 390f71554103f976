"""The data-path patches of lcm_plugin.simpletuner.install (D1-D4) on SimpleTuner's real classes: installed and
undone, served reads replace SimpleTuner's, everything not served goes to SimpleTuner's own method unchanged."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lcm_plugin import trainer_cache
from lcm_plugin.cache import LatentCacheReader, LatentCacheWriter
from lcm_plugin.simpletuner import data_path_patches
from lcm_plugin.simpletuner import install as installer


def simpletuner_surfaces():
    from simpletuner.helpers.caching.text_embeds import TextEmbeddingCache
    from simpletuner.helpers.caching.vae import VAECache
    from simpletuner.helpers.training import collate
    from simpletuner.helpers.training import trainer as trainer_module

    return {
        "configure": (trainer_module, "configure_multi_databackend"),
        "compute_latents": (collate, "compute_latents"),
        "discover": (VAECache, "discover_unprocessed_files"),
        "retrieve": (VAECache, "retrieve_from_cache"),
        "load_text": (TextEmbeddingCache, "load_from_cache"),
        "compute_prompts": (TextEmbeddingCache, "compute_embeddings_for_prompts"),
        "dropout": (TextEmbeddingCache, "encode_dropout_caption"),
    }


def current() -> dict:
    return {name: vars(owner)[attr] for name, (owner, attr) in simpletuner_surfaces().items()}


@pytest.fixture(scope="module")
def pristine():
    installer.install()  # importing the trainer may fire the .pth hook; start from a known state
    installer.uninstall()
    yield current()
    installer.uninstall()


@pytest.fixture
def installed(pristine):
    installer.install()
    yield pristine
    installer.uninstall()
    trainer_cache.reset()


def test_every_surface_is_patched_and_restored(pristine):
    installer.install()
    patched = current()
    assert all(patched[name] is not pristine[name] for name in pristine)
    assert all(patched[name].__wrapped__ is pristine[name] for name in pristine)
    installer.install()
    assert current() == patched  # idempotent
    installer.uninstall()
    assert current() == pristine


@pytest.fixture
def served(installed, tmp_path):
    """Dataset "photos" (one image, a.png, served) and text cache folder `text` holding "red circle"."""
    latent = torch.randn(4, 8, 8).to(torch.bfloat16)
    with LatentCacheWriter(tmp_path / "vae-store") as writer:
        writer.put("a.png@d", latent)
    md5 = hashlib.md5(b"red circle").hexdigest()
    embeds, pooled = torch.randn(77, 16), torch.randn(8)
    with LatentCacheWriter(tmp_path / "text-store") as writer:
        writer.put(f"{md5}@t/prompt_embeds", embeds)
        writer.put(f"{md5}@t/pooled_prompt_embeds", pooled)
    coverage = trainer_cache.coverage()
    image = os.path.abspath(tmp_path / "data" / "a.png")
    coverage.datasets["photos"] = trainer_cache.DatasetCache("photos", LatentCacheReader(tmp_path / "vae-store"),
                                                            {image: "a.png@d"})
    text_dir = str(tmp_path / "text")
    coverage.texts[os.path.abspath(text_dir)] = trainer_cache.TextCache(LatentCacheReader(tmp_path / "text-store"),
                                                                        "t", "sdxl")
    return SimpleNamespace(image=image, latent=latent, md5=md5, embeds=embeds, pooled=pooled, text_dir=text_dir,
                           tmp=tmp_path)


def vae_cache(dataset_id: str):
    """A VAECache without its constructor: only what the patched methods read."""
    from simpletuner.helpers.caching.vae import VAECache

    cache = object.__new__(VAECache)
    cache.id = dataset_id
    return cache


def text_cache(cache_dir: str):
    from simpletuner.helpers.caching.text_embeds import TextEmbeddingCache
    from simpletuner.helpers.models.common import TextEmbedCacheKey

    cache = object.__new__(TextEmbeddingCache)
    cache.cache_dir = cache_dir
    cache.model_type = "sdxl"
    cache.key_type = TextEmbedCacheKey.CAPTION
    cache._requires_path_based_keys = False
    cache.model = SimpleNamespace(unpack_text_embeddings_from_cache=lambda value: {**value, "unpacked": True})
    cache.batch_write_thread = SimpleNamespace(is_alive=lambda: False)  # read by its __del__
    return cache


def test_latents_are_gathered_from_the_shards_and_the_rest_goes_to_simpletuner(served, monkeypatch):
    from simpletuner.helpers.training import collate

    batch = collate.compute_latents([served.image, served.image], "photos", None)
    assert len(batch) == 2 and all(torch.equal(latent, served.latent) for latent in batch)
    assert torch.equal(vae_cache("photos").retrieve_from_cache(served.image), served.latent)

    calls = []
    monkeypatch.setattr(type(vae_cache("x")), "encode_images",
                        lambda self, images, paths: calls.append(paths) or ["from simpletuner"])
    assert vae_cache("photos").retrieve_from_cache(str(served.tmp / "data" / "new.png")) == "from simpletuner"
    assert vae_cache("other").retrieve_from_cache(served.image) == "from simpletuner"
    assert calls == [[str(served.tmp / "data" / "new.png")], [served.image]]


def test_discovery_leaves_out_the_images_the_shards_hold(served):
    new = str(served.tmp / "data" / "new.png")
    fake_original = lambda self: [served.image, new]  # noqa: E731 - what SimpleTuner would list without .pt files
    patched = data_path_patches._discover_unserved(fake_original)
    covered = vae_cache("photos")
    assert patched(covered) == [new] and covered.local_unprocessed_files == [new]
    assert patched(vae_cache("other")) == [served.image, new]


def test_text_embeddings_are_read_from_the_shards_as_simpletuners_file_holds_them(served):
    cache = text_cache(served.text_dir)
    value = cache.load_from_cache(os.path.join(served.text_dir, f"{served.md5}-sdxl.pt"))
    assert value["unpacked"] and torch.equal(value["prompt_embeds"], served.embeds[None])
    assert torch.equal(value["pooled_prompt_embeds"], served.pooled)

    loaded = []
    cache.data_backend = SimpleNamespace(torch_load=lambda name: loaded.append(name) or {"prompt_embeds": "pt"})
    other = os.path.join(served.text_dir, f"{hashlib.md5(b'blue').hexdigest()}-sdxl.pt")
    assert cache.load_from_cache(other)["prompt_embeds"] == "pt" and loaded == [other]


def test_start_up_caching_encodes_only_captions_the_shards_lack(served):
    seen = []

    def original(self, all_prompts, return_concat=True, is_validation=False, load_from_cache=True,
                 is_negative_prompt=False, progress_callback=None, split_between_processes=True):
        seen.append(([record["prompt"] for record in all_prompts], return_concat))
        return "encoded"

    patched = data_path_patches._unserved_prompts_only(original)
    cache = text_cache(served.text_dir)
    records = [{"prompt": caption, "key": caption, "metadata": {}} for caption in ("red circle", "blue square")]
    assert patched(cache, records, return_concat=False, load_from_cache=False) == "encoded"
    assert seen == [(["blue square"], False)]
    assert patched(cache, records[:1], return_concat=False) is None and len(seen) == 1  # nothing left to encode
    assert patched(cache, records, return_concat=True) == "encoded"  # reads go through load_from_cache
    assert seen[-1] == (["red circle", "blue square"], True)
    assert patched(text_cache(str(served.tmp / "elsewhere")), records, return_concat=False) == "encoded"


def test_the_dropout_caption_is_encoded_only_when_the_shards_lack_it(served, tmp_path):
    calls = []
    patched = data_path_patches._dropout_unless_served(lambda self: calls.append(self.cache_dir))
    with LatentCacheWriter(tmp_path / "store-with-dropout") as writer:
        empty = hashlib.md5(b"").hexdigest()
        writer.put(f"{empty}@t/prompt_embeds", torch.zeros(77, 16))
        writer.put(f"{empty}@t/pooled_prompt_embeds", torch.zeros(8))
    with_dropout = str(tmp_path / "text-with-dropout")
    trainer_cache.coverage().texts[os.path.abspath(with_dropout)] = trainer_cache.TextCache(
        LatentCacheReader(tmp_path / "store-with-dropout"), "t", "sdxl")
    patched(text_cache(with_dropout))
    assert calls == []
    patched(text_cache(served.text_dir))  # served, but without "": SimpleTuner encodes it
    assert calls == [served.text_dir]


@pytest.mark.parametrize("switch, lcm_run, frozen", [("", True, True), ("simpletuner", True, False), ("", False, False),
                                                     ("rust", False, True)])
def test_the_heap_is_frozen_while_our_path_prepares_the_datasets(monkeypatch, switch, lcm_run, frozen):
    """D1 freezes the heap that exists when the datasets are configured (the models, SimpleTuner's state) so the
    collections that per-image allocations trigger skip it; SimpleTuner's own path runs as without the plugin."""
    import gc

    gc.unfreeze()  # the interpreter starts with a few objects in the permanent generation
    seen = {}

    def original_configure(args, accelerator, text_encoders, tokenizers, model):
        seen["frozen during configure"] = gc.get_freeze_count() > 0

    monkeypatch.setenv(trainer_cache.SWITCH, switch)
    monkeypatch.setattr(data_path_patches, "_prepare_data_path",
                        lambda *args: seen.setdefault("frozen during prepare", gc.get_freeze_count() > 0))
    args = SimpleNamespace(distillation_method="lcm" if lcm_run else None)
    accelerator = SimpleNamespace(is_main_process=False)
    data_path_patches._building_configure(original_configure)(args, accelerator, [], [], None)
    assert seen == {"frozen during prepare": frozen, "frozen during configure": frozen}
    assert gc.get_freeze_count() == 0


def test_simpletuner_gets_the_bucket_metadata_the_build_wrote_as_it_would_parse_it(tmp_path, installed):
    """D6: `load_image_metadata` on a covered dataset takes the dicts the build wrote, equal to what parsing the file
    gives, once; a file rewritten since (another stamp) is parsed as SimpleTuner parses it."""
    import json

    from simpletuner.helpers.metadata.backends.discovery import DiscoveryMetadataBackend

    from lcm_plugin.cache_build.simpletuner_format import bucket_files, write_bucket_metadata
    from planned_folder import planned_folder

    names = {"0.png": (96, 64), 'a "quoted" name.png': (64, 64), "café ü.png": (96, 64), "sub/3.png": (64, 64),
             "tab\there.png": (64, 64), "z.png": (64, 64)}
    dataset = planned_folder(tmp_path, names)
    items = list(dataset.images)
    failed = dataset.images.positions_of([str(tmp_path / "data" / "z.png")])
    written = write_bucket_metadata(dataset, failed)
    metadata_file = Path(written.name)
    assert written.metadata == json.loads(metadata_file.read_text())
    assert metadata_file.read_text() == json.dumps(written.metadata)  # SimpleTuner's own encoding of the same dicts
    assert len({id(image) for image in written.metadata.values()}) == len(names) - 1  # each image's own dict
    assert set(written.metadata) == {item.path for item in items} - {str(tmp_path / "data" / "z.png")}
    quoted = next(item for item in items if item.key.startswith("a "))
    assert written.metadata[quoted.path]["original_size"] == [64, 64] and written.metadata[quoted.path]["aspect_ratio"] == 1.0
    indices = json.loads(bucket_files(dataset)[0].read_text())
    assert indices["config"] == {} and bucket_files(dataset)[0].read_text() == json.dumps(indices)
    buckets = list(dict.fromkeys(item.sample["bucket"] for item in items))  # in order of first appearance
    assert len(buckets) == 2 and indices["aspect_ratio_bucket_indices"] == {
        bucket: [item.path for item in items if item.sample["bucket"] == bucket and item.key != "z.png"]
        for bucket in buckets
    }
    # D10 knows the index file as written: its buckets' sizes, and whether SimpleTuner's buckets are what it holds
    index = written.index
    assert index.sizes == {bucket: len(paths) for bucket, paths in indices["aspect_ratio_bucket_indices"].items()}
    assert index.is_loaded_in(str(bucket_files(dataset)[0]), indices["aspect_ratio_bucket_indices"])
    shorter = {bucket: paths[1:] for bucket, paths in indices["aspect_ratio_bucket_indices"].items()}
    assert not index.is_loaded_in(str(bucket_files(dataset)[0]), shorter)
    assert not index.is_loaded_in(str(metadata_file), indices["aspect_ratio_bucket_indices"])
    index_file = bucket_files(dataset)[0]
    os.utime(index_file, ns=(index_file.stat().st_atime_ns, index_file.stat().st_mtime_ns + 1))  # rewritten since
    assert not index.is_loaded_in(str(index_file), indices["aspect_ratio_bucket_indices"])

    def backend() -> DiscoveryMetadataBackend:
        fake = object.__new__(DiscoveryMetadataBackend)
        fake.id, fake.metadata_file = "photos", metadata_file
        fake.data_backend = SimpleNamespace(exists=os.path.exists, read=lambda path: open(path, "rb").read())
        return fake

    trainer_cache._coverage.datasets["photos"] = trainer_cache.DatasetCache("photos", None, {}, written)
    handed = backend()
    handed.load_image_metadata()
    assert handed.image_metadata is written.metadata and handed.image_metadata_loaded
    parsed = backend()
    parsed.load_image_metadata()  # once only: the next load parses the file
    assert parsed.image_metadata == written.metadata and parsed.image_metadata is not written.metadata

    trainer_cache._coverage.datasets["photos"] = trainer_cache.DatasetCache("photos", None, {}, written)
    metadata_file.write_text(json.dumps({"other.png": {}}))  # rewritten by someone else since
    rewritten = backend()
    rewritten.load_image_metadata()
    assert rewritten.image_metadata == {"other.png": {}}
