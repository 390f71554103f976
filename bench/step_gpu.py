"""One LCM-LoRA step at SDXL scale on a GPU: our algorithm core vs the diffusers script's step order.

Needs only torch, diffusers and peft (no SimpleTuner: GPU hosts rarely carry it), so "ours" is the
`lcm_plugin.lcm` orchestration the distiller calls (`consistency_targets` with one batched cond+uncond
teacher call, `student_consistency_output`, `consistency_loss`), and the reference is diffusers'
`train_lcm_distill_lora_sdxl.py` step (student, teacher cond, teacher uncond, guided DDIM step, target).
The UNet is SDXL base's architecture with random weights (no hub), bf16, LoRA rank 64. Also prints how far
the bf16 target drifts from the same target computed with float32 schedule math (diffusers promotes).

    python bench/step_gpu.py [--batch-size 4] [--latent-size 128] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig

from lcm_plugin.lcm import (
    DDIMSkipSchedule,
    consistency_loss,
    consistency_targets,
    sample_guidance_scale,
    student_consistency_output,
)
from lcm_plugin.tiny_sdxl import SDXL_SCHEDULER_CONFIG

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--latent-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device, dtype, bsz = torch.device("cuda"), torch.bfloat16, args.batch_size

    torch.manual_seed(0)
    with device:  # initialise on the GPU: 2.6 B parameters are slow to initialise on a CPU
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype)
    unet.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=LORA_TARGETS))
    unet.enable_gradient_checkpointing()
    scheduler = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    schedule = DDIMSkipSchedule.from_alphas_cumprod(scheduler.alphas_cumprod, 50)
    schedule_bf16, schedule_f32 = schedule.to(device, dtype), schedule.to(device, torch.float32)
    alpha_f32 = scheduler.alphas_cumprod.to(device).sqrt()
    sigma_f32 = (1 - scheduler.alphas_cumprod.to(device)).sqrt()

    latents = torch.randn(bsz, 4, args.latent_size, args.latent_size, device=device, dtype=dtype)
    noise = torch.randn_like(latents)
    prompt = torch.randn(bsz, 77, 2048, device=device, dtype=dtype)
    added = {"text_embeds": torch.randn(bsz, 1280, device=device, dtype=dtype),
             "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * bsz, device=device, dtype=dtype)}
    uncond_added = {"text_embeds": torch.zeros_like(added["text_embeds"]), "time_ids": added["time_ids"]}
    both_added = {key: torch.cat([added[key], uncond_added[key]]) for key in added}
    both_prompt = torch.cat([prompt, torch.zeros_like(prompt)])

    def run_unet(x, t, encoder_hidden_states, added_cond_kwargs):
        output = unet(x.to(dtype), t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
        return output.sample.to(x.dtype)

    def teacher_batched(x, t):
        unet.disable_adapters()
        try:
            both = run_unet(torch.cat([x, x]), torch.cat([t, t]), both_prompt, both_added)
        finally:
            unet.enable_adapters()
        return both.chunk(2)

    def our_step(schedule_in=schedule_bf16, latents_in=latents, noise_in=noise, backward=True):
        generator = torch.Generator(device).manual_seed(1)
        t_n_plus_k, t_n = schedule_in.sample_step(bsz, generator=generator)
        guidance = sample_guidance_scale(bsz, w_min=4.0, w_max=16.0, generator=generator)
        targets = consistency_targets(
            latents=latents_in, noise=noise_in, t_n_plus_k=t_n_plus_k, t_n=t_n, guidance_scale=guidance,
            schedule=schedule_in, prediction_type="epsilon", timestep_scaling=10.0, teacher=teacher_batched,
            target_model=lambda x, t: run_unet(x, t, prompt, added),
        )
        if not backward:
            return targets
        output = run_unet(targets.x_t, t_n_plus_k, prompt, added)
        prediction = student_consistency_output(output, x_t=targets.x_t, t_n_plus_k=t_n_plus_k, schedule=schedule_in,
                                                prediction_type="epsilon", timestep_scaling=10.0)
        loss = consistency_loss(prediction, targets.target, loss_type="l2", huber_c=0.001)
        loss.backward()
        return targets

    def reference_step():
        # diffusers' order and arithmetic: float32 schedule tensors promote the bf16 model outputs.
        generator = torch.Generator(device).manual_seed(1)
        index = torch.randint(0, 50, (bsz,), generator=generator, device=device)
        start = (index + 1) * 20 - 1
        end = (start - 20).clamp(min=0)
        w = (15.0 - 3.0) * torch.rand(bsz, device=device) + 3.0
        w = w.reshape(bsz, 1, 1, 1).to(dtype)
        noisy = scheduler.add_noise(latents, noise, start)

        def x0_of(output, t, x):
            return (x - sigma_f32[t].reshape(-1, 1, 1, 1) * output) / alpha_f32[t].reshape(-1, 1, 1, 1)

        def scalings(t):
            scaled = 10.0 * t.float()
            return [v.reshape(-1, 1, 1, 1) for v in (0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5)]

        c_skip_start, c_out_start = scalings(start)
        c_skip, c_out = scalings(end)
        student = run_unet(noisy, start, prompt, added)
        model_pred = c_skip_start * noisy + c_out_start * x0_of(student, start, noisy)
        with torch.no_grad():
            unet.disable_adapters()
            cond = run_unet(noisy, start, prompt, added)
            uncond = run_unet(noisy, start, torch.zeros_like(prompt), uncond_added)
            unet.enable_adapters()
            x0 = x0_of(cond, start, noisy) + w * (x0_of(cond, start, noisy) - x0_of(uncond, start, noisy))
            eps = cond + w * (cond - uncond)
            alpha_end = alpha_f32[end].reshape(-1, 1, 1, 1)
            x_prev = alpha_end * x0 + sigma_f32[end].reshape(-1, 1, 1, 1) * eps
            target_out = run_unet(x_prev.to(dtype), end, prompt, added)
            target = c_skip * x_prev + c_out * x0_of(target_out, end, x_prev)
        torch.nn.functional.mse_loss(model_pred.float(), target.float()).backward()

    timings = {"ours": [], "reference": []}
    peak = {}
    for step in range(args.steps + 2):
        for name, fn in (("ours", our_step), ("reference", reference_step)):
            unet.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_time = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            if step >= 2:
                timings[name].append(time.perf_counter() - start_time)
                peak[name] = torch.cuda.max_memory_allocated() / 2**30

    ours, reference = statistics.median(timings["ours"]), statistics.median(timings["reference"])
    print(f"{torch.cuda.get_device_name()} | SDXL UNet (random weights) bf16 + LoRA r64, gradient checkpointing, "
          f"batch {bsz}x4x{args.latent_size}x{args.latent_size}, {args.steps} steps each")
    print(f"ours (batched teacher):       {ours * 1e3:8.1f} ms/step, peak {peak['ours']:.1f} GiB")
    print(f"reference (diffusers order):  {reference * 1e3:8.1f} ms/step, peak {peak['reference']:.1f} GiB")
    print(f"ratio ours / reference: {ours / reference:.3f}")

    with torch.no_grad():
        in_bf16 = our_step(backward=False)
        in_f32 = our_step(schedule_f32, latents.float(), noise.float(), backward=False)
    dtypes = {name: getattr(in_bf16, name).dtype for name in ("x_t", "x_t_n", "target")}
    drift = (in_bf16.target.float() - in_f32.target).norm() / in_f32.target.norm()
    print(f"dtypes kept: {dtypes}; device {in_bf16.target.device}")
    print(f"bf16 target vs float32 schedule math: relative L2 difference {drift.item():.2e}")


if __name__ == "__main__":
    main()
