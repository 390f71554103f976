"""LCM-LoRA of the rectified-flow families (SD3, Flux, Chroma, Lumina 2, AuraFlow, the Z-Images, LongCat-Image,
Qwen-Image, ERNIE-Image, FLUX.3 Image Klein) through the stock
`simpletuner train` (issue 21): each tiny offline model (lcm_plugin.tiny_flow) trains 2 steps with the plugin's
distiller; its step is the one tests/unit/test_distiller_flow.py proves equal to the equations; here: it runs inside
SimpleTuner's trainer and what the run hands over samples with the flow LCM scheduler in the family's diffusers
pipeline (SimpleTuner's own where diffusers has none)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import computed_once, stock_trainer_env, write_lcm_training_dir
from test_simpletuner_train import LORA_FILE, lcm_losses, run_stock_trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hub_cache import HUB_TEXT_ENCODERS, offline_hub_cache  # noqa: E402

STEPS = 2
# The in-training quality check at a validation, small: Euler teacher rows (with CFG, or Flux's guidance input).
QUALITY_CHECK = {"steps": [1, 2], "samples": 4, "reference_steps": 4}


def validation_at(step: int) -> dict:
    """config.json keys for one SimpleTuner validation at `step` (it samples with the distiller's scheduler and runs
    the quality check), one small image."""
    return {"validation_disable": None, "validation_step_interval": step, "validation_prompt": "red circle",
            "validation_resolution": "64x64", "validation_num_inference_steps": 2, "validation_guidance": 1.0,
            "num_validation_images": 1, "disable_benchmark": True}


def assert_the_quality_check_ran(run: Path, log: str, step: int) -> None:
    """The check ran at the validation of `step`, logged its table and metrics and saved its grid."""
    from lcm_plugin.quality_check import METRIC_PREFIX

    assert not any(line in log for line in ("the LCM quality check failed", "quality check is skipped",
                                            "quality check skipped")), log[-4000:]
    assert "FD to the teacher Euler 4 steps teacher samples" in log, log[-4000:]
    metrics = {}
    for line in (run / "output" / "training_metrics.jsonl").read_text().splitlines():
        metrics.update({key: value for key, value in json.loads(line).get("metrics", {}).items()
                        if key.startswith(METRIC_PREFIX)})
    expected = {f"{METRIC_PREFIX}{model}_fd_{steps}step" for model in ("teacher", "student") for steps in (1, 2)}
    assert expected <= set(metrics) and all(math.isfinite(metrics[key]) for key in expected), sorted(metrics)
    assert (run / "output" / "validation_images" / f"step_{step}_lcm_quality_grid.png").is_file()


def flow_run(root: Path, family: str, *, steps: int = STEPS, config: dict | None = None,
             lcm: dict | None = None, model: Path | None = None,
             data_path: str | None = None) -> tuple[Path, Path, str]:
    """The family's tiny offline model (lcm_plugin.tiny_flow, its VAE's posterior made near-deterministic), or
    `model` if given, and an LCM run of it through the stock trainer: conftest's CPU LoRA run with the family's
    `model_family`, then `config` keys (None removes a key) and `lcm` keys of the LCM block; `data_path`: the value of
    SIMPLETUNER_LCM_DATA_PATH (None: unset, the plugin's path). (run folder, model folder, log)."""
    from lcm_plugin.demo import shapes
    from lcm_plugin.tiny_flow import save_tiny_flow

    if model is None:
        model = save_tiny_flow(family, root / "model", vocabulary=shapes.VOCABULARY)
        near_deterministic_posterior(model / "vae")
    run = write_lcm_training_dir(root / "run", model, max_train_steps=steps)
    config_file = run / "config" / "config.json"
    settings = json.loads(config_file.read_text())
    settings.update({"model_family": family, "model_flavour": None, **(config or {})})
    settings.pop("pretrained_vae_model_name_or_path", None)
    settings["distillation_config"]["lcm"].update(lcm or {})
    config_file.write_text(json.dumps({key: value for key, value in settings.items() if value is not None}, indent=2))
    env = stock_trainer_env()
    if data_path is not None:
        env["SIMPLETUNER_LCM_DATA_PATH"] = data_path
    if family in HUB_TEXT_ENCODERS:
        env["HF_HUB_CACHE"] = str(offline_hub_cache(run / "hub", HUB_TEXT_ENCODERS[family], model))
    return run, model, run_stock_trainer(run, env)


def shared_flow_run(tmp_path_factory, name: str, family: str, **options) -> tuple[Path, Path, str]:
    """flow_run once per test session (conftest.computed_once), whichever workers run the tests that use it."""
    run, model, log = computed_once(tmp_path_factory, name,
                                    lambda root: [str(part) for part in flow_run(root, family, **options)])
    return Path(run), Path(model), log


def near_deterministic_posterior(vae_folder: Path) -> None:
    """Make the VAE's posterior log-variance -30 (DiagonalGaussianDistribution's floor: a standard deviation of
    3e-7) for every input, as the SDXL test model's is: SimpleTuner samples the posterior with the global RNG, the
    plugin with a generator per image, so only then can their latents be compared value by value."""
    import diffusers
    import torch
    from diffusers import AutoencoderKLQwenImage

    # The folder's own class: FLUX.2's VAE (ERNIE-Image's) keeps batch-norm statistics AutoencoderKL would drop.
    vae_class = getattr(diffusers, json.loads((vae_folder / "config.json").read_text())["_class_name"])
    qwen = vae_class is AutoencoderKLQwenImage
    vae = vae_class.from_pretrained(vae_folder)
    last = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out  # the moments' last layer
    channels = vae.config.z_dim if qwen else vae.config.latent_channels  # Qwen-Image's 3-D VAE: z_dim
    with torch.no_grad():
        last.weight[channels:] = 0.0
        last.bias[channels:] = -1000.0
    vae.save_pretrained(vae_folder)


SERVED_LINE = "datasets 'shapes' read latents and text embeddings from the memory-mapped caches"
# The same PNG pixels through the same fp32 VAE; only the kernels differ (the plugin encodes channels-last): up to
# 1.1e-4 measured on SD3's latents (scaling factor 1.53). A missing shift would be off by 0.04 (Flux) to 0.09 (SD3).
LATENT_TOLERANCE = 5e-4


def assert_the_caches_are_simpletuners(family: str, ours: Path, theirs: Path) -> None:
    """What the plugin's path hands SimpleTuner from its stores (trainer_cache.text_embeddings, behind the patched
    TextEmbeddingCache.load_from_cache, and the latents) against the files SimpleTuner's own caches wrote for the
    same data and model: every caption's text embeddings equal (the same keys, dtypes and values), every latent
    within LATENT_TOLERANCE (both shifted and scaled by the VAE's factors)."""
    import hashlib
    import os

    import torch
    from simpletuner.helpers.data_backend.local import LocalDataBackend

    from lcm_plugin import trainer_cache
    from lcm_plugin.cache import LatentCacheReader

    loader = LocalDataBackend(accelerator=None, id="judge", compress_cache=True)  # compress_disk_cache default
    assert sorted((ours / "cache" / "vae").rglob("*.pt")) == [], "the covered dataset went to SimpleTuner's .pt files"
    text_folder = ours / "cache" / "text"
    texts = LatentCacheReader(text_folder / "lcm")
    entries = {key.partition("/")[0] for key in texts.keys() if "/" in key}
    (digest,) = {entry.partition("@")[2] for entry in entries}
    names = sorted(f"{entry.partition('@')[0]}-{family}.pt" for entry in entries)
    # SimpleTuner writes only its validation prompts' files; the stock run (no validation) writes the captions'
    assert not {f.name for f in text_folder.glob("*.pt")} & set(names), "captions went to SimpleTuner's .pt files"
    stock_texts = sorted((theirs / "cache" / "text").glob(f"*-{family}.pt"))
    assert names == [f.name for f in stock_texts]
    trainer_cache.reset()
    trainer_cache.coverage().texts[os.path.abspath(text_folder)] = trainer_cache.TextCache(texts, digest, family)
    try:
        for stock_file in stock_texts:
            served = trainer_cache.text_embeddings(str(text_folder), stock_file.name)
            expected = loader.torch_load(str(stock_file))
            assert sorted(served) == sorted(expected), stock_file.name
            for name, value in expected.items():
                assert served[name].dtype == value.dtype and torch.equal(served[name], value), (stock_file.name, name)
    finally:
        trainer_cache.reset()
    latents = LatentCacheReader(ours / "cache" / "vae" / "lcm")
    images = {key.partition("@")[0]: key for key in latents.keys() if "#" not in key and "/" not in key}
    stock_latents = sorted((theirs / "cache" / "vae").rglob("*.pt"))
    assert len(stock_latents) == len(images) == 4, (stock_latents, images)
    for image, key in images.items():  # SimpleTuner names a latent by the sha256 of its image's stem
        (stock_file,) = [f for f in stock_latents if f.stem == hashlib.sha256(Path(image).stem.encode()).hexdigest()]
        expected = loader.torch_load(str(stock_file))
        expected = expected["latents"] if isinstance(expected, dict) else expected
        torch.testing.assert_close(latents.get_torch(key), expected, atol=LATENT_TOLERANCE, rtol=0)


# What SimpleTuner 4.10.1 says of a run of 0 steps, once its data backends (and their caches) are configured.
NO_STEPS = "You must specify either --max_train_steps or --num_train_epochs with a value > 0"


def stock_caches(family: str, model: Path, root: Path, config: dict | None = None) -> Path:
    """The run folder of the same run on SimpleTuner's own caching (SIMPLETUNER_LCM_DATA_PATH=simpletuner), up to the
    end of SimpleTuner's data preparation: its caches are all the judge reads, so the run is given 0 steps, which
    SimpleTuner refuses only after its init_data_backend has written them."""
    run, _, log = flow_run(root, family, steps=0, model=model, config=config, data_path="simpletuner")
    assert "memory-mapped caches" not in log and NO_STEPS in log, log[-4000:]
    return run


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory):
    return shared_flow_run(tmp_path_factory, "sd3-lcm", "sd3")


def test_sd3_lcm_lora_trains_through_the_stock_trainer(sd3_run):
    run, _, log = sd3_run
    losses = lcm_losses(run / "output" / "training_metrics.jsonl")
    assert len(losses) >= STEPS and all(math.isfinite(v) and v >= 0 for v in losses.values()), log[-4000:]
    assert (run / "output" / LORA_FILE).is_file(), log[-4000:]


def test_the_lora_records_the_flow_lcm_sampler_and_samples_with_it(sd3_run):
    import torch
    from diffusers import FlowMatchLCMScheduler, StableDiffusion3Pipeline
    from safetensors import safe_open

    run, model, _ = sd3_run
    with safe_open(str(run / "output" / LORA_FILE), "pt") as lora:
        metadata = lora.metadata()
    scheduler_config = json.loads(metadata["lcm.scheduler_config"])
    assert scheduler_config["_class_name"] == "FlowMatchLCMScheduler", metadata
    assert scheduler_config["shift"] == 3.0
    pipeline = StableDiffusion3Pipeline.from_pretrained(model)
    pipeline.scheduler = FlowMatchLCMScheduler.from_config(scheduler_config)
    pipeline.load_lora_weights(run / "output")
    image = pipeline("red circle", num_inference_steps=4, guidance_scale=0.0, height=64, width=64,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and bool((image >= 0).all())


def test_sd3_trains_from_the_stores_with_simpletuners_own_caches(sd3_run, tmp_path):
    run, model, log = sd3_run
    assert SERVED_LINE in log and "4 image(s) encoded here" in log, log[-4000:]
    assert_the_caches_are_simpletuners("sd3", run, stock_caches("sd3", model, tmp_path))


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    return shared_flow_run(tmp_path_factory, "flux-lcm", "flux", config={"flux_guidance_value": 3.5})


def test_flux_lcm_lora_trains_with_its_own_guidance_input_and_samples(flux_run):
    import torch
    from diffusers import FlowMatchLCMScheduler, FluxPipeline

    run, model, log = flux_run
    losses = lcm_losses(run / "output" / "training_metrics.jsonl")
    assert len(losses) >= STEPS and all(math.isfinite(v) and v >= 0 for v in losses.values()), log[-4000:]
    pipeline = FluxPipeline.from_pretrained(model)
    pipeline.scheduler = FlowMatchLCMScheduler.from_config(pipeline.scheduler.config)
    pipeline.load_lora_weights(run / "output")
    image = pipeline("red circle", num_inference_steps=4, guidance_scale=3.5, height=64, width=64,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_flux_trains_from_the_stores_with_simpletuners_own_caches(flux_run, tmp_path):
    run, model, log = flux_run
    assert SERVED_LINE in log, log[-4000:]
    assert_the_caches_are_simpletuners("flux", run, stock_caches("flux", model, tmp_path, {"flux_guidance_value": 3.5}))


def test_the_card_snippet_of_a_flux_lora_samples_at_its_guidance(flux_run, tmp_path, monkeypatch):
    """The model card's code (outputs.inference_snippet, with what R1 derives for Flux: the transformer, the trained
    guidance input) run as a user would, against the LoRA the run wrote."""
    from types import SimpleNamespace

    from lcm_plugin.config import LcmConfig
    from lcm_plugin.outputs import CardSettings, inference_snippet
    from lcm_plugin.simpletuner.run_output_patches import _flow_card_settings
    from test_run_outputs import run_snippet

    run, model, _ = flux_run
    from diffusers import FluxTransformer2DModel
    from simpletuner.helpers.models.flux.transformer import FluxTransformer2DModel as SimpleTunersFlux

    class Model:  # what R1 reads of SimpleTuner's model object
        def get_trained_component(self):
            return SimpleTunersFlux.__new__(SimpleTunersFlux)

    derived = _flow_card_settings(Model(), SimpleNamespace(model_family="flux", flux_guidance_value=3.5))
    assert derived == {"denoiser": ("transformer", FluxTransformer2DModel.__name__), "guidance_scale": 3.5}
    code = inference_snippet(CardSettings(model_id=str(model), adapter_id=str(run / "output"), lcm=LcmConfig(),
                                          scheduler_overrides={}, prompt="red circle", seed=0, width=64, height=64,
                                          scheduler_class="FlowMatchLCMScheduler", **derived))
    assert "guidance_scale=3.5" in code and "pipeline.fuse_lora()" in code
    variables = run_snippet(code, tmp_path, monkeypatch)
    assert variables["image"].size == (64, 64)


# Families covered by FLOW_FAMILIES with no code of their own: the distiller's generic "cfg" teacher (a doubled batch,
# the prompt entries of the second half zeroed, masks kept). family -> diffusers pipeline, config keys on top.
CFG_FAMILIES = {
    "chroma": ("ChromaPipeline", {}),
    # Lumina-Image-2.0 samples at shift 6; SimpleTuner's training schedule takes flow_schedule_shift (default 3).
    "lumina2": ("Lumina2Pipeline", {"flow_schedule_shift": 6.0}),
    "auraflow": ("AuraFlowPipeline", {"flow_schedule_shift": 1.73}),  # AuraFlow's scheduler shift
    # SimpleTuner's v1.0 flavour (no model_flavour with a local folder: Qwen2.5-VL, the 16-channel VAE); its training
    # schedule is hard-coded (TRAINING_SCHEDULES), so flow_schedule_shift plays no part in the distiller's grid.
    "qwen_image": ("QwenImagePipeline", {}),
    # Z-Image-Turbo's scheduler shift (3.0, SimpleTuner's default too); no model_flavour, so no assistant LoRA.
    "z_image": ("ZImagePipeline", {"flow_schedule_shift": 3.0}),
    # Z-Image base's scheduler shift (6.0); no model_flavour with a local folder (the class's default, "base", has
    # no assistant LoRA). Text-to-image only: no conditioning dataset, so the SigLIP tower never runs. Gradient
    # checkpointing off: SimpleTuner 4.10.1's Omni transformer passes its noise refiner keyword arguments that
    # diffusers' checkpoint function does not take (a TypeError at the first step, with or without the plugin).
    "z_image_omni": ("ZImageOmniPipeline", {"flow_schedule_shift": 6.0, "gradient_checkpointing": False}),
    # SimpleTuner's "final" flavour (no model_flavour with a local folder): Flux's dynamically shifted scheduler, so
    # SimpleTuner's training schedule takes flow_schedule_shift (default 3), as Chroma's.
    "longcat_image": ("LongCatImagePipeline", {}),
    # baidu/ERNIE-Image's scheduler shift (4.0, fixed); SimpleTuner's "base" flavour (no model_flavour with a local
    # folder: no assistant LoRA). FLUX.2's VAE and its batch-norm statistics: SimpleTuner's own caches.
    "ernie": ("ErnieImagePipeline", {"flow_schedule_shift": 4.0}),
    # FLUX.3 Image Klein base (SimpleTuner's default flavour, no assistant LoRA; no model_flavour with a local folder)
    # at its pipeline's shift (FLOW_SHIFT, 6.93, which SimpleTuner forces anyway); diffusers has no FLUX.3 pipeline,
    # SimpleTuner's own samples it. FLUX.2's VAE and its batch-norm statistics: SimpleTuner's own caches.
    "flux3_image": ("simpletuner.helpers.models.flux3_image.pipeline.Flux3ImagePipeline",
                    {"flow_schedule_shift": 6.93}),
    # MOSS-Image's "sft" flavour (no model_flavour with a local folder: text-to-image); SimpleTuner forces its
    # unshifted training schedule (TRAINING_SCHEDULES). diffusers has no MOSS pipeline, SimpleTuner's own samples it.
    # FLUX.2's VAE and its batch-norm statistics: SimpleTuner's own caches.
    "moss_image": ("simpletuner.helpers.models.moss_image.pipeline.MOSSImagePipeline", {}),
    # Krea 2 raw (no model_flavour with a local folder; the class has no flavour-specific code): its dynamically
    # shifted scheduler (TRAINING_SCHEDULES). Its pipeline guides at any scale above 0 (cond + g (cond - uncond)), so
    # SimpleTuner's validation samples the student unguided at 0. Qwen-Image's VAE normalisation: SimpleTuner's caches.
    "krea2": ("Krea2Pipeline", {"validation_guidance": 0.0}),
    # FLUX.2-klein base (klein-4b: the same code path as klein-9b), named: with a model path and no model_flavour
    # SimpleTuner runs dev's. Its dynamically shifted scheduler (TRAINING_SCHEDULES). FLUX.2's VAE and its batch-norm
    # statistics: SimpleTuner's own caches.
    "flux2": ("Flux2KleinPipeline", {"model_flavour": "klein-4b"}),
}
# Keyword arguments of a family's pipeline call: LongCat's rewrites the prompt with its text encoder by default.
PIPELINE_CALLS = {"longcat_image": {"enable_prompt_rewrite": False}}

# The schedule the student is distilled on where SimpleTuner does not take the folder's at flow_schedule_shift, or
# where that is dynamically shifted (Krea 2's):
# Qwen-Image's own (QwenImage.setup_training_noise_schedule, as Qwen/Qwen-Image's scheduler): the shift follows the
# latent's token count (mu: 16 tokens at 64 px), then the grid is stretched to end at sigma 0.02.
TRAINING_SCHEDULES = {
    "qwen_image": {"shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
                   "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02},
    # FLUX.3's own (Flux3Image.setup_training_noise_schedule): flow_schedule_shift, never dynamically shifted.
    "flux3_image": {"shift": 6.93, "use_dynamic_shifting": False},
    # MOSS-Image's own (MOSSImage.setup_training_noise_schedule): unshifted, whatever flow_schedule_shift says; its
    # pipeline samples at moss_image_validation_shift (5) instead.
    "moss_image": {"shift": 1.0, "use_dynamic_shifting": False},
    # Krea 2: the folder's at flow_schedule_shift, which its dynamic shifting ignores: mu follows the transformer's
    # token count (16 at 64 px) between krea/Krea-2-Raw's bounds.
    "krea2": {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
              "max_image_seq_len": 6400, "time_shift_type": "exponential"},
    # FLUX.2-klein: the folder's (Flux's bounds) at flow_schedule_shift, which its dynamic shifting ignores.
    "flux2": {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
              "max_image_seq_len": 4096},
}

# Families whose stock validation fails in SimpleTuner 4.10.1 before the quality check can run (the run trains on):
# its error. Z-Image Omni: get_pipeline(load_base_model=False) builds ZImageOmniPipeline from the loaded components
# only, and that pipeline requires the SigLIP tower and processor, which nothing passes.
STOCK_VALIDATION_FAILS = {
    "z_image_omni": "missing 2 required positional arguments: 'siglip' and 'siglip_processor'",
}


def data_path_families(families) -> list[str]:
    """The families whose datasets the plugin's data path serves (layout.FAMILIES); the others train on SimpleTuner's
    own caches (Qwen-Image: its 3-D VAE's latents_mean / latents_std normalisation is not the build's)."""
    from lcm_plugin.cache_build.layout import FAMILIES

    return [family for family in families if family in FAMILIES]


@pytest.fixture(scope="module", params=list(CFG_FAMILIES))
def cfg_family_run(request, tmp_path_factory):
    family = request.param
    return family, *shared_flow_run(tmp_path_factory, f"{family}-lcm", family,
                                    config={**validation_at(STEPS), **CFG_FAMILIES[family][1]},
                                    lcm={"quality_check": QUALITY_CHECK})


def test_a_cfg_family_lcm_lora_trains_and_samples_with_the_flow_lcm_scheduler(cfg_family_run):
    import importlib

    import diffusers
    import torch
    from diffusers import FlowMatchLCMScheduler
    from safetensors import safe_open

    from lcm_plugin.inference import pipeline_cfg_scale

    family, run, model, log = cfg_family_run
    losses = lcm_losses(run / "output" / "training_metrics.jsonl")
    assert len(losses) >= STEPS and all(math.isfinite(v) and v >= 0 for v in losses.values()), log[-4000:]
    if data_path_families([family]):
        assert SERVED_LINE in log, log[-4000:]
    else:  # one line, and SimpleTuner's own caches
        assert f"every dataset uses SimpleTuner's own caching: model_family {family!r}" in log, log[-4000:]
        assert SERVED_LINE not in log and sorted((run / "cache" / "vae").rglob("*.pt")), log[-4000:]
    if family in STOCK_VALIDATION_FAILS:  # SimpleTuner's own error (fails here once fixed upstream)
        assert f"Validation run failed at step {STEPS}" in log and STOCK_VALIDATION_FAILS[family] in log, log[-4000:]
    else:
        assert_the_quality_check_ran(run, log, STEPS)
    with safe_open(str(run / "output" / LORA_FILE), "pt") as lora:
        metadata, keys = lora.metadata(), list(lora.keys())
    assert keys and all(key.startswith("transformer.") for key in keys)
    scheduler_config = json.loads(metadata["lcm.scheduler_config"])
    assert scheduler_config["_class_name"] == "FlowMatchLCMScheduler", metadata
    # The grid the student was distilled on: SimpleTuner's training schedule (the folder's, at flow_schedule_shift).
    expected = TRAINING_SCHEDULES.get(family, {"shift": CFG_FAMILIES[family][1].get("flow_schedule_shift", 3.0)})
    assert {key: scheduler_config.get(key) for key in expected} == expected, scheduler_config
    # A dotted name: the family's pipeline where diffusers has none (SimpleTuner's own).
    module, _, name = CFG_FAMILIES[family][0].rpartition(".")
    pipeline = getattr(importlib.import_module(module) if module else diffusers, name).from_pretrained(model)
    pipeline.scheduler = FlowMatchLCMScheduler.from_config(scheduler_config)
    if hasattr(pipeline, "load_lora_weights"):
        pipeline.load_lora_weights(run / "output")
        assert pipeline.get_list_adapters() == {"transformer": ["default_0"]}
    else:  # diffusers' LongCatImagePipeline has no LoRA loader: its transformer's PEFT loader takes the file
        pipeline.transformer.load_lora_adapter(run / "output" / LORA_FILE, prefix="transformer",
                                               adapter_name="default_0")
        assert list(pipeline.transformer.peft_config) == ["default_0"]
    # By keyword: ZImageOmniPipeline takes reference images first. Unguided: guidance 1 (CFG's identity), except in a
    # pipeline that reads its scale as cond + g (cond - uncond) (diffusers' Z-Image's, Krea 2's): 0 there; 0 elsewhere
    # would guide MOSS-Image's to its unconditional branch alone.
    image = pipeline(prompt="red circle", num_inference_steps=4, guidance_scale=pipeline_cfg_scale(type(pipeline), 1.0),
                     height=64, width=64, generator=torch.Generator().manual_seed(0), output_type="np",
                     **PIPELINE_CALLS.get(family, {})).images[0]
    assert image.shape == (64, 64, 3) and bool((image >= 0).all())
    assert_sampled_unguided(pipeline)


def test_the_model_card_of_a_cfg_family_lora_samples_as_written(cfg_family_run, tmp_path, monkeypatch):
    """The card the run wrote (output/README.md), its code run as a user would: the base model and the LoRA it names,
    loaded by the pipeline's LoRA loader or, where diffusers' pipeline has none (LongCat-Image), its transformer's."""
    from test_run_outputs import card_snippet, run_snippet

    family, run, _, _ = cfg_family_run
    code = card_snippet((run / "output" / "README.md").read_text())
    assert ("pipeline.transformer.load_lora_adapter(" in code) == (family == "longcat_image"), code
    # Where diffusers has no pipeline of the family's (a dotted name in CFG_FAMILIES), SimpleTuner's own loads it.
    assert (f"{CFG_FAMILIES[family][0].rpartition('.')[2]} as DiffusionPipeline" in code) == (
        "." in CFG_FAMILIES[family][0]), code
    variables = run_snippet(code, tmp_path, monkeypatch, prompt="red circle")
    assert variables["image"].size == (64, 64)  # the validation resolution
    assert_sampled_unguided(variables["pipeline"])


def assert_sampled_unguided(pipeline) -> None:
    """By the pipeline's own rule (its do_classifier_free_guidance, at the scale of its last call), where it has one:
    the student, guidance distilled in, was sampled without CFG."""
    if isinstance(getattr(type(pipeline), "do_classifier_free_guidance", None), property):
        assert not pipeline.do_classifier_free_guidance, getattr(pipeline, "_guidance_scale", None)


@pytest.mark.parametrize("cfg_family_run", data_path_families(CFG_FAMILIES), indirect=True)
def test_a_cfg_family_trains_from_the_stores_with_simpletuners_own_caches(cfg_family_run, tmp_path):
    family, run, model, _ = cfg_family_run
    assert_the_caches_are_simpletuners(family, run, stock_caches(family, model, tmp_path, CFG_FAMILIES[family][1]))
