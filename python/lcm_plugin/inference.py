"""The sampler for a distilled student: LCMScheduler (LCM) or TCDScheduler (TCD, PCM) on the training grid; on the flow
path FlowMatchLCMScheduler (LCM) or Euler through the phase edges (PCM)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lcm_plugin.config import LcmConfig


def lcm_scheduler(scheduler_config, *, num_ddim_timesteps: int, timestep_scaling: float):
    """LCMScheduler whose skipping grid is the training solver's (`original_inference_steps` =
    num_ddim_timesteps) and whose boundary scalings use the trained `timestep_scaling`.

    scheduler_config: the training noise scheduler's config (betas, prediction_type, num_train_timesteps).
    """
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(
        scheduler_config, original_inference_steps=num_ddim_timesteps, timestep_scaling=timestep_scaling
    )


@functools.cache
def _fixed_gamma_tcd_scheduler_class():
    from diffusers import TCDScheduler

    class FixedGammaTCDScheduler(TCDScheduler):
        """TCDScheduler whose steps use the instance's `gamma`; its step takes no `eta`."""

        gamma = 0.3  # TCD's default

        def step(self, model_output, timestep, sample, generator=None, return_dict=True):
            return super().step(
                model_output, timestep, sample, eta=self.gamma, generator=generator, return_dict=return_dict
            )

    return FixedGammaTCDScheduler


def tcd_scheduler(scheduler_config, *, num_ddim_timesteps: int, timestep_scaling: float, gamma: float):
    """TCDScheduler on the training solver's grid whose every step uses `gamma` (TCD's strategic stochastic
    sampling; 0 = deterministic, PCM's sampler). TCD's step does not use `timestep_scaling`; it is set so that the
    saved config records the trained value.

    diffusers' TCDScheduler takes gamma as `step(eta=...)`, and Stable Diffusion pipelines always pass their own
    `eta` argument (default 0.0) to a scheduler whose step accepts one; SimpleTuner's validation never sets it.
    The returned scheduler's step has no `eta` parameter, so the pipeline passes none and `gamma` holds.
    """
    scheduler = _fixed_gamma_tcd_scheduler_class().from_config(
        scheduler_config, original_inference_steps=num_ddim_timesteps, timestep_scaling=timestep_scaling
    )
    scheduler.gamma = gamma
    return scheduler


@functools.cache
def _phased_flow_scheduler_class():
    from diffusers import FlowMatchEulerDiscreteScheduler

    class PhasedFlowMatchEulerScheduler(FlowMatchEulerDiscreteScheduler):
        """FlowMatchEulerDiscreteScheduler whose steps start on the training grid's points `phase_sigmas` picks (the
        phase edges at `pcm_phases` steps), whatever sigmas the pipeline proposes (Flux's pipeline proposes its own
        linspace); each step is Euler, x + (sigma_next - sigma) v, deterministic."""

        num_ddim_timesteps = 50

        def phase_sigmas(self, num_inference_steps: int) -> list[float]:
            """The unshifted sigmas of the sampler's `num_inference_steps` starting points, as
            `set_timesteps(sigmas=...)` takes them: the N-point grid's positions floor(s N / steps), s = 0..steps-1,
            from the top (phase_start_indices); the scheduler's shift (or Flux's mu) then shifts them onto the grid
            FlowSkipSchedule trains on."""
            import numpy as np

            from lcm_plugin.lcm.pcm import phase_start_indices

            unshifted = np.linspace(self.sigma_max, self.sigma_min, self.num_ddim_timesteps)
            positions = phase_start_indices(num_ddim_timesteps=self.num_ddim_timesteps, phases=num_inference_steps)
            return [float(sigma) for sigma in unshifted[positions.numpy()]]

        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
            steps = num_inference_steps or len(sigmas if sigmas is not None else timesteps)
            super().set_timesteps(device=device, sigmas=self.phase_sigmas(steps), mu=mu)

    return PhasedFlowMatchEulerScheduler


def phased_flow_scheduler(scheduler_config, *, num_ddim_timesteps: int):
    """PCM's sampler on the flow path: Euler from the top of the teacher's N-point sigma grid through the phase edges
    (at `pcm_phases` steps; other step counts take the grid points floor(s N / steps) from the top, as the PCM
    reference's SD3 scheduler does), the last step to the data."""
    scheduler = _phased_flow_scheduler_class().from_config(scheduler_config)
    scheduler.num_ddim_timesteps = num_ddim_timesteps
    return scheduler


def is_flow_matching(scheduler_config) -> bool:
    """Whether a training noise scheduler config is a rectified-flow one (diffusers' FlowMatch* schedulers: SD3, Flux)."""
    return str(scheduler_config.get("_class_name", "")).startswith("FlowMatch")


def pipeline_cfg_scale(pipeline_class: type, scale: float) -> float:
    """`scale`, a CFG scale w of uncond + w (cond - uncond) (1: unguided), as `pipeline_class` takes it: one that
    still guides at 1 (its do_classifier_free_guidance, asked at 1) reads its scale g as cond + g (cond - uncond)
    (Krea 2's), which is w - 1 (0: unguided)."""
    from types import SimpleNamespace

    rule = getattr(pipeline_class, "do_classifier_free_guidance", None)
    try:
        offset = isinstance(rule, property) and bool(rule.fget(SimpleNamespace(_guidance_scale=1.0)))
    except AttributeError:  # a rule that reads more of the pipeline first: the usual convention
        offset = False
    return scale - 1.0 if offset else scale


def variant_scheduler(scheduler_config, lcm: LcmConfig):
    """The validation sampler of `lcm.variant`: LCMScheduler (lcm), TCDScheduler at tcd_gamma (tcd), or
    TCDScheduler at gamma 0 (pcm: deterministic jumps, from phase top to phase edge at pcm_phases steps). A flow
    teacher's LCM student samples with FlowMatchLCMScheduler on the teacher's own shifted schedule: x0 = x - sigma v,
    then fresh noise to the next sigma, the flow form of LCM's multistep sampling; its PCM student with Euler steps
    through the phase edges (phased_flow_scheduler)."""
    if is_flow_matching(scheduler_config):
        if lcm.variant == "pcm":
            return phased_flow_scheduler(scheduler_config, num_ddim_timesteps=lcm.num_ddim_timesteps)
        from diffusers import FlowMatchLCMScheduler

        return FlowMatchLCMScheduler.from_config(scheduler_config)
    grid = dict(num_ddim_timesteps=lcm.num_ddim_timesteps, timestep_scaling=lcm.timestep_scaling_factor)
    if lcm.variant == "tcd":
        return tcd_scheduler(scheduler_config, **grid, gamma=lcm.tcd_gamma)
    if lcm.variant == "pcm":
        return tcd_scheduler(scheduler_config, **grid, gamma=0.0)
    return lcm_scheduler(scheduler_config, **grid)


def adds_noise_between_steps(lcm: LcmConfig) -> bool:
    """Whether `variant_scheduler(..., lcm)` draws fresh noise between its steps (LCMScheduler always; TCD at
    gamma > 0), so that its multi-step samples have no paired deterministic endpoint."""
    return lcm.variant == "lcm" or (lcm.variant == "tcd" and lcm.tcd_gamma > 0)
