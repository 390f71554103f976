"""lcm_plugin.real_sdxl's folder: written once, by rename, in the requested dtype, and loadable by diffusers. The
architecture is shrunk here (tiny_sdxl's sizes) so that the test writes kilobytes, not 7 GB; the real sizes are
tests/unit/test_real_sdxl_shapes.py's business."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from lcm_plugin import real_sdxl, tiny_sdxl

TINY_CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=tiny_sdxl.POOLED_DIM)
TINY_VAE = dict(real_sdxl.SDXL_VAE_CONFIG, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8)


@pytest.fixture
def tiny_architecture(monkeypatch):
    monkeypatch.setattr(real_sdxl, "SDXL_UNET_CONFIG", tiny_sdxl.unet_config())
    monkeypatch.setattr(real_sdxl, "CLIP_L_ARCHITECTURE", dict(TINY_CLIP, hidden_act="quick_gelu"))
    monkeypatch.setattr(real_sdxl, "CLIP_BIGG_ARCHITECTURE", dict(TINY_CLIP, hidden_act="gelu"))
    monkeypatch.setattr(real_sdxl, "SDXL_VAE_CONFIG", TINY_VAE)


def test_written_once_by_rename_and_loadable_in_its_dtype(tmp_path, tiny_architecture):
    folder = real_sdxl.ensure_real_sdxl("bf16", tmp_path)
    assert folder == tmp_path / "bf16"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bf16"]  # no temporary folder left behind
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    written = weights.stat().st_mtime_ns
    assert real_sdxl.ensure_real_sdxl("bf16", tmp_path) == folder
    assert weights.stat().st_mtime_ns == written

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(folder), dtype=torch.bfloat16)
    assert pipeline.unet.dtype == pipeline.text_encoder_2.dtype == torch.bfloat16
    assert pipeline.vae.config.scaling_factor == 0.13025 and pipeline.vae.config.force_upcast
    assert pipeline.text_encoder.config.vocab_size == 49408
    assert pipeline.tokenizer_2.model_max_length == 77
    # Whole words of the vocabulary are single tokens (plus start and end).
    assert len(pipeline.tokenizer("a photo of a red circle").input_ids) == 2 + 6


def test_an_unknown_dtype_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"real_sdxl: dtype 'bfloat16' is not one of bf16, fp16, fp32"):
        real_sdxl.ensure_real_sdxl("bfloat16", tmp_path)
