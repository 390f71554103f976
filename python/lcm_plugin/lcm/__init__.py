"""Pure LCM math: no SimpleTuner, no I/O, tensors in the latents' dtype and device.

References: LCM, Luo et al. 2023 (arXiv 2310.04378), Algorithm 1 "Latent Consistency Distillation";
LCM-LoRA, Luo et al. 2023 (arXiv 2311.05556); diffusers `examples/consistency_distillation/
train_lcm_distill_lora_sdxl.py`, whose step this package reproduces exactly.

Glossary (one spelling per symbol):
    alpha_bar_t        cumulative product of (1 - beta) at integer timestep t
    alpha_t, sigma_t   sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t): x_t = alpha_t * x0 + sigma_t * eps
    skip_k             solver stride in training timesteps, num_train_timesteps // num_ddim_timesteps
    t_n_plus_k, t_n    start and end of one solver step (t_n = max(t_n_plus_k - skip_k, 0))
    x0_hat, eps_hat    data and noise estimates derived from a model output
    guidance_scale     classifier-free guidance scale s in SimpleTuner's convention,
                       uncond + s * (cond - uncond); the LCM paper's omega is s - 1
    c_skip, c_out      boundary-condition scalings of the consistency function f(x, t)
    sigma_data         0.5, as in the LCM paper and diffusers
    timestep_scaling   multiplies t inside c_skip/c_out (diffusers' timestep_scaling_factor)
    t_end              where the consistency function maps to: 0 (LCM), t_m <= t_n (TCD), a phase edge (PCM)

Flow matching (flow.py; SD3, Flux; diffusers' FlowMatchEulerDiscreteScheduler conventions):
    sigma              flow time in [0, 1]: x_sigma = (1 - sigma) x0 + sigma eps (no alpha; 1 - sigma plays it)
    v                  the velocity the network predicts, eps - x0; x0_hat = x - sigma v, eps_hat = x + (1 - sigma) v
    shift, mu          the teacher's sigma shift: static (SD3) or Flux's dynamic mu from the latent's token count
    sigma_n_plus_k,    start and end of one solver step: adjacent sigmas of the teacher's N-step grid
      sigma_n          (sigma_n = 0 on the last step)
    sigma_end          where the flow consistency function maps to; f(x, sigma -> sigma_end) = x + (sigma_end - sigma) v
"""

from lcm_plugin.lcm.boundary import consistency_function, scalings_for_boundary_conditions
from lcm_plugin.lcm.flow import (
    FlowConsistencyPair,
    FlowSkipSchedule,
    dynamic_shift_mu,
    euler_step,
    flow_consistency_function,
    flow_consistency_pair,
    flow_noise,
    flow_phase_edge_sigmas,
    flow_sigma_grid,
    flow_solver_step,
    guided_velocity,
    heun_step,
    x0_and_eps_from_velocity,
)
from lcm_plugin.lcm.guidance import apply_guidance, sample_guidance_scale
from lcm_plugin.lcm.loss import consistency_loss
from lcm_plugin.lcm.parameterization import PREDICTION_TYPES, x0_and_eps_from_model_output
from lcm_plugin.lcm.schedules import DDIMSkipSchedule
from lcm_plugin.lcm.solver import ddim_step
from lcm_plugin.lcm.targets import ConsistencyTargets, consistency_targets, student_consistency_output
from lcm_plugin.lcm.variants import VARIANTS, consistency_output, end_timesteps

__all__ = [
    "PREDICTION_TYPES",
    "VARIANTS",
    "ConsistencyTargets",
    "DDIMSkipSchedule",
    "FlowConsistencyPair",
    "FlowSkipSchedule",
    "apply_guidance",
    "consistency_function",
    "consistency_loss",
    "consistency_output",
    "consistency_targets",
    "ddim_step",
    "dynamic_shift_mu",
    "end_timesteps",
    "euler_step",
    "flow_consistency_function",
    "flow_consistency_pair",
    "flow_noise",
    "flow_phase_edge_sigmas",
    "flow_sigma_grid",
    "flow_solver_step",
    "guided_velocity",
    "heun_step",
    "sample_guidance_scale",
    "scalings_for_boundary_conditions",
    "student_consistency_output",
    "x0_and_eps_from_model_output",
    "x0_and_eps_from_velocity",
]
