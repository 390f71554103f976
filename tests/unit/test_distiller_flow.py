"""The distiller's LCM-LoRA step on a rectified-flow teacher (SD3) equals a reference written here from the equations
(issue 21), and its validation sampler is the flow form of LCM's.

Reference, without lcm_plugin code: the solver grid is diffusers' FlowMatchEulerDiscreteScheduler's own sigmas for
the teacher's scheduler config (`set_timesteps(N)`, ascending with 0 prepended); x_t = (1 - s) x0 + s eps at
s = sigma_{n+k}; the teacher (LoRA adapters off) in two separate calls, cond and uncond (zero prompt and pooled
embeddings), v = v_u + w (v_c - v_u); one Euler step x_n = x_t + (sigma_n - sigma_{n+k}) v; the target (adapters on,
no grad) f_target = x_n - sigma_n v(x_n); the student (adapters on, with grad) f = x_t - sigma_{n+k} v(x_t); loss the
mean squared error. Every call is SimpleTuner's SD3 forward (`SD3._model_predict_single`'s arguments): timestep =
sigma x 1000, pooled_projections = add_text_embeds. The draws (n, w) are taken from the distiller.
"""

from __future__ import annotations

from types import SimpleNamespace

import lcm_plugin.simpletuner.distiller as distiller_module
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, SD3Transformer2DModel
from lcm_plugin.config import LcmConfig
from lcm_plugin.config.families import FLOW_FAMILIES
from lcm_plugin.inference import variant_scheduler
from lcm_plugin.simpletuner.distiller import LCM_SIGMA_KEY, LcmDistiller
from lcm_plugin.tiny_flow import SD3_SCHEDULER_CONFIG, sd3_transformer_config
from peft import LoraConfig
from simpletuner.helpers.models.common import PredictionTypes

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


class FakeSd3Model:
    """The parts of SimpleTuner's SD3 model object the distiller touches; model_predict makes the transformer call
    `simpletuner.helpers.models.sd3.model.SD3._model_predict_single` makes."""

    PREDICTION_TYPE = PredictionTypes.FLOW_MATCHING

    def __init__(self, transformer):
        self.model = transformer
        self.config = SimpleNamespace(lora_type="standard", model_family="sd3")

    def get_trained_component(self):
        return self.model

    def model_predict(self, prepared_batch):
        output = self.model(
            hidden_states=prepared_batch["noisy_latents"],
            timestep=prepared_batch["timesteps"],
            encoder_hidden_states=prepared_batch["encoder_hidden_states"],
            pooled_projections=prepared_batch["add_text_embeds"],
            return_dict=False,
        )[0]
        return {"model_prediction": output}


def tiny_lora_transformer(dtype: torch.dtype) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**sd3_transformer_config())
    return with_moving_lora(transformer).to(dtype)


def with_moving_lora(transformer, targets: list[str] = LORA_TARGETS):
    """`transformer` with LoRA adapters on `targets` whose B matrices are drawn too: the adapters matter, so a target
    computed with the teacher (adapters off) instead of the student cannot pass."""
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2)
    return transformer


def sd3_batch(batch_size: int, dtype: torch.dtype, seed: int) -> dict:
    """What SimpleTuner's prepare_batch hands the distiller for SD3 (the keys its forward reads)."""
    config = sd3_transformer_config()
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, config["in_channels"], 8, 8)
    return {
        "latents": torch.randn(shape, generator=generator, dtype=dtype),
        "noise": torch.randn(shape, generator=generator, dtype=dtype),
        "encoder_hidden_states": torch.randn(batch_size, 12, config["joint_attention_dim"], generator=generator,
                                             dtype=dtype),
        "add_text_embeds": torch.randn(batch_size, config["pooled_projection_dim"], generator=generator, dtype=dtype),
    }


def reference_grid(num_ddim_timesteps: int) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_ddim_timesteps)
    return scheduler.sigmas.double().flip(0)  # ascending, the terminal 0 first


def reference_step(transformer, batch, sigma_from, sigma_to, w, *, teacher=None, target_network=None, sigma_end=None):
    """(loss, target) of one LCM step written from the equations (module docstring). LoRA: the teacher is
    `transformer` with adapters off, the target the student itself; full model: the given `teacher` and
    `target_network`. PCM: both sides map to `sigma_end` instead of the data, x + (sigma_end - sigma) v."""
    if sigma_end is None:
        sigma_end = torch.zeros_like(sigma_from)
    x0, eps = batch["latents"], batch["noise"]
    column = lambda s: s.reshape(-1, 1, 1, 1).to(x0.dtype)

    def velocity(network, x, sigma, *, uncond=False):
        ehs, pooled = batch["encoder_hidden_states"], batch["add_text_embeds"]
        if uncond:
            ehs, pooled = torch.zeros_like(ehs), torch.zeros_like(pooled)
        return network(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=ehs,
                       pooled_projections=pooled, return_dict=False)[0]

    x_t = (1 - column(sigma_from)) * x0 + column(sigma_from) * eps
    with torch.no_grad():
        if teacher is None:
            transformer.disable_adapters()
        network = teacher or transformer
        v_c, v_u = velocity(network, x_t, sigma_from), velocity(network, x_t, sigma_from, uncond=True)
        if teacher is None:
            transformer.enable_adapters()
        v = v_u + column(w) * (v_c - v_u)
        x_n = x_t + column(sigma_to - sigma_from) * v
        target = x_n + column(sigma_end - sigma_to) * velocity(target_network or transformer, x_n, sigma_to)
    f = x_t + column(sigma_end - sigma_from) * velocity(transformer, x_t, sigma_from)
    loss = F.mse_loss(f.float(), target.float())
    loss.backward()
    return loss, target


def lora_grads(module) -> dict[str, torch.Tensor]:
    """The LoRA gradients of the modules a forward ran: Z-Image Omni's SigLIP refiner gets adapters but runs only
    with reference images (none here), so it has no gradient, in our step or the reference's."""
    return {name: p.grad.clone() for name, p in module.named_parameters() if "lora_" in name and p.grad is not None}


def assert_same_step(prepared: dict, loss, ours: dict, target, reference_loss, theirs: dict) -> None:
    """Our step's target, loss and LoRA gradients (`ours`) equal the reference's, and every gradient moves."""
    torch.testing.assert_close(prepared["lcm_target"], target, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=1e-5)
    assert ours.keys() == theirs.keys() and ours
    for name, grad in ours.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, theirs[name], rtol=0, atol=1e-5, msg=name)


def our_step(distiller: LcmDistiller, model, batch: dict, monkeypatch):
    """(prepared batch, loss, the guidance scales drawn) of one step in the trainer's call order."""
    drawn = {}
    original = distiller_module.sample_guidance_scale
    monkeypatch.setattr(distiller_module, "sample_guidance_scale",
                        lambda *a, **k: drawn.setdefault("w", original(*a, **k)))
    torch.manual_seed(3)
    prepared = distiller.prepare_batch(batch, model, {})
    loss, _ = distiller.compute_distill_loss(prepared, model.model_predict(prepared), None)
    return prepared, loss, drawn["w"]


def solver_sigmas(prepared: dict, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_n_plus_k the distiller drew, the point below it on diffusers' grid), float64."""
    sigma_from = prepared[LCM_SIGMA_KEY].double()
    index = torch.tensor([int(torch.isclose(grid, sigma).nonzero()) for sigma in sigma_from])
    assert bool((index >= 1).all()), "sigma_n_plus_k is not a point of diffusers' grid"
    return sigma_from, grid[index - 1]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_flow_step_equals_the_reference(batch_size, monkeypatch):
    config = LcmConfig(num_ddim_timesteps=10)
    transformer = tiny_lora_transformer(torch.float64)
    model = FakeSd3Model(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG)
    distiller = LcmDistiller(model, noise_scheduler=scheduler, config=config)
    prepared, loss, w = our_step(distiller, model, sd3_batch(batch_size, torch.float64, 7), monkeypatch)
    loss.backward()

    sigma_from, sigma_to = solver_sigmas(prepared, reference_grid(config.num_ddim_timesteps))
    torch.testing.assert_close(prepared["timesteps"].double(), sigma_from * 1000)

    reference = tiny_lora_transformer(torch.float64)
    reference_loss, target = reference_step(reference, sd3_batch(batch_size, torch.float64, 7), sigma_from,
                                            sigma_to, w.double())
    # diffusers holds its sigmas in float32, the distiller's grid is the same formula in float64: 1e-5, not exact.
    assert_same_step(prepared, loss, lora_grads(transformer), target, reference_loss, lora_grads(reference))


def test_the_pcm_flow_step_maps_both_sides_to_the_phase_edge(monkeypatch):
    """variant pcm: the step of the reference with sigma_end = the lower edge of the step's phase, written here: of
    the 10 grid intervals, 2 phases start at intervals 0 and 5, so the edges are the grid's sigma 0 and its 5th
    point; a step ending on an edge has the target x_n itself."""
    config = LcmConfig(num_ddim_timesteps=10, variant="pcm", pcm_phases=2)
    transformer = tiny_lora_transformer(torch.float64)
    model = FakeSd3Model(transformer)
    distiller = LcmDistiller(model, noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
                             config=config)
    batch_size = 16  # draws both phases and a step ending on the upper edge
    prepared, loss, w = our_step(distiller, model, sd3_batch(batch_size, torch.float64, 7), monkeypatch)
    loss.backward()

    grid = reference_grid(config.num_ddim_timesteps)
    sigma_from, sigma_to = solver_sigmas(prepared, grid)
    edge = torch.where(sigma_to >= grid[5], grid[5], grid[0])
    assert set(edge.tolist()) == {grid[0].item(), grid[5].item()} and bool((sigma_to == grid[5]).any())
    reference = tiny_lora_transformer(torch.float64)
    reference_loss, target = reference_step(reference, sd3_batch(batch_size, torch.float64, 7), sigma_from, sigma_to,
                                            w.double(), sigma_end=edge)
    assert_same_step(prepared, loss, lora_grads(transformer), target, reference_loss, lora_grads(reference))


def test_the_full_model_flow_step_uses_its_frozen_teacher_and_ema_target(monkeypatch):
    """model_type full: the teacher is a frozen copy of the pretrained transformer and the target its EMA copy, both
    standing in for the trained one in SimpleTuner's forward; the student has moved since (a training step)."""
    import copy

    config = LcmConfig(num_ddim_timesteps=10)
    transformer = tiny_lora_transformer(torch.float64)
    model = FakeSd3Model(transformer)
    distiller = LcmDistiller(model, noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
                             config=config, full_model=True)
    pretrained = copy.deepcopy(transformer)
    with torch.no_grad():  # the student trains away from the copies the distiller made
        for parameter in transformer.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    prepared, loss, w = our_step(distiller, model, sd3_batch(2, torch.float64, 7), monkeypatch)
    assert model.model is transformer  # the copies stood in only during their calls

    sigma_from, sigma_to = solver_sigmas(prepared, reference_grid(config.num_ddim_timesteps))
    student = copy.deepcopy(transformer)
    reference_loss, target = reference_step(student, sd3_batch(2, torch.float64, 7), sigma_from, sigma_to,
                                            w.double(), teacher=pretrained, target_network=pretrained)
    torch.testing.assert_close(prepared["lcm_target"], target, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=1e-5)
    # and not the moved student as teacher or target
    _, live_target = reference_step(copy.deepcopy(transformer), sd3_batch(2, torch.float64, 7), sigma_from,
                                    sigma_to, w.double(), teacher=transformer,
                                    target_network=transformer)
    assert (prepared["lcm_target"] - live_target).abs().max() > 1e-3


def test_the_lora_ema_target_serves_the_flow_target(monkeypatch):
    """lora_target_ema: the target call runs with the EMA adapter weights, every other call with the student's."""
    import copy

    config = LcmConfig(num_ddim_timesteps=10, lora_target_ema=True)
    transformer = tiny_lora_transformer(torch.float64)
    model = FakeSd3Model(transformer)
    distiller = LcmDistiller(model, noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
                             config=config)
    ema = {name: p.detach() + 0.05 * torch.randn_like(p) for name, p in distiller._trainable_lora_parameters().items()}
    distiller.target_lora = {name: value.clone() for name, value in ema.items()}
    prepared, loss, w = our_step(distiller, model, sd3_batch(2, torch.float64, 7), monkeypatch)

    sigma_from, sigma_to = solver_sigmas(prepared, reference_grid(config.num_ddim_timesteps))
    target_network = copy.deepcopy(transformer)
    with torch.no_grad():
        for name, parameter in target_network.named_parameters():
            if name in ema:
                parameter.copy_(ema[name])
    reference_loss, target = reference_step(copy.deepcopy(transformer), sd3_batch(2, torch.float64, 7), sigma_from,
                                            sigma_to, w.double(), target_network=target_network)
    torch.testing.assert_close(prepared["lcm_target"], target, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=1e-5)


def test_the_draws_cover_the_grid_and_end_on_the_data():
    distiller = LcmDistiller(FakeSd3Model(tiny_lora_transformer(torch.float32)), config=LcmConfig(num_ddim_timesteps=8),
                             noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG))
    latents = torch.zeros(4000, 16, 8, 8)
    schedule = distiller._flow_schedule_for(latents, torch.float32)
    start, end = schedule.sample_step(4000)
    grid = reference_grid(8).float()
    assert sorted(set(start.tolist())) == pytest.approx(grid[1:].tolist())
    assert set(end[start == grid[1]].tolist()) == {0.0}


def test_the_student_samples_with_the_flow_lcm_scheduler_on_the_teachers_schedule():
    scheduler = variant_scheduler(FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG).config, LcmConfig())
    assert isinstance(scheduler, FlowMatchLCMScheduler)
    assert scheduler.config.shift == SD3_SCHEDULER_CONFIG["shift"]


# ---- Flux, through SimpleTuner's own Flux class --------------------------------------------------------------------


def test_the_flux_step_equals_the_reference_through_simpletuners_flux_model(tmp_path):
    """Flux is guidance-distilled: no CFG; its guidance input is SimpleTuner's flux_guidance_value in every call. The
    distiller drives SimpleTuner's own Flux class (its packing, ids, guidance and timestep / 1000); the reference calls
    the same transformer with diffusers' FluxPipeline packing, on diffusers' grid for the latents' mu."""
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from lcm_plugin.demo import shapes
    from lcm_plugin.tiny_flow import save_tiny_flux
    from test_tiny_flow import load_with_simpletuner

    folder = save_tiny_flux(tmp_path / "flux", vocabulary=shapes.VOCABULARY)
    model = load_with_simpletuner("flux", folder, tmp_path, flux_guidance_value=3.5)
    transformer = with_moving_lora(model.model)
    distiller = LcmDistiller(model, noise_scheduler=model.noise_schedule, config=LcmConfig(num_ddim_timesteps=10))
    with torch.no_grad():
        embeds = model._format_text_embedding(model._encode_prompts(list(shapes.PROMPTS[:2])))
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    batch = model.prepare_batch({"prompt_embeds": embeds["prompt_embeds"],
                                 "add_text_embeds": embeds["pooled_prompt_embeds"], "latent_batch": latents, "encoder_attention_mask": embeds.get("attention_masks"),
                                 "batch_time_ids": None}, {"global_step": 0})
    inputs = {key: batch[key].clone() for key in ("latents", "noise", "prompt_embeds", "add_text_embeds")}
    prepared = distiller.prepare_batch(batch, model, {})
    loss, _ = distiller.compute_distill_loss(prepared, model.model_predict(prepared), None)
    loss.backward()
    ours = lora_grads(transformer)
    transformer.zero_grad(set_to_none=True)

    config = model.noise_schedule.config
    mu = calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(10, mu=mu)
    grid = scheduler.sigmas.double().flip(0)
    sigma_from, sigma_to = (sigma.float() for sigma in solver_sigmas(prepared, grid))

    def velocity(x, sigma):
        packed = FluxPipeline._pack_latents(x, 2, 16, 8, 8)
        output = transformer(
            hidden_states=packed, timestep=sigma, guidance=torch.full((2,), 3.5),
            pooled_projections=inputs["add_text_embeds"], encoder_hidden_states=inputs["prompt_embeds"],
            txt_ids=torch.zeros(inputs["prompt_embeds"].shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, x.device, x.dtype), return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(output, 64, 64, 8)

    column = lambda s: s.reshape(-1, 1, 1, 1)
    x_t = (1 - column(sigma_from)) * inputs["latents"] + column(sigma_from) * inputs["noise"]
    with torch.no_grad():
        transformer.disable_adapters()
        x_n = x_t + column(sigma_to - sigma_from) * velocity(x_t, sigma_from)
        transformer.enable_adapters()
        target = x_n - column(sigma_to) * velocity(x_n, sigma_to)
    reference_loss = F.mse_loss(x_t - column(sigma_from) * velocity(x_t, sigma_from), target)
    reference_loss.backward()
    assert_same_step(prepared, loss, ours, target, reference_loss, lora_grads(transformer))


def test_the_sd3_step_equals_the_reference_through_simpletuners_sd3_model(tmp_path, monkeypatch):
    """The SD3 step driven through SimpleTuner's own SD3 class (its prepare_batch, its forward and its casts), not
    the stand-in above: the reference calls the same transformer as the module docstring writes it."""
    from test_tiny_flow import load_with_simpletuner

    from lcm_plugin.demo import shapes
    from lcm_plugin.tiny_flow import save_tiny_sd3

    model = load_with_simpletuner("sd3", save_tiny_sd3(tmp_path / "sd3", vocabulary=shapes.VOCABULARY), tmp_path)
    transformer = with_moving_lora(model.model)
    config = LcmConfig(num_ddim_timesteps=10)
    distiller = LcmDistiller(model, noise_scheduler=model.noise_schedule, config=config)
    with torch.no_grad():
        embeds = model._format_text_embedding(model._encode_prompts(list(shapes.PROMPTS[:2])))
    torch.manual_seed(0)
    batch = model.prepare_batch({"prompt_embeds": embeds["prompt_embeds"],
                                 "add_text_embeds": embeds["pooled_prompt_embeds"],
                                 "latent_batch": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)),
                                 "batch_time_ids": None}, {"global_step": 0})
    inputs = {key: batch[key].clone() for key in ("latents", "noise", "encoder_hidden_states", "add_text_embeds")}
    prepared, loss, w = our_step(distiller, model, batch, monkeypatch)
    loss.backward()
    ours = lora_grads(transformer)
    transformer.zero_grad(set_to_none=True)

    sigma_from, sigma_to = (s.float() for s in solver_sigmas(prepared, reference_grid(config.num_ddim_timesteps)))
    reference_loss, target = reference_step(transformer, inputs, sigma_from, sigma_to, w)
    assert_same_step(prepared, loss, ours, target, reference_loss, lora_grads(transformer))


def collated(text: dict, latents: torch.Tensor) -> dict:
    """The batch SimpleTuner's collate builds from a family's text cache entries (`_format_text_embedding`'s dict,
    batched) and latents: the entries `collate_fn` names (prompt and pooled embeddings, the mask under any of the
    family's names)."""
    mask = next((text[key] for key in ("attention_masks", "prompt_attention_mask", "attention_mask") if key in text),
                None)
    return {"prompt_embeds": text["prompt_embeds"], "add_text_embeds": text.get("pooled_prompt_embeds"),
            "encoder_attention_mask": mask, "latent_batch": latents, "batch_time_ids": None}


CFG_FLOW_FAMILIES = [family for family, guidance in FLOW_FAMILIES.items() if guidance == "cfg" and family != "sd3"]


@pytest.mark.parametrize("family", CFG_FLOW_FAMILIES)
def test_a_cfg_family_step_equals_the_reference_through_simpletuners_model(family, tmp_path, monkeypatch):
    """Every other CFG flow family through SimpleTuner's own class (its prepare_batch, its forward): the reference
    makes the teacher's cond and uncond calls separately, the uncond one with the caption's embeddings zeroed (every
    tensor collate made from them but the attention mask, which is kept), on diffusers' grid for the model's own
    training schedule; then the module docstring's equations."""
    import huggingface_hub.constants
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from hub_cache import HUB_TEXT_ENCODERS, offline_hub_cache
    from test_tiny_flow import encode_captions, load_with_simpletuner

    from lcm_plugin.demo import shapes
    from lcm_plugin.tiny_flow import save_tiny_flow

    folder = save_tiny_flow(family, tmp_path / family, vocabulary=shapes.VOCABULARY)
    with monkeypatch.context() as patch:
        if family in HUB_TEXT_ENCODERS:  # its text encoder loads from a hub repo (test_tiny_flow says how)
            cache = offline_hub_cache(tmp_path / "hub", HUB_TEXT_ENCODERS[family], folder)
            patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
            patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        model = load_with_simpletuner(family, folder, tmp_path)
    # SimpleTuner's own LoRA targets for the family (MOSS-Image's blocks have no to_q / to_k / to_v)
    transformer = with_moving_lora(model.model, model.DEFAULT_LORA_TARGET)
    config = LcmConfig(num_ddim_timesteps=10)
    distiller = LcmDistiller(model, noise_scheduler=model.noise_schedule, config=config)
    with torch.no_grad():
        text = encode_captions(model, list(shapes.PROMPTS[:2]))  # a row per caption, as SimpleTuner's cache
    channels = model.LATENT_CHANNEL_COUNT
    torch.manual_seed(0)
    batch = model.prepare_batch(collated(text, torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(0))),
                                {"global_step": 0})
    inputs = {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    # The image tokens the transformer is given (the family's own packing), for the reference's mu
    sequence_lengths = set()
    hook = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: sequence_lengths.add(kwargs["hidden_states"].shape[1])
        if isinstance(kwargs.get("hidden_states"), torch.Tensor) else None, with_kwargs=True)
    prepared, loss, w = our_step(distiller, model, batch, monkeypatch)
    hook.remove()
    loss.backward()
    ours = lora_grads(transformer)
    transformer.zero_grad(set_to_none=True)

    schedule = model.noise_schedule.config
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(schedule)
    if schedule.get("use_dynamic_shifting"):
        (tokens,) = sequence_lengths
        scheduler.set_timesteps(config.num_ddim_timesteps, mu=calculate_shift(
            tokens, schedule.base_image_seq_len, schedule.max_image_seq_len, schedule.base_shift, schedule.max_shift))
    else:
        scheduler.set_timesteps(config.num_ddim_timesteps)
    sigma_from, sigma_to = (s.float() for s in solver_sigmas(prepared, scheduler.sigmas.double().flip(0)))
    caption_entries = ("encoder_hidden_states", "prompt_embeds", "add_text_embeds")

    def velocity(x, sigma, *, uncond=False):
        call = {key: torch.zeros_like(value) if uncond and key in caption_entries and isinstance(value, torch.Tensor)
                else value for key, value in inputs.items()}
        call.update(noisy_latents=x, timesteps=sigma * 1000)
        return model.model_predict(call)["model_prediction"]

    column = lambda s: s.reshape(-1, 1, 1, 1)
    x_t = (1 - column(sigma_from)) * inputs["latents"] + column(sigma_from) * inputs["noise"]
    with torch.no_grad():
        transformer.disable_adapters()
        v_c, v_u = velocity(x_t, sigma_from), velocity(x_t, sigma_from, uncond=True)
        transformer.enable_adapters()
        x_n = x_t + column(sigma_to - sigma_from) * (v_u + column(w) * (v_c - v_u))
        target = x_n - column(sigma_to) * velocity(x_n, sigma_to)
    reference_loss = F.mse_loss(x_t - column(sigma_from) * velocity(x_t, sigma_from), target)
    reference_loss.backward()
    assert_same_step(prepared, loss, ours, target, reference_loss, lora_grads(transformer))
