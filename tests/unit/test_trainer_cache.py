"""The logic of the data path inside `simpletuner train` (lcm_plugin.trainer_cache), without a trainer: the switch,
which datasets fall back and why, and the reads the patched SimpleTuner methods make."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lcm_plugin import trainer_cache
from lcm_plugin.cache import LatentCacheReader, LatentCacheWriter

ARGS = SimpleNamespace(skip_file_discovery="", vae_cache_ondemand=False, vae_cache_disable=False,
                       enable_nsfw_check=False, controlnet=False, crop_style=None)
LOCAL = {"id": "photos", "type": "local", "instance_data_dir": "data"}


@pytest.mark.parametrize(
    ("value", "lcm_run", "mode"),
    [(None, True, "rust"), ("", False, "simpletuner"), ("rust", False, "rust"), (" Rust ", False, "rust"),
     ("simpletuner", True, "simpletuner")],
)
def test_the_switch_selects_the_path(value, lcm_run, mode):
    assert trainer_cache.data_path_mode(value, lcm_run) == mode


def test_an_unknown_switch_value_names_the_variable_and_the_valid_values():
    with pytest.raises(trainer_cache.DataPathSwitchError) as error:
        trainer_cache.data_path_mode("mmap", True)
    message = str(error.value)
    assert "SIMPLETUNER_LCM_DATA_PATH='mmap'" in message and "'rust'" in message and "'simpletuner'" in message


@pytest.mark.parametrize(
    ("change", "args_change", "reason"),
    [
        ({"dataset_type": "video"}, {}, "dataset_type 'video'"),
        ({"dataset_type": "conditioning"}, {}, "dataset_type 'conditioning'"),
        ({"conditioning_data": "edges"}, {}, "conditioning"),
        ({}, {"controlnet": True}, "conditioning"),
        ({"type": "csv"}, {}, "type 'csv'"),
        ({"crop_style": "face"}, {}, "crop_style 'face'"),
        ({}, {"crop_style": "face"}, "crop_style 'face'"),
        ({"vae_cache_ondemand": True}, {}, "vae_cache_ondemand"),
        ({}, {"vae_cache_ondemand": True}, "vae_cache_ondemand"),
        ({"vae_cache_disable": True}, {}, "vae_cache_disable"),
        ({"skip_file_discovery": "vae aspect"}, {}, "skip_file_discovery vae, aspect"),
        ({}, {"skip_file_discovery": "text"}, "skip_file_discovery text"),
        ({"metadata_backend": "huggingface"}, {}, "metadata_backend 'huggingface'"),
        ({"scan_for_errors": True}, {}, "scan_for_errors"),
        ({"caption_filter_list": "filters.txt"}, {}, "caption_filter_list"),
        ({}, {"enable_nsfw_check": True}, "enable_nsfw_check"),
    ],
)
def test_a_dataset_the_path_does_not_cover_gets_its_reason(change, args_change, reason):
    args = SimpleNamespace(**{**vars(ARGS), **args_change})
    assert reason in trainer_cache.uncovered_reason({**LOCAL, **change}, args)


def test_a_plain_local_image_dataset_is_covered():
    assert trainer_cache.uncovered_reason(LOCAL, ARGS) is None
    assert trainer_cache.uncovered_reason({**LOCAL, "type": "aws"}, ARGS) is None  # the bucket is the build's to read
    # the dataset's own setting wins over the run's: on-demand for the run, not for this dataset
    assert trainer_cache.uncovered_reason({**LOCAL, "vae_cache_ondemand": False},
                                          SimpleNamespace(**{**vars(ARGS), "vae_cache_ondemand": True})) is None


@pytest.fixture
def served(tmp_path):
    """A covered dataset of two images and a text store with one caption, registered as `prepare` does."""
    latents = {name: torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
               for i, name in enumerate(("a.png", "sub/b.png"))}
    with LatentCacheWriter(tmp_path / "vae", shard_bytes=1024) as writer:
        for name, latent in latents.items():
            writer.put(f"{name}@digest", latent)
    md5 = hashlib.md5(b"red circle").hexdigest()
    prompt_embeds, pooled = torch.randn(77, 64), torch.randn(32)
    with LatentCacheWriter(tmp_path / "text") as writer:
        writer.put(f"{md5}@textdigest/prompt_embeds", prompt_embeds)
        writer.put(f"{md5}@textdigest/pooled_prompt_embeds", pooled)
    data = tmp_path / "data"
    keys = {os.path.abspath(data / name): f"{name}@digest" for name in latents}
    trainer_cache.reset()
    coverage = trainer_cache.coverage()
    coverage.datasets["photos"] = trainer_cache.DatasetCache("photos", LatentCacheReader(tmp_path / "vae"), keys)
    coverage.texts[os.path.abspath(tmp_path / "text-cache")] = trainer_cache.TextCache(
        LatentCacheReader(tmp_path / "text"), "textdigest", "sdxl")
    yield SimpleNamespace(data=data, latents=latents, md5=md5, prompt_embeds=prompt_embeds, pooled=pooled,
                          text_dir=tmp_path / "text-cache")
    trainer_cache.reset()


def test_a_batch_is_gathered_in_order_and_single_reads_match(served):
    paths = [str(served.data / "sub" / "b.png"), str(served.data / "a.png")]
    batch = trainer_cache.gather_latents("photos", paths)
    assert batch.dtype == torch.bfloat16 and batch.shape == (2, 4, 8, 6)
    assert torch.equal(batch[0], served.latents["sub/b.png"]) and torch.equal(batch[1], served.latents["a.png"])
    # SimpleTuner may hand a path with `..` in it: it names the same image
    single = trainer_cache.latent("photos", str(served.data / "sub" / ".." / "a.png"))
    assert torch.equal(single, served.latents["a.png"])
    assert set(trainer_cache.cached_images("photos")) == {os.path.abspath(p) for p in paths}


def test_what_is_not_served_falls_through(served):
    assert trainer_cache.gather_latents("photos", [str(served.data / "a.png"), str(served.data / "new.png")]) is None
    assert trainer_cache.latent("photos", str(served.data / "new.png")) is None
    assert trainer_cache.gather_latents("other", [str(served.data / "a.png")]) is None
    assert trainer_cache.cached_images("other") is None


def test_text_embeddings_come_back_as_simpletuners_sdxl_cache_file_holds_them(served):
    file_name = str(served.text_dir / f"{served.md5}-sdxl.pt")
    value = trainer_cache.text_embeddings(str(served.text_dir), file_name)
    assert value["prompt_embeds"].shape == (1, 77, 64)  # SimpleTuner's file holds [1, 77, D] and [P]
    assert torch.equal(value["prompt_embeds"][0], served.prompt_embeds)
    assert torch.equal(value["pooled_prompt_embeds"], served.pooled)
    assert trainer_cache.has_text_embeddings(str(served.text_dir), file_name)
    other = hashlib.md5(b"blue square").hexdigest()
    assert trainer_cache.text_embeddings(str(served.text_dir), str(served.text_dir / f"{other}-sdxl.pt")) is None
    # another model's file name, or a folder that is not served
    assert not trainer_cache.has_text_embeddings(str(served.text_dir), str(served.text_dir / f"{served.md5}-flux.pt"))
    assert trainer_cache.text_embeddings("/elsewhere", file_name) is None


def test_sd1x_text_embeddings_come_back_as_simpletuners_sd1x_cache_file_holds_them(tmp_path):
    """SD1x._format_text_embedding keeps {"prompt_embeds"} only, in <md5>-sd1x.pt (create_hash: -<model_family>)."""
    md5 = hashlib.md5(b"red circle").hexdigest()
    prompt_embeds = torch.randn(77, 32)
    with LatentCacheWriter(tmp_path / "text") as writer:
        writer.put(f"{md5}@textdigest/prompt_embeds", prompt_embeds)
    text_dir = tmp_path / "text-cache"
    trainer_cache.reset()
    trainer_cache.coverage().texts[os.path.abspath(text_dir)] = trainer_cache.TextCache(
        LatentCacheReader(tmp_path / "text"), "textdigest", "sd1x")
    try:
        value = trainer_cache.text_embeddings(str(text_dir), str(text_dir / f"{md5}-sd1x.pt"))
        assert set(value) == {"prompt_embeds"} and value["prompt_embeds"].shape == (1, 77, 32)
        assert torch.equal(value["prompt_embeds"][0], prompt_embeds)
        # the SDXL file of the same caption is another model's: not served from an SD 1.x store
        assert not trainer_cache.has_text_embeddings(str(text_dir), str(text_dir / f"{md5}-sdxl.pt"))
    finally:
        trainer_cache.reset()


def test_an_sdxl_store_without_the_pooled_part_does_not_serve_the_caption(tmp_path):
    md5 = hashlib.md5(b"red circle").hexdigest()
    with LatentCacheWriter(tmp_path / "text") as writer:
        writer.put(f"{md5}@textdigest/prompt_embeds", torch.randn(77, 32))
    store = trainer_cache.TextCache(LatentCacheReader(tmp_path / "text"), "textdigest", "sdxl")
    assert store.entry_of(f"{md5}-sdxl.pt") is None


@pytest.mark.parametrize("family", ["sd1", "sd2_v"])
def test_sd1x_prompts_are_encoded_as_the_stable_diffusion_pipeline_encodes_them(tmp_path, family):
    """The reference is diffusers' StableDiffusionPipeline.encode_prompt, which SD1x._encode_prompts calls."""
    from diffusers import StableDiffusionPipeline

    from lcm_plugin.cache_build.encode import encode_prompts
    from lcm_plugin.tiny_sd import save_tiny_sd1, save_tiny_sd2_v

    save = save_tiny_sd1 if family == "sd1" else save_tiny_sd2_v
    folder = save(tmp_path / family, seed=0, vocabulary=("red", "blue", "circle", "square"))
    pipeline = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    prompts = ["red circle", "", "blue square " * 40]  # the last one is truncated at 77 tokens
    expected, _ = pipeline.encode_prompt(prompt=prompts, device=torch.device("cpu"), num_images_per_prompt=1,
                                         do_classifier_free_guidance=False)
    embeds, pooled = encode_prompts([pipeline.tokenizer], [pipeline.text_encoder], prompts, "sd1x")
    assert pooled is None and embeds.shape == expected.shape == (3, 77, pipeline.text_encoder.config.hidden_size)
    assert torch.equal(embeds, expected)


@pytest.mark.parametrize("path", ["webshart://1/5/a.jpg", "cache/webshart/photos/webshart://1/5/a.jpg",
                                  str(Path("/data/webshart://0/12/sub/b.png")), "/data/webshart:/0/3/c.jpg",
                                  "plain.jpg", "webshart:/x"])
def test_a_webshart_sample_is_found_by_simpletuners_name_of_it(path):
    from simpletuner.helpers.data_backend.webshart import WebshartDataBackend

    assert trainer_cache.webshart_sample_id(path) == WebshartDataBackend.normalize_sample_id(path)
