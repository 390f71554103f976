"""The sampler for a distilled student: diffusers' LCMScheduler on the grid the student was trained on."""

from __future__ import annotations


def lcm_scheduler(scheduler_config, *, num_ddim_timesteps: int, timestep_scaling: float):
    """LCMScheduler whose skipping grid is the training solver's (`original_inference_steps` =
    num_ddim_timesteps) and whose boundary scalings use the trained `timestep_scaling`.

    scheduler_config: the training noise scheduler's config (betas, prediction_type, num_train_timesteps).
    """
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(
        scheduler_config, original_inference_steps=num_ddim_timesteps, timestep_scaling=timestep_scaling
    )
