"""Tiny SD 1.x and SD 2.x-style (v-prediction) pipelines built from configs, fully offline.

Same component layout as the real checkpoints (one CLIP text encoder and tokenizer, a UNet without added
embeddings, a 4-block AutoencoderKL, the scheduler config; no safety checker), at the size of the tiny SDXL
(lcm_plugin.tiny_sdxl, whose text encoder, VAE and tokenizer helpers these reuse). What tells the families apart:

    SD 1.x (stable-diffusion-v1-5): OpenAI CLIP-L text encoder (quick_gelu), one head size for every block
        (attention_head_dim 8), convolutional attention projections, PNDM scheduler, epsilon prediction.
    SD 2.x (stable-diffusion-2-1, the 768-v model): OpenCLIP text encoder (gelu, pads with "!"), a head count
        per block (attention_head_dim [5, 10, 20, 20]), linear attention projections, DDIM scheduler,
        v-prediction.
"""

from __future__ import annotations

from pathlib import Path

from lcm_plugin.tiny_sdxl import (
    MAX_TOKENS,
    TEXT_HIDDEN_SIZE,
    TINY_UNET_LAYOUT,
    clip_text_config,
    save_pipeline,
    tiny_vae,
    write_clip_tokenizer,
)

__all__ = ["MAX_TOKENS", "SD1_SCHEDULER_CONFIG", "SD2_V_SCHEDULER_CONFIG", "TEXT_HIDDEN_SIZE", "FAMILIES",
           "save_tiny_sd1", "save_tiny_sd2_v", "unet_config"]

# stable-diffusion-v1-5's scheduler/scheduler_config.json.
SD1_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# stable-diffusion-2-1's (768-v) scheduler/scheduler_config.json.
SD2_V_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

OPENCLIP_PAD_TOKEN = "!"

# family -> (scheduler config, UNet attention layout, text encoder activation, tokenizer pad token)
FAMILIES = {
    "sd1": (SD1_SCHEDULER_CONFIG, {"attention_head_dim": 8, "use_linear_projection": False}, "quick_gelu", None),
    "sd2_v": (
        SD2_V_SCHEDULER_CONFIG, {"attention_head_dim": (2, 4), "use_linear_projection": True}, "gelu",
        OPENCLIP_PAD_TOKEN,
    ),
}


def unet_config(family: str) -> dict:
    """UNet2DConditionModel config of the tiny SD 1.x ("sd1") or SD 2.x-style ("sd2_v") UNet: no added embeddings,
    cross-attention on the single text encoder's hidden states."""
    _, attention, _, _ = FAMILIES[family]
    return dict(**TINY_UNET_LAYOUT, cross_attention_dim=TEXT_HIDDEN_SIZE, **attention)


def _save_tiny_sd(family: str, folder: Path, seed: int, vocabulary: tuple[str, ...]) -> Path:
    import torch
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    scheduler_config, _, hidden_act, pad_token = FAMILIES[family]
    tokenizer_options = {"pad_token": pad_token} if pad_token else {}
    folder = Path(folder)
    write_clip_tokenizer(folder / "tokenizer", vocabulary, **tokenizer_options)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    scheduler_class = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler}[scheduler_config["_class_name"]]
    torch.manual_seed(seed)
    pipeline = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**unet_config(family)),
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(clip_text_config(tokenizer, hidden_act=hidden_act)),
        tokenizer=tokenizer,
        scheduler=scheduler_class.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return save_pipeline(pipeline, folder, vocabulary, **tokenizer_options)


def save_tiny_sd1(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a loadable diffusers SD 1.x folder (epsilon prediction, ~3 MB) to `folder`."""
    return _save_tiny_sd("sd1", folder, seed, vocabulary)


def save_tiny_sd2_v(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a loadable diffusers SD 2.x-style folder (v-prediction, OpenCLIP-style text encoder) to `folder`."""
    return _save_tiny_sd("sd2_v", folder, seed, vocabulary)
