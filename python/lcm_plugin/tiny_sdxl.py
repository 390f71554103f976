"""A tiny SDXL-architecture pipeline built from configs, fully offline.

Same component layout as stabilityai/stable-diffusion-xl-base-1.0 (two CLIP text encoders, the
second with a projection; a text_time UNet; a 4-block AutoencoderKL so latents are 1/8 of the
image; SDXL's scheduler config), at about 5 MB. Used by the demo, the tests and the benchmarks,
which must never reach a model hub.
"""

from __future__ import annotations

import json
from pathlib import Path

# SDXL base 1.0's scheduler/scheduler_config.json (the keys that matter to training and sampling).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

TEXT_HIDDEN_SIZE = 32
POOLED_DIM = 32
ADDITION_TIME_EMBED_DIM = 8
MAX_TOKENS = 77

_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's byte-level alphabet: printable bytes map to themselves, the rest to code points >= 256.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_clip_tokenizer(folder: Path, words: tuple[str, ...] = (), *, pad_token: str = _SPECIAL_TOKENS[1]) -> Path:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, configs) that transformers 4 and 5 load.

    The vocabulary is the 256 byte symbols, their end-of-word forms, the special tokens, and whole
    `words` built by left-to-right merges, so those words are single tokens. pad_token: OpenAI's CLIP
    pads with <|endoftext|>, OpenCLIP's (SD 2.x) with "!".
    """
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in sorted(set(words)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append(f"{symbols[0]} {symbols[1]}")
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            if symbols[0] not in vocab:
                vocab.append(symbols[0])
    vocab.extend(_SPECIAL_TOKENS)
    vocab_index = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    merges = list(dict.fromkeys(merges))
    (folder / "vocab.json").write_text(json.dumps(vocab_index))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": _SPECIAL_TOKENS[0], "eos_token": _SPECIAL_TOKENS[1],
                    "unk_token": _SPECIAL_TOKENS[1], "pad_token": pad_token})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS,
                    "bos_token": _SPECIAL_TOKENS[0], "eos_token": _SPECIAL_TOKENS[1],
                    "unk_token": _SPECIAL_TOKENS[1], "pad_token": pad_token,
                    "do_lower_case": True})
    )
    return folder


# The tiny UNet's layout, shared by every family (tiny_sd.py too): 8x8 latents, two levels, one attention level.
TINY_UNET_LAYOUT = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)


def unet_config(*, time_cond_proj_dim: int | None = None) -> dict:
    """UNet2DConditionModel config with SDXL's conditioning (text_time added embeddings)."""
    return dict(
        **TINY_UNET_LAYOUT,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        # SDXL's add-embedding input: 6 time ids, each embedded to ADDITION_TIME_EMBED_DIM, + pooled text.
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + POOLED_DIM,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def clip_text_config(tokenizer, *, hidden_act: str = "gelu", **architecture):
    """CLIPTextConfig of the tiny text encoders (hidden TEXT_HIDDEN_SIZE, projection POOLED_DIM, 77 positions).

    hidden_act: "quick_gelu" as OpenAI's CLIP-L (SD 1.x), "gelu" as OpenCLIP's encoders (SD 2.x, SDXL).
    architecture: sizes that replace the tiny ones (real_sdxl.py passes SDXL's published encoders).
    """
    from transformers import CLIPTextConfig

    sizes = dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=POOLED_DIM,
    )
    return CLIPTextConfig(
        **{**sizes, **architecture},
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act=hidden_act,
    )


def tiny_vae(latent_channels: int = 4, **options):
    """A 4-block AutoencoderKL (latents 1/8 of the image), 4 latent channels as every SD family's VAE; `options` are
    AutoencoderKL's (the flow families' 16-channel VAEs drop the quant convs and set their own factors)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        **options,
    )


def build_components(seed: int = 0, *, vocabulary: tuple[str, ...] = (), tokenizer_dir: Path):
    """Randomly initialised components of a tiny SDXL pipeline, deterministic in `seed`."""
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    write_clip_tokenizer(tokenizer_dir, vocabulary)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    text_config = clip_text_config(tokenizer)
    torch.manual_seed(seed)
    components = {
        "unet": UNet2DConditionModel(**unet_config()),
        "vae": tiny_vae(),
        "text_encoder": CLIPTextModel(text_config),
        "text_encoder_2": CLIPTextModelWithProjection(text_config),
        "tokenizer": tokenizer,
        "tokenizer_2": CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
        "scheduler": EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
    }
    return components


def save_tiny_sdxl(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a loadable diffusers SDXL folder (model_index.json + components) to `folder`."""
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    components = build_components(seed, vocabulary=vocabulary, tokenizer_dir=folder / "tokenizer")
    return save_pipeline(StableDiffusionXLPipeline(**components), folder, vocabulary)


def save_pipeline(pipeline, folder: Path, vocabulary: tuple[str, ...], **tokenizer_options) -> Path:
    """pipeline.save_pretrained(folder), plus the BPE files of each CLIP tokenizer: transformers 5 saves only
    tokenizer.json, and 4.x loaders (SimpleTuner's among them) want vocab.json/merges.txt too."""
    pipeline.save_pretrained(str(folder))
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipeline, name, None) is not None:
            write_clip_tokenizer(folder / name, vocabulary, **tokenizer_options)
    return folder
