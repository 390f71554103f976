"""Train the demo's teacher: a tiny SDXL-architecture pipeline that draws coloured shapes from prompts.

    .venv/bin/python scripts/train_demo_teacher.py [--output python/lcm_plugin/demo/assets/teacher]

The shipped weights (python/lcm_plugin/demo/assets/teacher, 4.8 MB) came from
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

from lcm_plugin import tiny_sdxl
from lcm_plugin.demo import shapes

SEED = 0
VAE_KL_WEIGHT = 1e-6
CAPTION_DROPOUT = 0.1
UNET_EMA_DECAY = 0.999


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
def set_latent_scaling(vae, *, count: int, device: str) -> float:
    """Set `scaling_factor` to 1 / std of sampled latents, so the diffusion sees unit-variance latents."""
    images, _ = shapes.sample_images(count, seed=20_000)
    latents = vae.encode(to_model_range(images).to(device)).latent_dist.sample()
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return scaling_factor


@torch.no_grad()
def encode_prompts(pipeline, prompts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning exactly as the diffusers pipeline computes it: ([P, 77, 64], [P, 32])."""
    prompt_embeds, _, pooled, _ = pipeline.encode_prompt(list(prompts), do_classifier_free_guidance=False)
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


def train_unet(unet, *, vae, prompt_embeds, pooled, noise_scheduler, steps, stop_at, batch_size, lr, pool_size, device,
               save, log):
    ema = copy.deepcopy(unet).requires_grad_(False)
    means, stds, prompt_index = encode_pool(vae, count=pool_size, seed=30_000, device=device)
    scaling_factor = vae.config.scaling_factor
    # SDXL time_ids: (original h, w, crop top, left, target h, w); the dataset is uncropped 64x64.
    size = shapes.IMAGE_SIZE
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    generator = torch.Generator().manual_seed(SEED)
    unet.train()
    for step in range(steps):
        # Random draws come from one CPU generator whatever the device, so runs differ only by kernels.
        pick = torch.randint(0, pool_size, (batch_size,), generator=generator).to(device)
        draw = lambda *shape: torch.randn(shape, generator=generator).to(device)  # noqa: E731
        latents = (means[pick] + stds[pick] * draw(*means[pick].shape)) * scaling_factor
        noise = draw(*latents.shape)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        keep = (torch.rand(batch_size, generator=generator) >= CAPTION_DROPOUT).float().to(device)
        text = prompt_embeds[prompt_index[pick]] * keep[:, None, None]
        text_pooled = pooled[prompt_index[pick]] * keep[:, None]
        prediction = unet(
            noisy,
            timesteps,
            encoder_hidden_states=text,
            added_cond_kwargs={"text_embeds": text_pooled, "time_ids": time_ids.expand(batch_size, -1)},
        ).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(UNET_EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_p, p in zip(ema.parameters(), unet.parameters()):
                ema_p.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f}")
        if (step + 1) % 2500 == 0 or step == steps - 1:
            save(ema)
        if step + 1 == stop_at:
            break
    return ema.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("python/lcm_plugin/demo/assets/teacher"))
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="end UNet training after this step (the learning-rate schedule still spans --unet-steps)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pool-size", type=int, default=8192, help="distinct images rendered for training")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.0f}s] {message}", flush=True)

    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as scratch:
        components = tiny_sdxl.build_components(SEED, vocabulary=shapes.VOCABULARY, tokenizer_dir=Path(scratch))
        vae, unet = components["vae"], components["unet"]
        for module in (components["text_encoder"], components["text_encoder_2"]):
            module.requires_grad_(False).eval()
        pipeline = StableDiffusionXLPipeline(**components).to(args.device)
        train_vae(vae, steps=args.vae_steps, batch_size=args.batch_size // 2, lr=2e-3, pool_size=args.pool_size,
                  device=args.device, log=log)
        vae.requires_grad_(False)
        log(f"vae scaling_factor {set_latent_scaling(vae, count=512, device=args.device):.4f}")
        prompt_embeds, pooled = encode_prompts(pipeline, shapes.PROMPTS)
        noise_scheduler = DDPMScheduler.from_config(tiny_sdxl.SDXL_SCHEDULER_CONFIG)

        def save(ema_unet) -> None:
            on_cpu = {name: copy.deepcopy(part).to("cpu") if isinstance(part, torch.nn.Module) else part
                      for name, part in {**components, "unet": ema_unet}.items()}
            StableDiffusionXLPipeline(**on_cpu).save_pretrained(str(args.output))
            # transformers 5 saves only tokenizer.json; SimpleTuner's loaders also want vocab.json/merges.txt.
            for name in ("tokenizer", "tokenizer_2"):
                tiny_sdxl.write_clip_tokenizer(args.output / name, shapes.VOCABULARY)
            log(f"saved to {args.output}")

        train_unet(
            unet, vae=vae, prompt_embeds=prompt_embeds, pooled=pooled, noise_scheduler=noise_scheduler,
            steps=args.unet_steps, stop_at=args.stop_at_step, batch_size=args.batch_size, lr=2e-3, pool_size=args.pool_size,
            device=args.device, save=save, log=log,
        )


if __name__ == "__main__":
    main()
