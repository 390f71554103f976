"""A toy LCM distillation whose teacher is exact: the denoiser of a class-conditional Gaussian mixture.

Used by test_lcm_learns.py. Data: each of two classes is a mixture of isotropic Gaussian components in
`dim` dimensions; the unconditional model is the 50/50 mixture of both classes, so classifier-free guidance
is well defined. Under a variance-preserving schedule x_t = alpha_t x0 + sigma_t eps, component k is
N(alpha_t mu_k, v_k I) with v_k = alpha_t^2 s_k^2 + sigma_t^2 and E[eps | x_t, k] = sigma_t (x_t - alpha_t mu_k) / v_k;
the exact epsilon prediction is that expectation weighted by each component's posterior responsibility.

Samplers are diffusers' own DDIMScheduler / LCMScheduler (SDXL's schedule), so only the training step
uses lcm_plugin.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, LCMScheduler

from lcm_plugin.lcm import (
    DDIMSkipSchedule,
    consistency_loss,
    consistency_targets,
    student_consistency_output,
)

# SDXL's noise schedule (stabilityai/stable-diffusion-xl-base-1.0 scheduler config).
SDXL_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
TIMESTEP_SCALING = 10.0
NUM_DDIM_TIMESTEPS = 50


@dataclass(frozen=True)
class GaussianMixtureTeacher:
    """Exact epsilon prediction of a 2-class isotropic Gaussian mixture.

    means: [K, D] component means; stds: [K] component standard deviations; classes: [K] class of each component.
    alphas_cumprod: [T] the noise schedule's alpha_bar table (float64).
    """

    means: torch.Tensor
    stds: torch.Tensor
    classes: torch.Tensor
    alphas_cumprod: torch.Tensor

    @classmethod
    def build(cls, dim: int, alphas_cumprod: torch.Tensor, seed: int = 0) -> GaussianMixtureTeacher:
        """Two modes per class, class 0 at +-1.5 u, class 1 at +-1.5 v (u, v orthonormal, random).

        Every class mean is the origin, as is the unconditional mean: one-step estimates (the posterior mean
        at high noise) collapse to the centre, and only an ODE-following sampler reaches the modes.
        """
        gen = torch.Generator().manual_seed(seed)
        u, v = torch.linalg.qr(torch.randn(dim, 2, generator=gen, dtype=torch.float64))[0].T
        means = 1.5 * torch.stack([u, -u, v, -v])
        return cls(
            means=means,
            stds=torch.tensor([0.3, 0.4, 0.35, 0.25], dtype=torch.float64),
            classes=torch.tensor([0, 0, 1, 1]),
            alphas_cumprod=alphas_cumprod.to(torch.float64),
        )

    def sample_x0(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Clean samples [B, D] of the given classes [B] (equal weight per component within a class)."""
        per_class = [torch.nonzero(self.classes == c).flatten() for c in (0, 1)]
        pick = torch.randint(0, 2, labels.shape, generator=generator)
        component = torch.where(labels == 0, per_class[0][pick], per_class[1][pick])
        noise = torch.randn(labels.shape[0], self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[component] + self.stds[component, None] * noise

    def epsilon(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """E[eps | x_t] for x_t [B, D] at integer timesteps t [B]; class-conditional, unconditional if labels is None."""
        x = x_t.to(torch.float64)
        alpha_bar = self.alphas_cumprod[t][:, None]  # [B, 1]
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        var = alpha_bar * self.stds[None, :] ** 2 + (1 - alpha_bar)  # [B, K]
        diff = x[:, None, :] - alpha[:, :, None] * self.means[None]  # [B, K, D]
        log_p = -0.5 * (diff**2).sum(-1) / var - 0.5 * x.shape[1] * var.log()  # [B, K]
        if labels is not None:
            log_p = log_p.masked_fill(self.classes[None, :] != labels[:, None], -math.inf)
        responsibility = torch.softmax(log_p, dim=1)  # [B, K]
        eps_k = sigma[:, :, None] * diff / var[:, :, None]  # [B, K, D]
        return (responsibility[:, :, None] * eps_k).sum(1).to(x_t.dtype)

    def guided_epsilon(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance_scale: float):
        """uncond + s (cond - uncond), written out here so the reference samplers do not use lcm_plugin."""
        cond, uncond = self.epsilon(x_t, t, labels), self.epsilon(x_t, t, None)
        return uncond + guidance_scale * (cond - uncond)


class ResidualStudent(torch.nn.Module):
    """eps_theta(x, t, c) = teacher's conditional eps + a small MLP whose last layer starts at zero.

    So the student starts as the (unguided) teacher, as an LCM-LoRA student does.
    """

    def __init__(self, teacher: GaussianMixtureTeacher, width: int = 128, num_frequencies: int = 8):
        super().__init__()
        self.teacher = teacher
        dim = teacher.means.shape[1]
        self.register_buffer("frequencies", 2.0 ** torch.arange(num_frequencies, dtype=torch.float32) * math.pi)
        self.class_embedding = torch.nn.Embedding(2, 16)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 2 * num_frequencies + 16, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, dim),
        )
        torch.nn.init.zeros_(self.net[-1].weight)
        torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        phase = (t.float() / 1000.0)[:, None] * self.frequencies[None]
        features = torch.cat([x_t, phase.sin(), phase.cos(), self.class_embedding(labels)], dim=1)
        return self.teacher.epsilon(x_t, t, labels) + self.net(features)


def sdxl_alphas_cumprod() -> torch.Tensor:
    return DDIMScheduler.from_config(SDXL_SCHEDULE).alphas_cumprod.to(torch.float64)


def train_lcm(
    teacher: GaussianMixtureTeacher,
    *,
    guidance_scale: float,
    steps: int,
    batch_size: int = 256,
    target_is_teacher: bool = False,
    ema_decay: float = 0.95,
    lr: float = 1e-3,
    seed: int = 0,
) -> tuple[ResidualStudent, list[float]]:
    """LCM distillation with an EMA target network (LCM Alg. 1); returns the student and its loss curve.

    target_is_teacher reproduces upstream SimpleTuner's bug: the consistency target is computed by the
    teacher (its conditional prediction), not by the target network.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    student = ResidualStudent(teacher)
    target_network = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.Adam(student.net.parameters(), lr=lr)
    schedule = DDIMSkipSchedule.from_alphas_cumprod(teacher.alphas_cumprod, NUM_DDIM_TIMESTEPS).to("cpu", torch.float32)
    scales = torch.full((batch_size,), guidance_scale)
    losses = []
    for _ in range(steps):
        labels = torch.randint(0, 2, (batch_size,), generator=gen)
        latents = teacher.sample_x0(labels, gen).float()
        noise = torch.randn(latents.shape, generator=gen)
        t_n_plus_k, t_n = schedule.sample_step(batch_size, generator=gen)

        def teacher_fn(x, t):
            return teacher.epsilon(x, t, labels), teacher.epsilon(x, t, None)

        def target_fn(x, t):
            return teacher.epsilon(x, t, labels) if target_is_teacher else target_network(x, t, labels)

        prepared = consistency_targets(
            latents=latents, noise=noise, t_n_plus_k=t_n_plus_k, t_n=t_n, guidance_scale=scales,
            schedule=schedule, prediction_type="epsilon", timestep_scaling=TIMESTEP_SCALING,
            teacher=teacher_fn, target_model=target_fn,
        )
        prediction = student_consistency_output(
            student(prepared.x_t, t_n_plus_k, labels), x_t=prepared.x_t, t_n_plus_k=t_n_plus_k,
            schedule=schedule, prediction_type="epsilon", timestep_scaling=TIMESTEP_SCALING,
        )
        loss = consistency_loss(prediction, prepared.target, loss_type="l2", huber_c=0.001)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_target, p_student in zip(target_network.parameters(), student.parameters()):
                p_target.lerp_(p_student, 1 - ema_decay)
        losses.append(loss.item())
    return student, losses


@torch.no_grad()
def teacher_ddim(teacher, x_T, labels, guidance_scale: float, num_steps: int) -> torch.Tensor:
    """Guided deterministic DDIM (eta 0) with "trailing" spacing, by diffusers' DDIMScheduler."""
    scheduler = DDIMScheduler.from_config(SDXL_SCHEDULE, timestep_spacing="trailing")
    scheduler.set_timesteps(num_steps)
    x = x_T
    for t in scheduler.timesteps:
        eps = teacher.guided_epsilon(x, t.repeat(x.shape[0]), labels, guidance_scale)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x


@torch.no_grad()
def student_lcm(student, x_T, labels, num_steps: int, generator: torch.Generator) -> torch.Tensor:
    """LCM multistep sampling (denoise, re-noise to the next timestep), by diffusers' LCMScheduler."""
    scheduler = LCMScheduler.from_config(
        SDXL_SCHEDULE, timestep_scaling=TIMESTEP_SCALING, original_inference_steps=NUM_DDIM_TIMESTEPS
    )
    scheduler.set_timesteps(num_steps)
    x = x_T
    for t in scheduler.timesteps:
        eps = student(x, t.repeat(x.shape[0]), labels)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, *, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between equal-size point sets a, b [N, D]."""
    directions = torch.randn(a.shape[1], num_projections, generator=torch.Generator().manual_seed(seed),
                             dtype=a.dtype)
    directions = directions / directions.norm(dim=0, keepdim=True)
    pa, _ = (a @ directions).sort(dim=0)
    pb, _ = (b @ directions).sort(dim=0)
    return (pa - pb).abs().mean().item()


def classwise_sliced_wasserstein(a, b, labels) -> float:
    """Mean over classes of the sliced Wasserstein distance, samples paired by class label."""
    return sum(sliced_wasserstein(a[labels == c], b[labels == c]) for c in (0, 1)) / 2
