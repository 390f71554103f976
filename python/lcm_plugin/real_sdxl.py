"""SDXL base 1.0 at its published size (2.6B-parameter UNet, CLIP ViT-L and bigG, SDXL's VAE), random weights, offline.

The architecture of stabilityai/stable-diffusion-xl-base-1.0, built from its configs and written once, in the
diffusers folder layout, to a cache folder outside the repository (never committed): SimpleTuner loads it as it
loads the hub checkpoint. The tokenizers are tiny_sdxl's locally written CLIP BPE (byte symbols plus a few whole
words, 77 tokens); the text encoders keep CLIP's 49408-row embedding, so the token ids they read are a subset.
For benchmarks and memory measurements at real size; every weight is random, so no output means anything.

    python -m lcm_plugin.real_sdxl [--dtype bf16] [--cache-dir DIR]    # prints the model folder
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lcm_plugin.tiny_sdxl import SDXL_SCHEDULER_CONFIG, clip_text_config, save_pipeline, write_clip_tokenizer

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 (diffusers 0.19), every key that shapes the network;
# the same numbers as Stability's sgm `sd_xl_base.yaml` (model_channels 320, channel_mult [1, 2, 4],
# transformer_depth [1, 2, 10], num_head_channels 64 -> heads [5, 10, 20], context_dim 2048, adm_in_channels 2816).
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,  # CLIP-L's 768 + bigG's 1280 hidden states, concatenated
    use_linear_projection=True,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    # bigG's pooled 1280 + 6 size/crop ids embedded to 256 each.
    projection_class_embeddings_input_dim=2816,
)

# text_encoder/config.json (OpenAI CLIP ViT-L/14's text tower) and text_encoder_2/config.json (OpenCLIP ViT-bigG/14's,
# with its text projection) of stable-diffusion-xl-base-1.0. The special token ids come from our tokenizer instead.
CLIP_L_ARCHITECTURE = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
CLIP_BIGG_ARCHITECTURE = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    projection_dim=1280, hidden_act="gelu", layer_norm_eps=1e-5,
)

# vae/config.json of stable-diffusion-xl-base-1.0: SD's 4-block KL autoencoder with SDXL's scaling factor, which
# the checkpoint asks to run in float32 (force_upcast: its float16 activations overflow).
SDXL_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)

# Words that become single tokens, so that a benchmark's captions tokenize as words rather than bytes.
VOCABULARY = ("a", "photo", "of", "red", "blue", "green", "circle", "square", "triangle")
DTYPES = ("bf16", "fp16", "fp32")
CACHE_ENV = "XDG_CACHE_HOME"


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/simpletuner-lcm/sdxl-real-size, else ~/.cache/simpletuner-lcm/sdxl-real-size."""
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache"
    return Path(base) / "simpletuner-lcm" / "sdxl-real-size"


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"real_sdxl: dtype {name!r} is not one of {', '.join(DTYPES)}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


@contextmanager
def _default_dtype(dtype):
    """Parameters are created in `dtype` directly: the UNet in float32 first would need 10 GB more memory."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_components(*, dtype: str = "bf16", seed: int = 0, tokenizer_dir: Path, device: str = "cpu") -> dict:
    """Randomly initialised components of SDXL base 1.0 (diffusers' and transformers' own initialisers) in `dtype`,
    initialised on `device` (a GPU draws 3.5B random weights far faster than a CPU)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    write_clip_tokenizer(tokenizer_dir, VOCABULARY)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    with _default_dtype(torch_dtype(dtype)), torch.device(device):
        return {
            "unet": UNet2DConditionModel(**SDXL_UNET_CONFIG),
            "vae": AutoencoderKL(**SDXL_VAE_CONFIG),
            "text_encoder": CLIPTextModel(clip_text_config(tokenizer, **CLIP_L_ARCHITECTURE)),
            "text_encoder_2": CLIPTextModelWithProjection(clip_text_config(tokenizer, **CLIP_BIGG_ARCHITECTURE)),
            "tokenizer": tokenizer,
            "tokenizer_2": CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
            "scheduler": EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        }


def real_sdxl_dir(dtype: str = "bf16", cache_dir: Path | None = None) -> Path:
    """Where ensure_real_sdxl keeps the model in `dtype` (one folder per dtype)."""
    torch_dtype(dtype)  # refuses an unknown name
    return Path(cache_dir or default_cache_dir()) / dtype


def ensure_real_sdxl(dtype: str = "bf16", cache_dir: Path | None = None, *, seed: int = 0, device: str = "cpu") -> Path:
    """The model folder, written on first use (about 7 GB in bf16, a minute on 2 cores), else the existing one.

    device: where the random weights are drawn (a GPU is much faster; it draws other numbers from the same seed).

    Written into a temporary folder beside it and renamed into place, so a folder that exists is complete; a
    concurrent writer that loses the race discards its copy.
    """
    from diffusers import StableDiffusionXLPipeline

    folder = real_sdxl_dir(dtype, cache_dir)
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dtype}-writing-", dir=folder.parent))
    scratch.chmod(0o755)  # mkdtemp's 0o700 would outlive the rename
    try:
        components = build_components(dtype=dtype, seed=seed, tokenizer_dir=scratch / "tokenizer", device=device)
        pipeline = StableDiffusionXLPipeline(**components).to("cpu")  # saved from host memory, whatever drew it
        save_pipeline(pipeline, scratch, VOCABULARY)
        del pipeline
        del components
        try:
            scratch.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="weight dtype on disk (default bf16)")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default {default_cache_dir()}")
    args = parser.parse_args(argv)
    print(ensure_real_sdxl(args.dtype, args.cache_dir))


if __name__ == "__main__":
    main()
