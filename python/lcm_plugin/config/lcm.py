"""`distillation_config.lcm`: the one source of truth for the distiller's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationInfo, field_validator

# SDXL's (and SD 1.x/2.x's) DDPM schedule length; pass another with
# `LcmConfig.model_validate(block, context={"num_train_timesteps": T})`.
NUM_TRAIN_TIMESTEPS = 1000


class QualityCheckConfig(BaseModel):
    """The quality check run at each validation of an LCM run (docs/quality.md, "During training")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True,
        description="Measure the student against the teacher at each validation and log lcm_quality/... to the "
        "trackers (training_metrics.jsonl with report_to 'simpletuner'), with a comparison grid beside the "
        "validation images. Runs only when SimpleTuner's validation runs.",
    )
    steps: list[PositiveInt] = Field(
        [1, 2, 4, 8],
        min_length=1,
        description="Step counts at which the student (the distiller's validation scheduler) and the teacher "
        "(DDIM, trailing spacing; Euler on a flow teacher's shifted grid) are sampled. Each must be at most "
        "num_ddim_timesteps.",
        examples=[[1, 2, 4, 8]],
    )
    samples: int = Field(
        48,
        ge=4,
        description="Samples per sampler, cycling through the validation prompts. 48 separates the demo teacher's "
        "DDIM 1, 2 and 4 steps from its 50 steps (docs/quality.md); fewer widen the floor's range.",
        examples=[48],
    )
    reference_steps: int = Field(
        50,
        ge=1,
        description="Steps of the reference sampler (the teacher's many-step samples: DDIM, or Euler on a flow "
        "teacher) and of the floor. "
        "The teacher's sets are sampled once per run, at the first validation, then reused.",
        examples=[50],
    )

    @field_validator("steps")
    @classmethod
    def _steps_are_distinct(cls, steps: list[int]) -> list[int]:
        if len(set(steps)) != len(steps):
            raise ValueError(f"step counts must be distinct, got {steps}")
        return sorted(steps)


class LcmConfig(BaseModel):
    """Latent Consistency Distillation settings (LCM, arXiv 2310.04378; LCM-LoRA, arXiv 2311.05556)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_ddim_timesteps: int = Field(
        50,
        ge=1,
        description="Steps of the DDIM solver grid the teacher walks: one training step moves from t to "
        "t - num_train_timesteps // num_ddim_timesteps. Typical 50-100.",
        examples=[50],
    )
    w_min: float = Field(
        4.0,
        ge=1.0,
        description="Lowest classifier-free guidance scale for the teacher, in SimpleTuner's convention "
        "uncond + s * (cond - uncond). The LCM paper's omega is s - 1: the default 4.0..16.0 is diffusers' "
        "w_min=3, w_max=15.",
        examples=[4.0],
    )
    w_max: float = Field(
        16.0,
        ge=1.0,
        description="Highest teacher guidance scale (same convention as w_min). Each sample draws its scale from "
        "U[w_min, w_max]; w_min == w_max fixes it (the LCM-LoRA report's omega = 7.5 is 8.5).",
        examples=[16.0],
    )
    loss_type: Literal["l2", "huber"] = Field(
        "l2",
        description="Distance between student and target consistency outputs: 'l2' (mean squared error) or "
        "'huber' (pseudo-Huber with huber_c).",
    )
    huber_c: float = Field(
        0.001,
        gt=0.0,
        description="The c of the pseudo-Huber loss sqrt((a - b)^2 + c^2) - c. Used when loss_type is 'huber'.",
        examples=[0.001],
    )
    timestep_scaling_factor: float = Field(
        10.0,
        gt=0.0,
        description="Multiplies the timestep inside the boundary scalings c_skip and c_out (diffusers' "
        "timestep_scaling_factor); also passed to LCMScheduler as timestep_scaling for validation.",
        examples=[10.0],
    )
    ema_decay: float = Field(
        0.95,
        ge=0.0,
        lt=1.0,
        description="EMA decay of the target network, updated after every optimizer step (diffusers' default "
        "0.95): always used by full-model distillation, and by LoRA distillation when lora_target_ema is true.",
        examples=[0.95],
    )
    lora_target_ema: bool = Field(
        False,
        description="LoRA distillation only: evaluate the consistency target with an EMA copy of the LoRA weights "
        "(decay ema_decay, saved with every checkpoint; diffusers PR #6537) instead of the student's own weights "
        "under no_grad, which is LCM-LoRA's reference behaviour (false). Full-model distillation always has an "
        "EMA target network.",
    )
    variant: Literal["lcm", "tcd", "pcm"] = Field(
        "lcm",
        description="Consistency objective. 'lcm': LCM, the student maps x_t to x_0 (boundary scalings c_skip, "
        "c_out); validation samples with LCMScheduler. 'tcd': Trajectory Consistency Distillation (Zheng et al. "
        "2024, arXiv 2402.19159): the student maps x_t to a random earlier solver timestep s <= t_n with the "
        "semi-linear consistency function; validation samples with TCDScheduler at gamma tcd_gamma. 'pcm': "
        "Phased Consistency Models (Wang et al. 2024, arXiv 2405.18407): the solver grid is cut into pcm_phases "
        "phases and the student maps x_t to its phase's lower edge; validation samples deterministically "
        "(TCDScheduler, gamma 0), exactly on the phase edges when validation_num_inference_steps = pcm_phases.",
    )
    tcd_gamma: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="variant 'tcd' only: gamma of TCDScheduler's strategic stochastic sampling for validation "
        "(TCD's default 0.3; 0 is deterministic, 1 re-noises fully like LCMScheduler). Training does not use it.",
        examples=[0.3],
    )
    pcm_phases: int = Field(
        2,
        ge=1,
        description="variant 'pcm' only: number of phases k (PCM's multiphase). A k-step deterministic sampler "
        "visits exactly the phase edges. Must divide num_ddim_timesteps, so that the phase edges are the timesteps "
        "LCMScheduler/TCDScheduler/DDIM (trailing) choose for k steps.",
        examples=[2],
    )

    quality_check: QualityCheckConfig = Field(
        default_factory=QualityCheckConfig,
        validate_default=True,  # the default steps are checked against num_ddim_timesteps too
        description="Student-vs-teacher quality measured at each validation (Fréchet distance with its floor "
        "and interval); {\"enabled\": false} turns it off.",
    )

    @field_validator("quality_check")
    @classmethod
    def _quality_steps_fit_the_solver_grid(cls, quality_check: QualityCheckConfig, info: ValidationInfo):
        num_ddim_timesteps = info.data.get("num_ddim_timesteps")
        too_many = [steps for steps in quality_check.steps if num_ddim_timesteps and steps > num_ddim_timesteps]
        if too_many:
            raise ValueError(
                f"steps {too_many} exceed num_ddim_timesteps ({num_ddim_timesteps}): the student's scheduler "
                "samples on the training solver's grid of that many steps"
            )
        return quality_check

    @field_validator("num_ddim_timesteps")
    @classmethod
    def _solver_grid_fits_the_schedule(cls, num_ddim_timesteps: int, info: ValidationInfo) -> int:
        num_train_timesteps = (info.context or {}).get("num_train_timesteps", NUM_TRAIN_TIMESTEPS)
        if num_ddim_timesteps > num_train_timesteps:
            raise ValueError(
                f"must be at most num_train_timesteps ({num_train_timesteps}): the solver skips "
                f"num_train_timesteps // num_ddim_timesteps steps, which would be 0"
            )
        return num_ddim_timesteps

    @field_validator("pcm_phases")
    @classmethod
    def _phases_split_the_solver_grid(cls, pcm_phases: int, info: ValidationInfo) -> int:
        num_ddim_timesteps = info.data.get("num_ddim_timesteps")
        if info.data.get("variant") == "pcm" and num_ddim_timesteps and num_ddim_timesteps % pcm_phases:
            divisors = [d for d in range(1, num_ddim_timesteps + 1) if num_ddim_timesteps % d == 0]
            raise ValueError(
                f"must divide num_ddim_timesteps ({num_ddim_timesteps}) so that the phase edges are the timesteps a "
                f"{pcm_phases}-step sampler visits; use one of {divisors}, or a num_ddim_timesteps that "
                f"{pcm_phases} divides"
            )
        return pcm_phases

    @field_validator("w_max")
    @classmethod
    def _guidance_range_is_ordered(cls, w_max: float, info: ValidationInfo) -> float:
        w_min = info.data.get("w_min")
        if w_min is not None and w_min > w_max:
            raise ValueError(f"w_min ({w_min}) must be <= w_max ({w_max})")
        return w_max


def settings_at(loc: tuple) -> list[str]:
    """The keys valid where a validation error's `loc` points (its last part is the offending key): LcmConfig's,
    or a nested block's such as quality_check's."""
    model = LcmConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        model = field.annotation
    return list(model.model_fields)
