"""Captions of the flow families on the data path (issue 21 item 5), without a trainer: the trainer's SimpleTuner model
encodes each caption (`data_path_patches.model_caption_encoding`), the build stores every tensor of the dict it returns
(`fill.put_model_encoded`) and the patched `load_from_cache` hands SimpleTuner that dict back
(`trainer_cache.text_embeddings`). tests/integration/test_flow_families.py judges the same path against SimpleTuner's
own cache files in the stock trainer."""

from __future__ import annotations

import hashlib
import os
from types import SimpleNamespace

import pytest
import torch

from lcm_plugin import trainer_cache
from lcm_plugin.cache import LatentCacheReader, LatentCacheWriter
from lcm_plugin.cache_build.build import BuildReport
from lcm_plugin.cache_build.fill import put_model_encoded
from lcm_plugin.cache_build.plan import BuildError
from lcm_plugin.simpletuner.data_path_patches import model_caption_encoding

CAPTIONS = ["red circle", "", "blue square"]


def flux_entry(caption: str) -> dict:
    """What Flux._format_text_embedding returns for one caption: float embeddings, float text ids, integer masks."""
    seed = int(hashlib.md5(caption.encode()).hexdigest()[:8], 16)
    generator = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(1, 12, 8, generator=generator),
            "pooled_prompt_embeds": torch.randn(6, generator=generator).to(torch.bfloat16),
            "time_ids": torch.zeros(12, 3), "attention_masks": torch.ones(1, 12, dtype=torch.int64)}


def prints(family: str) -> SimpleNamespace:
    from lcm_plugin.cache_build.layout import TEXT_PARTS

    return SimpleNamespace(text_digest="textdigest", text_parts=TEXT_PARTS[family], family=family)


def test_a_flux_caption_comes_back_as_the_dict_its_model_encoded(tmp_path):
    report = BuildReport()
    with LatentCacheWriter(tmp_path / "store") as writer:
        put_model_encoded(writer, CAPTIONS, flux_entry, prints("flux"), report)
    assert report.captions == len(CAPTIONS)
    text_dir = tmp_path / "text-cache"
    trainer_cache.reset()
    trainer_cache.coverage().texts[os.path.abspath(text_dir)] = trainer_cache.TextCache(
        LatentCacheReader(tmp_path / "store"), "textdigest", "flux")
    try:
        for caption in CAPTIONS:
            name = f"{hashlib.md5(caption.encode()).hexdigest()}-flux.pt"  # TextEmbeddingCache.create_hash
            served, expected = trainer_cache.text_embeddings(str(text_dir), name), flux_entry(caption)
            assert sorted(served) == sorted(expected)
            for key, value in expected.items():  # batch axes, dtypes and values as the model's dict has them
                assert served[key].dtype == value.dtype and torch.equal(served[key], value), (caption, key)
        # an SD3 file of the same caption is another model's: not served from a Flux store
        assert not trainer_cache.has_text_embeddings(str(text_dir), f"{hashlib.md5(b'red circle').hexdigest()}-sd3.pt")
    finally:
        trainer_cache.reset()


@pytest.mark.parametrize("encoded", [
    {"prompt_embeds": torch.zeros(1, 4, 8)},  # a part missing
    {**flux_entry("x"), "extra": torch.zeros(1)},  # a part this path does not know
    {**flux_entry("x"), "attention_masks": None},  # not a tensor
    (torch.zeros(1, 4, 8), torch.zeros(6)),  # not a dict
])
def test_a_dict_that_is_not_the_familys_stops_the_build_and_stores_nothing(tmp_path, encoded):
    with LatentCacheWriter(tmp_path / "store") as writer:
        with pytest.raises(BuildError, match="SimpleTuner's flux model encodes a caption as") as error:
            put_model_encoded(writer, ["red circle"], lambda caption: encoded, prints("flux"), BuildReport())
    assert "prompt_embeds" in str(error.value)
    assert list(LatentCacheReader(tmp_path / "store").keys()) == []


class Model:
    """The SimpleTuner model surfaces model_caption_encoding calls (ModelFoundation's), recording the calls."""

    TEXT_ENCODER_CONFIGURATION = {"text_encoder": {"subfolder": "text_encoder"},
                                  "text_encoder_2": {"subfolder": "text_encoder", "path": "someone/encoder-repo"}}

    def __init__(self, image_context=False, namespace=None):
        self.calls, self.image_context, self.namespace = [], image_context, namespace

    def encode_text_batch(self, prompts, is_negative_prompt=False, prompt_contexts=None):
        self.calls.append(("encode", list(prompts), is_negative_prompt, prompt_contexts))
        return {"prompt_embeds": torch.ones(1, 2, 3)}

    def pack_text_embeddings_for_cache(self, embeddings):
        self.calls.append(("pack", sorted(embeddings)))
        return {**embeddings, "packed": torch.zeros(1)}

    def requires_text_embed_image_context(self):
        return self.image_context

    def requires_text_embed_resolution_context(self):
        return False

    def text_embed_cache_namespace(self):
        return self.namespace


CONFIG = SimpleNamespace(model_family="flux", t5_padding="zero", tokenizer_max_length=512,
                         text_encoder_1_precision="no_change", text_encoder_2_precision="int8-quanto")


def test_a_caption_is_encoded_as_simpletuners_text_cache_encodes_one_and_its_settings_are_recorded():
    model = Model()
    encode, options = model_caption_encoding(model, CONFIG)
    assert sorted(encode("red circle")) == ["packed", "prompt_embeds"]
    # one prompt per call, no negative prompt, an empty context; then the cache's packing of the result
    assert model.calls == [("encode", ["red circle"], False, [{}]), ("pack", ["prompt_embeds"])]
    options = dict(options)
    assert options["encoded_by"].startswith("simpletuner 4.") and options["encoded_by"].endswith(" Model")
    assert (options["t5_padding"], options["tokenizer_max_length"]) == ("zero", 512)
    assert options["text_encoder_paths"] == ("someone/encoder-repo",)
    assert options["text_encoder_precisions"] == ("no_change", "int8-quanto")


@pytest.mark.parametrize(("model", "family"), [
    (Model(), "sdxl"),  # encoded by the build itself
    (Model(image_context=True), "flux"),  # needs per-image context the build does not pass
    (Model(namespace="json-schema:x"), "flux"),  # its cache files live in another namespace
    (None, "flux"),
])
def test_no_model_encoding_where_the_build_would_not_reproduce_simpletuners(model, family):
    assert model_caption_encoding(model, SimpleNamespace(**{**vars(CONFIG), "model_family": family})) == (None, ())
