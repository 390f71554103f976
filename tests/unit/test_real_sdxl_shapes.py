"""The real SDXL geometry (lcm_plugin.real_sdxl) on the meta device: no weights, no memory, a few seconds.

Parameter counts are checked against the published sizes of stabilityai/stable-diffusion-xl-base-1.0 (UNet 2.6B,
text encoders 123M + 695M) and, for the text encoders, against a count by hand from CLIP's layer shapes. The
distiller's UNet calls at 1024 px (teacher, target, student) run through the real UNet on the meta device, where
torch still checks every shape: an input the real UNet does not accept raises, as it would on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from simpletuner.helpers.models.sdxl.model import SDXL
from simpletuner.helpers.training.collate import compute_time_ids
from test_distiller_parity import FakeUnetModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lcm_plugin.config import LcmConfig
from lcm_plugin.real_sdxl import CLIP_BIGG_ARCHITECTURE, CLIP_L_ARCHITECTURE, SDXL_UNET_CONFIG, VOCABULARY
from lcm_plugin.simpletuner.distiller import LcmDistiller
from lcm_plugin.tiny_sdxl import SDXL_SCHEDULER_CONFIG, clip_text_config, write_clip_tokenizer

META = torch.device("meta")
# diffusers' UNet2DConditionModel of SDXL base 1.0: 2,567,463,684 parameters ("2.6B" in the SDXL report).
SDXL_UNET_PARAMETERS = 2_567_463_684
IMAGE_SIZE = 1024
LATENT_SIZE = IMAGE_SIZE // 8
PROMPT_TOKENS = 77


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def clip_text_parameters_by_hand(
    vocab: int, hidden: int, intermediate: int, layers: int, projection: int | None
) -> int:
    """CLIP's text tower: token and position embeddings, per layer q/k/v/out projections with biases, two layer norms
    and a two-layer MLP with biases, a final layer norm, and (bigG) a bias-free text projection."""
    embeddings = vocab * hidden + PROMPT_TOKENS * hidden
    attention = 4 * (hidden * hidden + hidden)
    mlp = hidden * intermediate + intermediate + intermediate * hidden + hidden
    layer_norms = 2 * 2 * hidden
    final_norm = 2 * hidden
    text_projection = hidden * projection if projection else 0
    return embeddings + layers * (attention + mlp + layer_norms) + final_norm + text_projection


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"), VOCABULARY)


@pytest.fixture(scope="module")
def text_encoders(tokenizer_dir):
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    with META:
        return (
            CLIPTextModel(clip_text_config(tokenizer, **CLIP_L_ARCHITECTURE)),
            CLIPTextModelWithProjection(clip_text_config(tokenizer, **CLIP_BIGG_ARCHITECTURE)),
        )


def meta_unet() -> UNet2DConditionModel:
    with META:
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


def test_unet_has_sdxl_base_parameter_count():
    assert parameter_count(meta_unet()) == SDXL_UNET_PARAMETERS


def test_text_encoders_have_clip_l_and_bigg_parameter_counts(text_encoders):
    clip_l, clip_bigg = text_encoders
    by_hand_l = clip_text_parameters_by_hand(49408, 768, 3072, 12, projection=None)
    by_hand_bigg = clip_text_parameters_by_hand(49408, 1280, 5120, 32, projection=1280)
    assert parameter_count(clip_l) == by_hand_l
    assert parameter_count(clip_bigg) == by_hand_bigg
    # The published sizes: 123M (CLIP ViT-L/14 text) and 695M (OpenCLIP ViT-bigG/14 text + projection).
    assert by_hand_l == pytest.approx(123e6, rel=0.005)
    assert by_hand_bigg == pytest.approx(695e6, rel=0.005)


def simpletuner_text_embeddings(text_encoders, tokenizer_dir, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SimpleTuner's own SDXL prompt encoding (`SDXL._encode_prompts`) through the real-size encoders on meta."""
    sdxl = object.__new__(SDXL)
    sdxl.tokenizers = [CLIPTokenizer.from_pretrained(str(tokenizer_dir)) for _ in range(2)]
    sdxl.text_encoders = list(text_encoders)
    sdxl.accelerator = type("Accelerator", (), {"device": META})()
    return sdxl._encode_prompts(prompts)


class UnetCallRecorder:
    """Input and output shapes of every UNet forward, in call order."""

    def __init__(self, unet: torch.nn.Module):
        self.calls: list[dict] = []
        unet.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        del module
        names = ("sample", "timestep", "encoder_hidden_states")
        inputs = {**dict(zip(names, args)), **kwargs}
        added = inputs["added_cond_kwargs"]
        sample = output[0] if isinstance(output, tuple) else output.sample
        self.calls.append({
            "sample": tuple(inputs["sample"].shape),
            "timestep": tuple(inputs["timestep"].shape),
            "encoder_hidden_states": tuple(inputs["encoder_hidden_states"].shape),
            "text_embeds": tuple(added["text_embeds"].shape),
            "time_ids": tuple(added["time_ids"].shape),
            "output": tuple(sample.shape),
        })


def expected_call(batch_size: int) -> dict:
    latents = (batch_size, 4, LATENT_SIZE, LATENT_SIZE)
    return {
        "sample": latents,
        "timestep": (batch_size,),
        "encoder_hidden_states": (batch_size, PROMPT_TOKENS, 2048),
        "text_embeds": (batch_size, 1280),
        "time_ids": (batch_size, 6),
        "output": latents,
    }


@pytest.mark.parametrize("batch_size", [1, 2])
def test_distiller_feeds_the_real_unet_what_it_accepts_at_1024px(text_encoders, tokenizer_dir, batch_size):
    prompt_embeds, pooled_embeds = simpletuner_text_embeddings(
        text_encoders, tokenizer_dir, ["a photo of a red circle"] * batch_size
    )
    # SimpleTuner's collate: (original h, w, crop top, left, target h, w) from the latent's size.
    time_ids = compute_time_ids(
        (IMAGE_SIZE, IMAGE_SIZE), (4, LATENT_SIZE, LATENT_SIZE), torch.bfloat16, crop_coordinates=[0, 0]
    ).repeat(batch_size, 1)
    latents = torch.empty(batch_size, 4, LATENT_SIZE, LATENT_SIZE, device=META, dtype=torch.bfloat16)
    batch = {
        "latents": latents,
        "noise": torch.empty_like(latents),
        "encoder_hidden_states": prompt_embeds.to(torch.bfloat16),
        "add_text_embeds": pooled_embeds.to(torch.bfloat16),
        "added_cond_kwargs": {"text_embeds": pooled_embeds.to(torch.bfloat16), "time_ids": time_ids.to(META)},
    }
    unet = meta_unet().to(torch.bfloat16)
    with META:
        unet.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    recorder = UnetCallRecorder(unet)
    model = FakeUnetModel(unet, "epsilon")
    scheduler = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    distiller = LcmDistiller(model, noise_scheduler=scheduler, config=LcmConfig())

    prepared = distiller.prepare_batch(batch, model, {})
    student = model.model_predict(prepared)["model_prediction"]

    # Teacher (cond + uncond in one call), target, student; each accepted by the real UNet.
    assert recorder.calls == [expected_call(2 * batch_size), expected_call(batch_size), expected_call(batch_size)]
    assert student.shape == latents.shape
    assert prepared["lcm_target"].shape == latents.shape


def test_meta_forward_rejects_a_pooled_embedding_the_real_unet_does_not_take():
    # The check above can fail: the add-embedding layer wants 1280 pooled + 6 x 256 time features.
    unet = meta_unet()
    latents = torch.empty(1, 4, LATENT_SIZE, LATENT_SIZE, device=META)
    wrong = {"text_embeds": torch.empty(1, 768, device=META), "time_ids": torch.empty(1, 6, device=META)}
    with pytest.raises(RuntimeError):
        unet(latents, torch.zeros(1, dtype=torch.int64, device=META),
             encoder_hidden_states=torch.empty(1, PROMPT_TOKENS, 2048, device=META), added_cond_kwargs=wrong)
