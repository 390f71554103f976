"""`LcmDistiller`: LCM distillation (LoRA or full model) in SimpleTuner's trainer; glue, the math is lcm_plugin.lcm.

Per training step SimpleTuner calls, in order:
    prepare_batch(batch, model, state)       -> we noise the latents, run teacher + target, store the target
    model.model_predict(batch)               -> the student (UNet, adapters on, with grad) at (x_t, t_n_plus_k)
    compute_distill_loss(batch, output, _)   -> consistency loss between f_theta and the stored target
The step is exact to diffusers' `examples/consistency_distillation/train_lcm_distill_lora_sdxl.py`, with one
deliberate difference in execution: the teacher's cond and uncond predictions come from ONE batched UNet call.

Batch keys read (SimpleTuner's `ModelFoundation.prepare_batch` output):
    latents [B, C, H, W], noise [B, C, H, W], encoder_hidden_states [B, L, D],
    added_cond_kwargs: SDXL {"text_embeds": [B, P], "time_ids": [B, 6]}; SD 1.x/2.x {} (or None)
Batch keys written: noisy_latents (x_t, the student's input), timesteps (t_n_plus_k), lcm_x_t and lcm_target
(x_t and f_target(x_t_n, t_n) in the arithmetic dtype, for the loss), lcm_t_end (where both consistency
functions map to: 0 for LCM, t_m for TCD, the phase edge for PCM).

Variants (`lcm.variant`, math in lcm_plugin.lcm.variants): TCD and PCM change only t_end and the consistency
function; the draw, the teacher step, the target network and the loss are LCM's. TCD follows Zheng et al. 2024
(arXiv 2402.19159, its semi-linear f and t_m uniform below t_n); PCM follows the reference
G-U-N/Phased-Consistency-Model `train_pcm_lora_sd15.py` (`ddim_style_multiphase_pred`, its online/target
boundary scalings), with the noise estimate derived per prediction type rather than read as epsilon.

Arithmetic dtype: the LCM arithmetic runs in the latents' dtype promoted to at least float32, as in diffusers'
script (whose float32 alpha/sigma tables promote bf16 model outputs); UNet inputs keep the latents' dtype, and
nothing is ever float64. Doing the arithmetic in bf16 instead moves SDXL-scale targets by ~5% (relative L2,
bench/step_gpu.py on an H100): x0 = (x_t - sigma_t eps) / alpha_t cancels badly at large t.

Flow-matching teachers (FLOW_FAMILIES, variants lcm and pcm; `flow_refusal` names what else is refused): the same
three calls on the rectified-flow path (lcm_plugin.lcm.flow): x_t at a grid sigma of the teacher's own shifted
schedule, one guided Euler step of the teacher, f = x + (sigma_end - sigma) v for student and target (LCM: sigma_end
0; PCM: the lower edge of the step's phase). Every network call goes through SimpleTuner's own
forward (`model_predict`) on a copy of the batch, so the family's input packing stays SimpleTuner's.

Full-model distillation (model_type "full") follows diffusers' `train_lcm_distill_sdxl_wds.py` in its networks:
a frozen copy of the pretrained UNet is the teacher and a separate target network tracks the student by EMA
(`ema_decay`, updated once per optimizer step, saved with every checkpoint), kept in float32 and run under
autocast to the student's dtype, as diffusers keeps and runs its `target_unet`. Deliberate deviation: no
guidance-scale embedding (`timestep_cond`), because SimpleTuner's own student forward cannot pass one; the
student learns the guidance range w_min..w_max averaged, as LCM-LoRA does. The reason (docs/config.md, "No
guidance-scale embedding"): SimpleTuner's `_model_predict_single` (SDXL, SD 1.x) calls the UNet with a fixed
argument list whose only per-batch extra is FlowMap's `r_timestep`, and the pretrained UNet has no
`time_cond_proj_dim` layer to receive w, so it would have to be rebuilt before SimpleTuner loads it.

LoRA with `lora_target_ema` (diffusers PR #6537, `--use_target_model`): the target is the UNet with an EMA copy
of the LoRA weights, updated once per optimizer step with `ema_decay` and saved with every checkpoint. The EMA
weights are copied into the adapters for the target's one forward call and copied back before the student's.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from simpletuner.helpers.distillation.common import DistillationBase

from lcm_plugin.config import LcmConfig
from lcm_plugin.config.families import FLOW_FAMILIES, flow_refusal
from lcm_plugin.lcm import (
    DDIMSkipSchedule,
    FlowSkipSchedule,
    consistency_loss,
    consistency_targets,
    end_timesteps,
    flow_consistency_function,
    flow_noise,
    flow_phase_edge_sigmas,
    flow_solver_step,
    sample_guidance_scale,
    student_consistency_output,
)

LCM_TARGET_KEY = "lcm_target"
LCM_X_T_KEY = "lcm_x_t"
LCM_T_END_KEY = "lcm_t_end"
LCM_SIGMA_KEY = "lcm_sigma"  # flow families: sigma_n_plus_k, where the student's consistency function starts
LCM_SIGMA_END_KEY = "lcm_sigma_end"  # flow families: where it maps to (None: the data, LCM; PCM: the phase edge)
# Batch entries that carry the prompt, zeroed for the unconditional branch of a flow teacher (SD3's joint
# CLIP + T5 states and pooled CLIP embedding), as the ε-families' uncond gets zero prompt embeddings.
# "prompt_embeds" is the text-embed cache's entry that SimpleTuner's ModelFoundation.prepare_batch copies to the
# device as "encoder_hidden_states": the same prompt states in every family; Chroma's and Lumina 2's model_predict
# read it instead of "encoder_hidden_states".
# Attention masks ("encoder_attention_mask") are never zeroed: the uncond rows keep their cond rows' masks.
FLOW_PROMPT_KEYS = ("encoder_hidden_states", "prompt_embeds", "add_text_embeds")
TARGET_CHECKPOINT_FILE = "lcm_target_unet.safetensors"
TARGET_LORA_CHECKPOINT_FILE = "lcm_target_lora.safetensors"
# added_cond_kwargs entries that carry the prompt: zeroed for the unconditional branch.
POOLED_TEXT_KEYS = ("text_embeds",)


def frozen_copy(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A gradient-free copy with the same weights and device, in `dtype` (default: the module's own)."""
    copied = copy.deepcopy(module).requires_grad_(False)
    return copied if dtype is None else copied.to(dtype)


def sharded_training(accelerator) -> str | None:
    """The sharding a full-model LCM run cannot take, from accelerate's state: FSDP or DeepSpeed ZeRO stage 3; None
    for anything else (one device, DDP, ZeRO 1-2)."""
    state = getattr(accelerator, "state", None)
    if getattr(state, "fsdp_plugin", None) is not None:
        return "FSDP (fsdp_enable)"
    if getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", None) == 3:
        return "DeepSpeed ZeRO stage 3 (deepspeed_config)"
    return None


def target_forward_context(network: torch.nn.Module, unet_dtype: torch.dtype, device: torch.device):
    """Where the fp32 target network runs: under autocast to the student's dtype when that is lower (diffusers'
    full-model script runs its fp32 target_unet so), else as it is."""
    network_dtype = next(network.parameters()).dtype
    if network_dtype == unet_dtype:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=unet_dtype)


@torch.no_grad()
def ema_update(target: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * student, parameter by parameter (diffusers' `update_ema`)."""
    ema_update_tensors(list(target.parameters()), list(student.parameters()), decay)


@torch.no_grad()
def ema_update_tensors(targets: list[torch.Tensor], sources: list[torch.Tensor], decay: float) -> None:
    """targets[i] <- decay * targets[i] + (1 - decay) * sources[i], in the targets' dtype."""
    torch._foreach_lerp_(targets, [p.detach().to(t.dtype) for t, p in zip(targets, sources)], 1.0 - decay)


def unconditional_added_cond_kwargs(added_cond_kwargs: dict) -> dict:
    """The teacher's unconditional extra inputs: a zero pooled text embedding where the family has one (SDXL's
    `text_embeds`), every other entry (SDXL's `time_ids`) unchanged; SD 1.x/2.x have none (diffusers' LCM scripts)."""
    return {
        key: torch.zeros_like(value) if key in POOLED_TEXT_KEYS else value for key, value in added_cond_kwargs.items()
    }


class LcmDistiller(DistillationBase):
    """LCM distillation of SimpleTuner's trained UNet.

    LoRA (full_model False): teacher = the UNet with adapters disabled, student and target = the UNet with
        adapters on (LCM-LoRA). Full model: teacher = frozen copy of the pretrained UNet, target = EMA copy.
    teacher_model: SimpleTuner's model object (ImageModelFoundation); its trained component is the UNet
        (PEFT-wrapped for LoRA). noise_scheduler: the DDPM-family training scheduler (alphas_cumprod, config).
    """

    def __init__(
        self, teacher_model, student_model=None, *, noise_scheduler, config: LcmConfig, full_model: bool = False
    ):
        super().__init__(teacher_model, student_model, config.model_dump())
        if self.is_flow_matching:
            model_config = getattr(teacher_model, "config", None)
            refusal = flow_refusal(config, lambda name: getattr(model_config, name, None))
            if refusal:
                raise ValueError(refusal)
        if student_model is not None:
            raise ValueError("LcmDistiller trains SimpleTuner's own model: pass no separate student_model")
        self.lcm_config = config
        self.noise_scheduler = noise_scheduler
        if "_class_name" not in noise_scheduler.config and hasattr(noise_scheduler, "register_to_config"):
            # A scheduler SimpleTuner builds in code (Qwen-Image's) has no `_class_name` in its config, which one
            # loaded from a folder has; the validation sampler, the quality check and the LoRA metadata tell a flow
            # schedule by that name (inference.is_flow_matching). Recorded as a loaded one records it.
            noise_scheduler.register_to_config(_class_name=type(noise_scheduler).__name__)
        # The ε / v families' parameterisation (a flow teacher predicts the velocity; its config has no such key).
        self.prediction_type = None if self.is_flow_matching else noise_scheduler.config.prediction_type
        # float64 tables; per-step copies in the arithmetic dtype/device are cached in _schedules. A flow teacher's
        # grid is its own shifted sigma schedule (FlowSkipSchedule, one per latent size under dynamic shifting).
        self.schedule = None if self.is_flow_matching else DDIMSkipSchedule.from_alphas_cumprod(
            noise_scheduler.alphas_cumprod, config.num_ddim_timesteps
        )
        self._schedules: dict[tuple, DDIMSkipSchedule | FlowSkipSchedule] = {}
        # Built here, before SimpleTuner resumes a checkpoint into the student: the teacher stays pretrained.
        self._lora_layers = None  # PEFT layers of the trained UNet, found on first use (LoRA only)
        self.teacher_unet = self.target_unet = None
        if full_model:
            sharding = sharded_training(getattr(teacher_model, "accelerator", None))
            if sharding is not None:
                raise ValueError(
                    f"distillation_method 'lcm' with model_type 'full' cannot run under {sharding}: its teacher and "
                    "target copies of the UNet are made before accelerate shards the model, so they would stay whole "
                    "and unsharded (and ZeRO-3's partitioned weights cannot be averaged into the target). Use "
                    "model_type 'lora', or train without FSDP / ZeRO stage 3."
                )
            unet = teacher_model.get_trained_component()
            # The target is an EMA of the student: kept in float32, as diffusers keeps its target_unet, because a
            # bf16 lerp with decay 0.95 rounds small updates away (it lagged 227 steps of drift behind, not 19).
            self.teacher_unet = frozen_copy(unet)
            self.target_unet = frozen_copy(unet, torch.promote_types(next(unet.parameters()).dtype, torch.float32))
        # LoRA EMA target: parameter name -> EMA weight (float32 at least), from the student on first use so that
        # a resumed student (or a checkpoint's saved EMA, on_load_checkpoint) is what it starts from.
        self.use_lora_target_ema = config.lora_target_ema and not full_model
        self.target_lora: dict[str, torch.Tensor] | None = None

    def _schedule_for(self, device: torch.device, dtype: torch.dtype) -> DDIMSkipSchedule:
        key = (device, dtype)
        if key not in self._schedules:
            self._schedules[key] = self.schedule.to(device, dtype)
        return self._schedules[key]

    def toggle_adapter(self, enable=False):
        """DistillationBase.toggle_adapter, but PEFT's LoRA layers are found once, not by a walk over every module
        of the UNet twice per step (what `disable_lora()` / `enable_lora()` do); the per-layer switch is the same."""
        if self.teacher_model.config.lora_type.lower() == "lycoris":
            return super().toggle_adapter(enable)
        if self._lora_layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            unet = self.teacher_model.get_trained_component()
            self._lora_layers = [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]
        for layer in self._lora_layers:
            layer.enable_adapters(enable)
        return None

    @contextmanager
    def _teacher(self):
        """The teacher network: the frozen copy, or (LoRA) the student with its adapters disabled."""
        if self.teacher_unet is not None:
            yield self.teacher_unet
            return
        self.toggle_adapter(enable=False)
        try:
            yield self.teacher_model.get_trained_component()
        finally:
            self.toggle_adapter(enable=True)

    def _flow_schedule_for(self, latents: torch.Tensor, dtype: torch.dtype) -> FlowSkipSchedule:
        config = self.noise_scheduler.config
        # Dynamic shifting sets mu from the transformer's token count. Every such family feeds its transformer a
        # latent's channels and patches packed into in_channels-wide tokens (Flux, Qwen-Image: 2 x 2 patches of 16
        # channels; Flux 2: its VAE's 128 already patchified channels, one token each).
        tokens = None
        if config.get("use_dynamic_shifting"):
            tokens = latents[0].numel() // self.teacher_model.get_trained_component().config.in_channels
        key = (tokens, latents.device, dtype)
        if key not in self._schedules:
            grid = FlowSkipSchedule.from_scheduler_config(config, self.lcm_config.num_ddim_timesteps,
                                                          image_seq_len=tokens)
            self._schedules[key] = grid.to(latents.device, dtype)
        return self._schedules[key]

    @contextmanager
    def _forward_with(self, network: torch.nn.Module | None):
        """SimpleTuner's forward (`model_predict`) calls its model object's `model`: the full model's frozen teacher or
        EMA target stands in for the trained network during one call (None: the trained network itself)."""
        if network is None:
            yield
            return
        trained, self.teacher_model.model = self.teacher_model.model, network
        try:
            yield
        finally:
            self.teacher_model.model = trained

    def _flow_velocity(self, batch: dict, x: torch.Tensor, sigma: torch.Tensor, unet_dtype: torch.dtype,
                       unconditional_rows: int = 0) -> torch.Tensor:
        """SimpleTuner's own forward of the model (`model_predict`) at (x, sigma): a copy of the batch with the noisy
        input and the timesteps (sigma x num_train_timesteps, SimpleTuner's flow timesteps) replaced. With
        `unconditional_rows`, the batch's rows are repeated and the prompt entries of the last copy zeroed."""
        rows = batch["latents"].shape[0]
        call = dict(batch)
        if unconditional_rows:
            for key, value in batch.items():
                if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == rows:
                    call[key] = torch.cat([value, torch.zeros_like(value) if key in FLOW_PROMPT_KEYS else value])
        call["noisy_latents"] = x.to(unet_dtype)
        call["timesteps"] = sigma * self.noise_scheduler.config.num_train_timesteps
        return self.teacher_model.model_predict(call)["model_prediction"]

    def _prepare_flow_batch(self, batch: dict) -> dict:
        """LCM on a rectified-flow teacher (lcm_plugin.lcm.flow): x_t on the flow path at sigma_n_plus_k of the
        teacher's own grid, one guided Euler step of the teacher (adapters off) to sigma_n, the target f = x - sigma v
        of the student itself (adapters on) there."""
        latents = batch["latents"]
        unet_dtype = latents.dtype
        arithmetic_dtype = torch.promote_types(latents.dtype, torch.float32)
        schedule = self._flow_schedule_for(latents, arithmetic_dtype)
        n = schedule.sample_index(latents.shape[0])
        sigma_n_plus_k, sigma_n = schedule.step_sigmas(n)
        # LCM maps both sides to the data (None: f = x - sigma v), PCM to the lower edge of the step's phase.
        sigma_end = (flow_phase_edge_sigmas(n, schedule, phases=self.lcm_config.pcm_phases)
                     if self.lcm_config.variant == "pcm" else None)
        # A guidance-distilled teacher takes its guidance as a model input; only a CFG teacher draws w_min..w_max.
        guided_by_cfg = FLOW_FAMILIES[self.teacher_model.config.model_family] == "cfg"
        guidance_scale = sample_guidance_scale(
            latents.shape[0], w_min=self.lcm_config.w_min, w_max=self.lcm_config.w_max, device=latents.device
        ) if guided_by_cfg else None
        x_t = flow_noise(latents.to(arithmetic_dtype), batch["noise"].to(arithmetic_dtype), sigma_n_plus_k)

        def teacher(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            with self._teacher(), self._forward_with(self.teacher_unet):
                if not guided_by_cfg:  # the model's own guidance input (flow_solver_step uses the one velocity)
                    return self._flow_velocity(batch, x, sigma, unet_dtype).to(arithmetic_dtype)
                output = self._flow_velocity(batch, torch.cat([x, x]), torch.cat([sigma, sigma]), unet_dtype,
                                             unconditional_rows=x.shape[0])
            cond, uncond = output.to(arithmetic_dtype).chunk(2)
            return cond, uncond

        x_n = flow_solver_step(teacher, x_t, sigma_n_plus_k, sigma_n, guidance_scale=guidance_scale)
        target = self.target_unet if self.target_unet is not None else self.teacher_model.get_trained_component()
        with (torch.no_grad(), self._target_lora_weights(), self._forward_with(self.target_unet),
              target_forward_context(target, unet_dtype, latents.device)):
            target_velocity = self._flow_velocity(batch, x_n, sigma_n, unet_dtype).to(arithmetic_dtype)
        batch["noisy_latents"] = x_t.to(unet_dtype)
        batch["timesteps"] = sigma_n_plus_k * self.noise_scheduler.config.num_train_timesteps
        batch[LCM_X_T_KEY] = x_t
        batch[LCM_SIGMA_KEY] = sigma_n_plus_k
        batch[LCM_SIGMA_END_KEY] = sigma_end
        batch[LCM_TARGET_KEY] = flow_consistency_function(x_n, target_velocity, sigma_n, sigma_end).detach()
        return batch

    def prepare_batch(self, batch, model=None, state=None):
        """Replace the trainer's noisy input with LCM's x_t at t_n_plus_k and attach the consistency target."""
        del model, state
        if self.is_flow_matching:
            return self._prepare_flow_batch(batch)
        latents = batch["latents"]
        unet_dtype = latents.dtype
        arithmetic_dtype = torch.promote_types(latents.dtype, torch.float32)
        schedule = self._schedule_for(latents.device, arithmetic_dtype)
        t_n_plus_k, t_n = schedule.sample_step(latents.shape[0])
        guidance_scale = sample_guidance_scale(
            latents.shape[0], w_min=self.lcm_config.w_min, w_max=self.lcm_config.w_max, device=latents.device
        )
        prompt_embeds = batch["encoder_hidden_states"]
        added_cond_kwargs = batch.get("added_cond_kwargs") or {}

        def teacher(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # cond and uncond in one call; uncond = zero prompt embeds (+ zero pooled embeds, same time_ids on SDXL).
            uncond_kwargs = unconditional_added_cond_kwargs(added_cond_kwargs)
            with self._teacher() as teacher_unet:
                output = teacher_unet(
                    torch.cat([x_t, x_t]).to(unet_dtype),
                    torch.cat([t, t]),
                    encoder_hidden_states=torch.cat([prompt_embeds, torch.zeros_like(prompt_embeds)]),
                    added_cond_kwargs={
                        key: torch.cat([added_cond_kwargs[key], uncond_kwargs[key]]) for key in added_cond_kwargs
                    },
                    return_dict=False,
                )[0]
            cond_output, uncond_output = output.to(arithmetic_dtype).chunk(2)
            return cond_output, uncond_output

        target_unet = self.target_unet if self.target_unet is not None else self.teacher_model.get_trained_component()

        def target_model(x_t_n: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # The target network: LCM-LoRA's student itself (adapters on), with its EMA LoRA weights when
            # lora_target_ema is set, or the full model's float32 EMA copy; never the teacher.
            target_dtype = next(target_unet.parameters()).dtype
            with self._target_lora_weights(), target_forward_context(target_unet, unet_dtype, x_t_n.device):
                return target_unet(
                    x_t_n.to(target_dtype),
                    t,
                    encoder_hidden_states=prompt_embeds.to(target_dtype),
                    added_cond_kwargs={key: value.to(target_dtype) for key, value in added_cond_kwargs.items()},
                    return_dict=False,
                )[0].to(arithmetic_dtype)

        targets = consistency_targets(
            latents=latents.to(arithmetic_dtype),
            noise=batch["noise"].to(arithmetic_dtype),
            t_n_plus_k=t_n_plus_k,
            t_n=t_n,
            guidance_scale=guidance_scale,
            schedule=schedule,
            prediction_type=self.prediction_type,
            timestep_scaling=self.lcm_config.timestep_scaling_factor,
            teacher=teacher,
            target_model=target_model,
            variant=self.lcm_config.variant,
            t_end=end_timesteps(
                self.lcm_config.variant, t_n, schedule=schedule, pcm_phases=self.lcm_config.pcm_phases
            ),
        )
        # The trainer's own student forward reads these two keys.
        batch["noisy_latents"] = targets.x_t.to(unet_dtype)
        batch["timesteps"] = targets.t_n_plus_k
        batch[LCM_X_T_KEY] = targets.x_t
        batch[LCM_T_END_KEY] = targets.t_end
        batch[LCM_TARGET_KEY] = targets.target
        return batch

    def compute_distill_loss(self, prepared_batch, model_output, original_loss):
        """Consistency loss d(f_theta(x_t, t_n_plus_k), f_target(x_t_n, t_n)); replaces the diffusion loss."""
        del original_loss
        x_t = prepared_batch[LCM_X_T_KEY]
        if self.is_flow_matching:
            prediction = flow_consistency_function(
                x_t, model_output["model_prediction"].to(x_t.dtype), prepared_batch[LCM_SIGMA_KEY],
                prepared_batch[LCM_SIGMA_END_KEY],
            )
        else:
            prediction = student_consistency_output(
                model_output["model_prediction"].to(x_t.dtype),
                x_t=x_t,
                t_n_plus_k=prepared_batch["timesteps"],
                schedule=self._schedule_for(x_t.device, x_t.dtype),
                prediction_type=self.prediction_type,
                timestep_scaling=self.lcm_config.timestep_scaling_factor,
                variant=self.lcm_config.variant,
                t_end=prepared_batch[LCM_T_END_KEY],
            )
        loss = consistency_loss(
            prediction,
            prepared_batch[LCM_TARGET_KEY],
            loss_type=self.lcm_config.loss_type,
            huber_c=self.lcm_config.huber_c,
        )
        # A tensor, not .item(): no host sync in the step; SimpleTuner's trackers convert it when they log.
        return loss, {"lcm_loss": loss.detach()}

    def _trainable_lora_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The adapter weights the optimizer trains (PEFT LoRA layers of the UNet), by parameter name."""
        unet = self.teacher_model.get_trained_component()
        parameters = {name: p for name, p in unet.named_parameters() if p.requires_grad}
        if not parameters:
            raise ValueError(
                "distillation_config.lcm.lora_target_ema: the trained UNet has no trainable adapter weights "
                f"(lora_type {self.teacher_model.config.lora_type!r}); it supports PEFT LoRA (lora_type "
                "'standard'). Set lora_target_ema to false."
            )
        return parameters

    def _ema_lora_weights(self) -> dict[str, torch.Tensor]:
        if self.target_lora is None:
            self.target_lora = {
                name: p.detach().to(torch.promote_types(p.dtype, torch.float32)).clone()
                for name, p in self._trainable_lora_parameters().items()
            }
        return self.target_lora

    @contextmanager
    def _target_lora_weights(self):
        """The student's adapters hold the EMA LoRA weights inside (lora_target_ema), their own weights after."""
        if not self.use_lora_target_ema:
            yield
            return
        ema = self._ema_lora_weights()
        parameters = self._trainable_lora_parameters()
        with torch.no_grad():
            student = {name: p.detach().clone() for name, p in parameters.items()}
            for name, p in parameters.items():
                p.copy_(ema[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in parameters.items():
                    p.copy_(student[name])

    def post_training_step(self, model, step):
        """Once per optimizer step: move the target network (full model, or the LoRA EMA) towards the student."""
        del model, step
        if self.target_unet is not None:
            ema_update(self.target_unet, self.teacher_model.get_trained_component(), self.lcm_config.ema_decay)
        if self.use_lora_target_ema:
            ema = self._ema_lora_weights()
            parameters = self._trainable_lora_parameters()
            ema_update_tensors([ema[name] for name in parameters], list(parameters.values()), self.lcm_config.ema_decay)

    def on_save_checkpoint(self, step, ckpt_dir):
        """The target network is training state (full model: the EMA UNet; LoRA: the EMA adapter weights); the
        teacher is the pretrained model, not saved."""
        del step
        accelerator = getattr(self.teacher_model, "accelerator", None)
        if not getattr(accelerator, "is_main_process", True):
            return
        if self.target_unet is not None:
            state = {name: tensor.contiguous() for name, tensor in self.target_unet.state_dict().items()}
            save_file(state, str(Path(ckpt_dir) / TARGET_CHECKPOINT_FILE))
        if self.use_lora_target_ema:
            state = {name: tensor.contiguous() for name, tensor in self._ema_lora_weights().items()}
            save_file(state, str(Path(ckpt_dir) / TARGET_LORA_CHECKPOINT_FILE))

    def on_load_checkpoint(self, ckpt_dir):
        if self.target_unet is not None:
            self._load_target_unet(Path(ckpt_dir))
        if self.use_lora_target_ema:
            self._load_target_lora(Path(ckpt_dir))

    def _load_target_unet(self, ckpt_dir: Path) -> None:
        path = ckpt_dir / TARGET_CHECKPOINT_FILE
        if path.is_file():
            device = next(self.target_unet.parameters()).device
            self.target_unet.load_state_dict(load_file(str(path), device=str(device)))
            return
        # A checkpoint from before LCM training: start the target from the resumed student, as at step 0.
        self.logger.warning("%s has no %s; the LCM target network restarts from the student.", ckpt_dir, path.name)
        self.target_unet.load_state_dict(self.teacher_model.get_trained_component().state_dict())

    def _load_target_lora(self, ckpt_dir: Path) -> None:
        path = ckpt_dir / TARGET_LORA_CHECKPOINT_FILE
        parameters = self._trainable_lora_parameters()
        if not path.is_file():
            self.logger.warning("%s has no %s; the LCM target LoRA restarts from the student.", ckpt_dir, path.name)
            self.target_lora = None
            return
        device = str(next(iter(parameters.values())).device)
        saved = load_file(str(path), device=device)
        if saved.keys() != parameters.keys():
            missing, unexpected = sorted(parameters.keys() - saved.keys()), sorted(saved.keys() - parameters.keys())
            raise ValueError(
                f"{path}: its EMA LoRA weights do not match the trained adapters (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); resume with the LoRA settings (lora_rank, targets) of the run that saved it."
            )
        self.target_lora = saved

    def get_scheduler(self, *_):
        """Validation sampler for the variant: LCMScheduler (lcm), TCDScheduler at tcd_gamma (tcd) or at gamma 0
        (pcm), all on the training solver's grid."""
        from lcm_plugin.inference import variant_scheduler

        return variant_scheduler(self.noise_scheduler.config, self.lcm_config)
