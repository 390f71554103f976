"""Train the demo's teachers: a tiny SDXL-architecture pipeline that draws coloured shapes from prompts, and a tiny
SD3 (flow-matching) pipeline that draws the same shapes.

    .venv/bin/python scripts/train_demo_teacher.py [--output python/lcm_plugin/demo/assets/teacher]
    .venv/bin/python scripts/train_demo_teacher.py --family sd3 [--output python/lcm_plugin/demo/assets/flow_teacher]

The shipped SDXL weights (python/lcm_plugin/demo/assets/teacher, 4.8 MB) came from
    scripts/train_demo_teacher.py --device cuda --vae-steps 4000 --unet-steps 15000 --stop-at-step 5000 \
        --batch-size 256 --pool-size 32768
on one H100 in about 4 minutes (torch 2.11, transformers 5.17, diffusers 0.42.1); the same command with
--device cpu runs the same algorithm (all random draws come from seeded CPU generators; results differ
from the GPU's only by floating-point kernels) but takes hours on 2 cores. Three stages, all on freshly rendered images from lcm_plugin.demo.shapes:
1. the AutoencoderKL learns to reconstruct shapes (a random VAE decodes to noise); its
   `scaling_factor` is then set so the scaled latents have unit variance, as SDXL's 0.13025 does;
2. the text encoders stay as initialised (random but fixed): distinct prompts give distinct
   embeddings, which is all the UNet needs to tell "a red circle" from "a blue square";
3. the UNet learns epsilon prediction on SDXL's noise schedule, with SDXL's conditioning (prompt
   embeds from both encoders' penultimate layers, pooled embeds, time_ids) and 10% of captions
   replaced by zero embeddings, the unconditional branch that classifier-free guidance and LCM use.
   The saved UNet is an exponential moving average of the trained one.

The shipped SD3 weights (python/lcm_plugin/demo/assets/flow_teacher) came from
    OMP_NUM_THREADS=2 scripts/train_demo_teacher.py --family sd3 --unet-steps 4000 --batch-size 64 --pool-size 8192 \
        --lr 1e-3
on the 2-core CPU in about 20 minutes. It starts from tiny_flow's SD3 folder (random, fixed CLIP-L, CLIP-G and T5
encoders with the demo's words; SD3's scheduler, shift 3) and the SDXL teacher's trained VAE, whose latents get SD3's
two factors (shift_factor: their mean; scaling_factor: unit variance after the shift). Its MM-DiT (4 joint blocks,
width 96) learns the velocity noise - x0 at logit-normal sigmas moved by the shift, with the same caption dropout and
EMA; T5 reads FLOW_TEACHER_T5_TOKENS (16) tokens.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lcm_plugin import tiny_flow, tiny_sdxl
from lcm_plugin.demo import config as demo_config
from lcm_plugin.demo import shapes

SEED = 0
VAE_KL_WEIGHT = 1e-6
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.999


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(vae, *, steps: int, batch_size: int, lr: float, pool_size: int, device: str, log) -> None:
    images, _ = shapes.sample_images(pool_size, seed=10_000)
    pool = to_model_range(images)
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    vae.train()
    for step in range(steps):
        x = pool[torch.randint(0, pool_size, (batch_size,), generator=generator)].to(device)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, x) + 0.5 * F.l1_loss(reconstruction, x) + VAE_KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def set_latent_factors(vae, *, count: int, device: str, shift: bool) -> tuple[float, float]:
    """Set `scaling_factor` (and with `shift`, SD3's `shift_factor`: the latents' mean) so that the diffusion sees
    unit-variance latents, as SDXL's 0.13025 and SD3's (0.0609, 1.5305) do; returns (shift, scale)."""
    images, _ = shapes.sample_images(count, seed=20_000)
    latents = vae.encode(to_model_range(images).to(device)).latent_dist.sample()
    shift_factor = float(latents.mean()) if shift else 0.0
    scaling_factor = float(1.0 / (latents - shift_factor).std())
    vae.register_to_config(scaling_factor=scaling_factor, **({"shift_factor": shift_factor} if shift else {}))
    return shift_factor, scaling_factor


@torch.no_grad()
def encode_prompts(pipeline, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditioning of shapes.PROMPTS exactly as the diffusers pipeline (SDXL's or SD3's) computes it: prompt
    embeddings [P, tokens, width] and pooled embeddings [P, width]."""
    prompt_embeds, _, pooled, _ = pipeline.encode_prompt(list(shapes.PROMPTS), do_classifier_free_guidance=False,
                                                         **options)
    return prompt_embeds, pooled


@torch.no_grad()
def encode_pool(vae, *, count: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior mean and std [count, 4, 8, 8] of `count` random images, and their prompt indices."""
    images, prompts = shapes.sample_images(count, seed=seed)
    means, stds = [], []
    for start in range(0, count, 256):
        dist = vae.encode(to_model_range(images[start : start + 256]).to(device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    index = torch.tensor([shapes.PROMPTS.index(p) for p in prompts], device=device)
    return torch.cat(means), torch.cat(stds), index


def train_denoiser(network, batch_loss, *, vae, prompts, latent_factors, steps, stop_at, batch_size, lr, pool_size, device,
                   save, log):
    """AdamW with warm-up and cosine decay on `batch_loss(latents, text, text_pooled, generator)`, latents drawn from
    the posteriors of `pool_size` rendered images as (sample - shift) * scale (`latent_factors`), the conditioning
    of their prompts (`prompts`: embeddings and pooled embeddings of shapes.PROMPTS), 10 % of captions replaced by
    zero embeddings; returns the exponential moving average of `network`."""
    ema = copy.deepcopy(network).requires_grad_(False)
    means, stds, prompt_index = encode_pool(vae, count=pool_size, seed=30_000, device=device)
    prompt_embeds, pooled = prompts
    shift, scale = latent_factors
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=0.0)
    warmup = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    generator = torch.Generator().manual_seed(SEED)
    network.train()
    for step in range(steps):
        # Random draws come from one CPU generator whatever the device, so runs differ only by kernels.
        pick = torch.randint(0, pool_size, (batch_size,), generator=generator).to(device)
        sample = means[pick] + stds[pick] * torch.randn(means[pick].shape, generator=generator).to(device)
        keep = (torch.rand(batch_size, generator=generator) >= CAPTION_DROPOUT).float().to(device)
        text = prompt_embeds[prompt_index[pick]] * keep[:, None, None]
        text_pooled = pooled[prompt_index[pick]] * keep[:, None]
        loss = batch_loss((sample - shift) * scale, text, text_pooled, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_p, p in zip(ema.parameters(), network.parameters()):
                ema_p.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step}/{steps} loss {loss.item():.4f}")
        if (step + 1) % 2500 == 0 or step == steps - 1 or step + 1 == stop_at:
            save(ema)
        if step + 1 == stop_at:
            break
    return ema.eval()


def epsilon_loss(unet, noise_scheduler, device):
    """SDXL's training loss: epsilon prediction on its DDPM schedule with SDXL's added conditioning."""
    size = shapes.IMAGE_SIZE
    # SDXL time_ids: (original h, w, crop top, left, target h, w); the dataset is uncropped 64x64.
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=device)

    def loss(latents, text, text_pooled, generator):
        batch_size = len(latents)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,),
                                  generator=generator).to(device)
        prediction = unet(
            noise_scheduler.add_noise(latents, noise, timesteps),
            timesteps,
            encoder_hidden_states=text,
            added_cond_kwargs={"text_embeds": text_pooled, "time_ids": time_ids.expand(batch_size, -1)},
        ).sample
        return F.mse_loss(prediction, noise)

    return loss


def flow_loss(transformer, shift: float, device):
    """SD3's training loss: the velocity noise - x0 at x_t = (1 - sigma) x0 + sigma noise, sigma logit-normal (the
    SD3 paper's default) moved by the schedule's shift, as the teacher's sampler moves its grid."""

    def loss(latents, text, text_pooled, generator):
        noise = torch.randn(latents.shape, generator=generator).to(device)
        sigma = torch.sigmoid(torch.randn(len(latents), generator=generator)).to(device)
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
        column = sigma[:, None, None, None]
        prediction = transformer(hidden_states=(1 - column) * latents + column * noise, timestep=sigma * 1000,
                                 encoder_hidden_states=text, pooled_projections=text_pooled).sample
        return F.mse_loss(prediction, noise - latents)

    return loss


def flow_transformer_config(latent_channels: int) -> dict:
    """The SD3 teacher's MM-DiT: 4 joint blocks of width 96 (6 heads of 16) on 2x2 patches of the 8x8 latents, with
    tiny_flow's SD3 text encoders (joint_attention_dim: T5's width; pooled: both CLIP projections)."""
    heads, head_dim = 6, 16
    return dict(
        sample_size=shapes.IMAGE_SIZE // 8, patch_size=2, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=4, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=tiny_flow.SD3_T5_D_MODEL, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=tiny_flow.SD3_CLIP_L_HIDDEN + tiny_flow.SD3_CLIP_G_HIDDEN, pos_embed_max_size=32,
        qk_norm="rms_norm",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("sdxl", "sd3"), default="sdxl")
    parser.add_argument("--output", type=Path, help="default: the demo's assets/teacher (sdxl) or assets/flow_teacher")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=4000, help="steps of the UNet (sdxl) or transformer (sd3)")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="end training after this step (the learning-rate schedule still spans --unet-steps)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pool-size", type=int, default=8192, help="distinct images rendered for training")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    output = args.output or (demo_config.TEACHER if args.family == "sdxl" else demo_config.FLOW_TEACHER)

    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.0f}s] {message}", flush=True)

    torch.manual_seed(SEED)
    schedule = dict(steps=args.unet_steps, stop_at=args.stop_at_step, batch_size=args.batch_size, lr=args.lr,
                    pool_size=args.pool_size, device=args.device, log=log)
    if args.family == "sd3":
        train_flow_teacher(output, schedule, log)
        return

    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    with tempfile.TemporaryDirectory() as scratch:
        components = tiny_sdxl.build_components(SEED, vocabulary=shapes.VOCABULARY, tokenizer_dir=Path(scratch))
        vae, unet = components["vae"], components["unet"]
        for module in (components["text_encoder"], components["text_encoder_2"]):
            module.requires_grad_(False).eval()
        pipeline = StableDiffusionXLPipeline(**components).to(args.device)
        train_vae(vae, steps=args.vae_steps, batch_size=args.batch_size // 2, lr=args.lr, pool_size=args.pool_size,
                  device=args.device, log=log)
        vae.requires_grad_(False)
        factors = set_latent_factors(vae, count=512, device=args.device, shift=False)
        log(f"vae scaling_factor {factors[1]:.4f}")

        def save(ema_unet) -> None:
            on_cpu = {name: copy.deepcopy(part).to("cpu") if isinstance(part, torch.nn.Module) else part
                      for name, part in {**components, "unet": ema_unet}.items()}
            StableDiffusionXLPipeline(**on_cpu).save_pretrained(str(output))
            # transformers 5 saves only tokenizer.json; SimpleTuner's loaders also want vocab.json/merges.txt.
            for name in ("tokenizer", "tokenizer_2"):
                tiny_sdxl.write_clip_tokenizer(output / name, shapes.VOCABULARY)
            log(f"saved to {output}")

        noise_scheduler = DDPMScheduler.from_config(tiny_sdxl.SDXL_SCHEDULER_CONFIG)
        train_denoiser(unet, epsilon_loss(unet, noise_scheduler, args.device), vae=vae,
                       prompts=encode_prompts(pipeline), latent_factors=factors, save=save, **schedule)


def train_flow_teacher(output: Path, schedule: dict, log) -> None:
    """The SD3 teacher: tiny_flow's SD3 folder (its random text encoders, tokenizers with the demo's words and SD3's
    scheduler, shift 3), the SDXL teacher's trained VAE with SD3's latent shift and scale, and a trained MM-DiT."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    device = schedule["device"]
    tiny_flow.save_tiny_sd3(output, SEED, vocabulary=shapes.VOCABULARY)
    vae = AutoencoderKL.from_pretrained(str(demo_config.TEACHER / "vae")).to(device).requires_grad_(False)
    factors = set_latent_factors(vae, count=512, device=device, shift=True)
    log(f"vae shift_factor {factors[0]:.4f}, scaling_factor {factors[1]:.4f}")
    transformer = SD3Transformer2DModel(**flow_transformer_config(vae.config.latent_channels)).to(device)
    pipeline = StableDiffusion3Pipeline.from_pretrained(str(output), transformer=transformer, vae=vae).to(device)
    prompts = encode_prompts(pipeline, prompt_2=None, prompt_3=None,
                             max_sequence_length=demo_config.FLOW_TEACHER_T5_TOKENS)

    def save(ema_transformer) -> None:
        copy.deepcopy(ema_transformer).to("cpu").save_pretrained(str(output / "transformer"))
        copy.deepcopy(vae).to("cpu").save_pretrained(str(output / "vae"))
        log(f"saved to {output}")

    train_denoiser(transformer, flow_loss(transformer, pipeline.scheduler.config.shift, device), vae=vae,
                   prompts=prompts, latent_factors=factors, save=save, **schedule)


if __name__ == "__main__":
    main()
