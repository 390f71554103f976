"""Torch side of a cache build: the run's VAE and text encoders, and the encodings SimpleTuner caches.

VAE latents follow SimpleTuner 4.10's VAECache.encode_images for SDXL: pixels through the model's transforms
(ToTensor, Normalize(0.5, 0.5)) in the VAE dtype, `vae.encode(...).latent_dist.sample()` (a sample, not the
mode), then VaeLatentScalingMixin.scale_vae_latents_for_cache: `(z - shift_factor) * scaling_factor`, or
`z * scaling_factor` when the VAE has no shift. Text follows SDXL._encode_prompts: each CLIP's penultimate
hidden state, concatenated, and the pooled (projected) output of the last encoder; for SD 1.x/2.x (model_family
sd1x), SD1x._encode_prompts: the one CLIP's last hidden state, no pooled output. SD's VAE is scaled as SDXL's.

One deliberate difference: the noise of each latent sample comes from a generator seeded by (seed, image key),
not from the global RNG, so a latent does not depend on batch order, rank count, or a restart.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import numpy as np
import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_TOKENS = 77  # SDXL._encode_prompts pads and truncates to 77 tokens
# Peak memory of one AutoencoderKL encode, in units of its first activation (block_out_channels[0] x H x W
# elements of the VAE dtype). Measured on CPU (peak RSS, fp32): 5.9 and 5.4 for SDXL's VAE architecture at
# 256x256 and 512x256, 4.7-6.3 for the tiny 4-block VAE at 2048x1024 (the allocator's state moves it); 8 leaves
# room for that spread: refusing an image a little early is cheap, an out-of-memory encode on every start is not.
VAE_PEAK_ACTIVATIONS = 8
# Bytes of a VAE's first activation per CPU encode call (posterior_moments): about what stays in a core's cache.
CPU_ACTIVATION_BUDGET = 8 << 20


# Variables accelerate reads for the world size of a CPU run (PartialState._prepare_backend), first one set wins.
CPU_WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")


def trainer_device(environ: Mapping[str, str], accelerator: str | None, device_count: int) -> torch.device:
    """The device of SimpleTuner's Accelerator in a process started with `environ`, on a host whose accelerator
    type is `accelerator` (None: CPU only) with `device_count` devices. SimpleTuner puts its VAE and text encoders
    there (ModelFoundation.load_vae / load_text_encoder: `.to(self.accelerator.device, ...)`).

    Mirrors accelerate 1.16's AcceleratorState and PartialState: ACCELERATE_TORCH_DEVICE wins; ACCELERATE_USE_CPU
    (`accelerate launch --cpu`) forces the CPU; a process of a distributed launch (LOCAL_RANK set) gets device
    LOCAL_RANK % count of the accelerator (set_device), and with the CPU forced, a distributed run (LOCAL_RANK set
    or a world size above 1) is MULTI_CPU and gets `cpu:0`: not `cpu`, the device SimpleTuner loads on, so it
    converts its VAE there too. Anything else gets default_device: the accelerator, else `cpu`."""
    from accelerate.utils import str_to_bool

    forced = environ.get("ACCELERATE_TORCH_DEVICE")
    if forced:
        return torch.device(forced)
    cpu = str_to_bool(environ.get("ACCELERATE_USE_CPU", "false"), to_bool=True)
    local_rank = int(environ.get("LOCAL_RANK", -1))
    if accelerator is not None and not cpu:
        return torch.device(accelerator, local_rank % device_count) if local_rank != -1 else torch.device(accelerator)
    world = next((int(environ[name]) for name in CPU_WORLD_SIZE_VARIABLES if int(environ.get(name, -1)) >= 0), 1)
    if cpu and (local_rank != -1 or world > 1):
        return torch.device("cpu", 0)
    return torch.device("cpu")


def device() -> torch.device:
    """This process's device, the one SimpleTuner's trainer would get here (trainer_device), for the accelerator
    accelerate finds (its get_torch_accelerator_backend, which PartialState asks too)."""
    from accelerate.utils import get_torch_accelerator_backend

    accelerator, module = get_torch_accelerator_backend()
    return trainer_device(os.environ, accelerator, module.device_count() if module is not None else 0)


def vae_dtype_on(where: torch.device, vae_dtype: str) -> str:
    """The dtype SimpleTuner's VAE encodes in when the trainer's device is `where`, for config.json's `vae_dtype`
    (SimpleTuner's value: "bf16" when the key is absent). ModelFoundation.load_vae loads it without a torch_dtype
    (_get_vae_load_kwargs), so in torch's default fp32 on the CPU, and converts it to bf16 ("bf16", "default",
    "none") or fp32 ("fp32") only when it moves it: when `where` is not that `cpu`. ("fp16", which SimpleTuner
    refuses there, is the caller's to refuse.)"""
    if where == torch.device("cpu"):
        return "fp32"
    return "fp32" if vae_dtype == "fp32" else "bf16"


def weight_dtype(
    mixed_precision: str,
    *,
    model_type: str,
    base_model_precision: str,
    base_model_default_dtype: str,
    quantization_config,
    model_path: str,
) -> str:
    """SimpleTuner's weight_dtype (cmd_args.parse_cmdline_args: bf16 for mixed_precision bf16 or a quantised LoRA
    base with base_model_default_dtype bf16, fp16 for fp16, else fp32), from config.json's values. It does not
    depend on the device or on the launcher's MIXED_PRECISION: that only reaches `accelerate launch
    --mixed_precision`, which the trainer's Accelerator(mixed_precision=config's value) overrides.
    ModelFoundation.load_text_encoder casts the text encoders to it on every device, the CPU included."""
    quantised = base_model_precision != "no_change" or quantization_config is not None or model_path.endswith(".gguf")
    if mixed_precision == "bf16" or (base_model_default_dtype == "bf16" and quantised and "lora" in model_type):
        return "bf16"
    return "fp16" if mixed_precision == "fp16" else "fp32"


def load_vae(vae_path: str, dtype: str):
    """AutoencoderKL from `vae_path`'s `vae` subfolder, else its root, on this process's device in `dtype`
    (vae_dtype_on's answer for it): ModelFoundation.load_vae's fallback, load and conversion."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(vae_path, subfolder="vae")
    except (OSError, ValueError):
        vae = AutoencoderKL.from_pretrained(vae_path)
    return vae.to(device(), dtype=DTYPES[dtype]).eval().requires_grad_(False)


def load_text_encoders(model_path: str, dtype: str) -> tuple[list, list]:
    """SDXL's two tokenizers and text encoders (CLIP-L, then CLIP-G with projection) from `model_path`, on this
    process's device in `dtype` (weight_dtype): loaded and then moved as ModelFoundation.load_text_encoder does."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(model_path, subfolder=sub) for sub in ("tokenizer", "tokenizer_2")]
    encoders = [
        CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder"),
        CLIPTextModelWithProjection.from_pretrained(model_path, subfolder="text_encoder_2"),
    ]
    return tokenizers, [encoder.to(device(), dtype=DTYPES[dtype]).eval().requires_grad_(False) for encoder in encoders]


def free_memory_bytes(where: torch.device) -> int:
    """Memory a new allocation can get on `where`: free GPU memory, else the host's available memory."""
    if where.type == "cuda":
        return torch.cuda.mem_get_info(where)[0]
    import psutil

    return psutil.virtual_memory().available


def first_activation_bytes(vae, width: int, height: int, itemsize: int) -> int:
    """Bytes of the VAE encoder's first activation for one image: the unit of its memory and cache footprint."""
    return vae.config.block_out_channels[0] * width * height * itemsize


def vae_memory_problem(vae, target_size: tuple[int, int]) -> str | None:
    """Why one image of `target_size` (W, H) cannot be VAE-encoded here, or None. SimpleTuner would try, and run
    out of memory on every start: an image of 10x1000 px at pixel resolution 1024 gets a 1024x102400 target."""
    width, height = target_size
    needed = VAE_PEAK_ACTIVATIONS * first_activation_bytes(vae, width, height, vae.dtype.itemsize)
    free = free_memory_bytes(vae.device)
    if needed <= free:
        return None
    return (
        f"its {width}x{height} target needs about {needed / 2**30:.1f} GiB in the VAE and {free / 2**30:.1f} GiB "
        "is free; leave such images out with minimum_aspect_ratio / maximum_aspect_ratio or minimum_image_size"
    )


def sample_seed(seed: int, key: str) -> int:
    """Seed of the latent-sampling noise of image `key`: 63 bits of sha256("{seed}:{key}")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def pixel_values(images: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> [N, 3, H, W] in [-1, 1]: torchvision ToTensor then Normalize([0.5], [0.5])."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32).div(255.0)
    return pixels.sub(0.5).div(0.5).to(dtype)


def posterior_moments(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE posterior of `pixels` [N, 3, H, W] (on the VAE's device).

    On a CPU the encode runs in channels-last layout (oneDNN's NHWC kernels), in chunks whose first activation
    fits CPU_ACTIVATION_BUDGET so that each layer's output stays in cache. Measured per image, one thread, against
    SimpleTuner's single call on 4 images: the tiny SDXL test VAE 2.0 -> 1.7 ms at 64 px, 18.3 -> 12.5 ms at
    256 px, 150 -> 84 ms at 512 px (one image per call); SDXL's VAE architecture 2.78 -> 2.39 s at 256 px;
    latents within 4e-5. Accelerators keep the configured batch.
    """
    if pixels.device.type != "cpu":
        posterior = vae.encode(pixels).latent_dist
        return posterior.mean, posterior.std
    per_image = first_activation_bytes(vae, pixels.shape[3], pixels.shape[2], pixels.element_size())
    chunk = max(1, CPU_ACTIVATION_BUDGET // per_image)
    posteriors = [
        vae.encode(images.contiguous(memory_format=torch.channels_last)).latent_dist for images in pixels.split(chunk)
    ]
    return torch.cat([p.mean for p in posteriors]), torch.cat([p.std for p in posteriors])


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, keys: list[str], seed: int) -> torch.Tensor:
    """Scaled latent samples [N, 4, H/8, W/8] (CPU, VAE dtype) of uint8 images [N, H, W, 3] named `keys`."""
    mean, std = posterior_moments(vae, pixel_values(images, vae.dtype).to(vae.device))
    noise = torch.stack(
        [
            torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(sample_seed(seed, key)),
                        dtype=mean.dtype)
            for key in keys
        ]
    )
    # DiagonalGaussianDistribution.sample with per-image noise.
    latents = mean + std * noise.to(mean.device)
    shift_factor = getattr(vae.config, "shift_factor", None)
    if shift_factor is not None:
        latents = latents - shift_factor
    return (latents * vae.config.scaling_factor).cpu().contiguous()


@torch.no_grad()
def encode_prompts(
    tokenizers: list, encoders: list, prompts: list[str], family: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds [N, 77, D], pooled_prompt_embeds [N, P] or None) of `prompts` as `family` (sdxl, sd1x)
    encodes them, on the CPU in the encoders' dtype.

    One prompt per encoder call, as SimpleTuner's text-embed cache calls them: a batched call changes the last bits
    of the pooled output (different matmul blocking), and the trainer's embeddings must equal SimpleTuner's exactly.
    """
    if family == "sd1x":
        return torch.cat([_encode_prompt_sd1x(tokenizers[0], encoders[0], prompt) for prompt in prompts]), None
    encoded = [_encode_prompt_sdxl(tokenizers, encoders, prompt) for prompt in prompts]
    return torch.cat([hidden for hidden, _ in encoded]), torch.cat([pooled for _, pooled in encoded])


def _encode_prompt_sdxl(tokenizers: list, encoders: list, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders):
        ids = tokenizer(
            [prompt], padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).input_ids
        output = encoder(ids.to(encoder.device), output_hidden_states=True)
        pooled = output[0]  # the projected pooled output of CLIP-G is the one SDXL keeps
        hidden.append(output.hidden_states[-2])
    return torch.cat(hidden, dim=-1).cpu(), pooled.cpu()


def _encode_prompt_sd1x(tokenizer, encoder, prompt: str) -> torch.Tensor:
    """StableDiffusionPipeline.encode_prompt without clip_skip (what SD1x._encode_prompts calls): the last hidden
    state after the final layer norm, padded/truncated to the tokenizer's model_max_length, with the attention
    mask only when the encoder's config asks for it (SD 1.x and 2.x do not)."""
    tokens = tokenizer(
        [prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    mask = tokens.attention_mask.to(encoder.device) if getattr(encoder.config, "use_attention_mask", False) else None
    return encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0].to(encoder.dtype).cpu()
