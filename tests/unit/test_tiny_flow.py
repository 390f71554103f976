"""The tiny SD3, Flux, Chroma, Lumina 2, AuraFlow, Z-Image (and Omni), LongCat-Image, Qwen-Image, ERNIE-Image,
FLUX.3 Image Klein and Krea 2 folders (lcm_plugin.tiny_flow) load and run in diffusers
and in SimpleTuner 4.10.1.

diffusers: the family's own pipeline class (SimpleTuner's, where diffusers has none: FLUX.3, MOSS-Image) loads each
folder from its local path and samples a 64x64 image in one step. SimpleTuner: its model class for the folder's `model_family` (`model_type: lora`), built from a config parsed
by its own `parse_cmdline_args` as the trainer builds it, loads the folder with the functions the trainer calls
(`check_user_config`, `load_text_encoder` with `load_text_tokenizer`, `load_vae`, `load_model`); its own prompt
encoding then feeds its own `prepare_batch` / `model_predict` / `loss` on latents from the folder's VAE, so the
text encoders' output sizes are checked against what the transformer takes, by a forward and a backward.
SimpleTuner 4.10.1 loads AuraFlow's text encoder and tokenizer from the hub repo its class names, whatever the
folder: an offline hub cache serves the tiny folder under that name (HUB_TEXT_ENCODERS).
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hub_cache import HUB_TEXT_ENCODERS, offline_hub_cache  # noqa: E402

from lcm_plugin.tiny_flow import (
    AURAFLOW_SCHEDULER_CONFIG,
    ERNIE_SCHEDULER_CONFIG,
    FLUX3_IMAGE_SCHEDULER_CONFIG,
    FLUX_SCHEDULER_CONFIG,
    FLUX_VAE_FACTORS,
    KREA2_SCHEDULER_CONFIG,
    LONGCAT_IMAGE_TEMPLATE,
    LONGCAT_IMAGE_TEMPLATE_TOKENS,
    LUMINA2_SCHEDULER_CONFIG,
    MOSS_IMAGE_SCHEDULER_CONFIG,
    SD3_SCHEDULER_CONFIG,
    SD3_VAE_FACTORS,
    SDXL_VAE_FACTORS,
    QWEN_IMAGE_SCHEDULER_CONFIG,
    QWEN_IMAGE_TEMPLATE,
    QWEN_IMAGE_TEMPLATE_TOKENS,
    Z_IMAGE_OMNI_SCHEDULER_CONFIG,
    Z_IMAGE_SCHEDULER_CONFIG,
    save_tiny_flow,
    write_gemma_tokenizer,
    write_longcat_image_tokenizer,
    write_qwen2_5_vl_tokenizer,
    write_qwen_tokenizer,
    write_t5_tokenizer,
    write_tekken_tokenizer,
)

VOCABULARY = ("red", "blue", "circle", "square")
PROMPTS = ["red circle", "blue square"]
SIZE = 64
CLIP_TOKENS = 77

# family -> what the real checkpoint's model_index.json names, its T5 (or other last text encoder's) subfolders,
# scheduler, VAE latent channels and factors; SimpleTuner's class, its tokenizer_max_length after check_user_config,
# the prompt length its encoding gives, its tokenizer / encoder classes, and the transformer weights that take the
# prompt.
FAMILIES = {
    "sd3": dict(
        pipeline="StableDiffusion3Pipeline",
        index={
            "transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL",
            "scheduler": "FlowMatchEulerDiscreteScheduler",
            "text_encoder": "CLIPTextModelWithProjection", "text_encoder_2": "CLIPTextModelWithProjection",
            "text_encoder_3": "T5EncoderModel", "tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer",
            "tokenizer_3": "T5TokenizerFast",
        },
        t5=("text_encoder_3", "tokenizer_3"),
        scheduler=SD3_SCHEDULER_CONFIG,
        vae=SD3_VAE_FACTORS,
        latent_channels=16,
        simpletuner_class="SD3",
        t5_tokens=154,  # SD3.check_user_config's T5 length
        prompt_tokens=CLIP_TOKENS + 154,
        tokenizers=("CLIPTokenizer", "CLIPTokenizer", "T5TokenizerFast"),
        encoders=("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"),
        text_weights=("context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"),
    ),
    "flux": dict(
        pipeline="FluxPipeline",
        index={
            "transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL",
            "scheduler": "FlowMatchEulerDiscreteScheduler", "text_encoder": "CLIPTextModel",
            "text_encoder_2": "T5EncoderModel", "tokenizer": "CLIPTokenizer", "tokenizer_2": "T5TokenizerFast",
        },
        t5=("text_encoder_2", "tokenizer_2"),
        scheduler=FLUX_SCHEDULER_CONFIG,
        vae=FLUX_VAE_FACTORS,
        latent_channels=16,
        simpletuner_class="Flux",
        t5_tokens=512,  # Flux.check_user_config's T5 length
        prompt_tokens=512,
        tokenizers=("CLIPTokenizer", "T5TokenizerFast"),
        encoders=("CLIPTextModel", "T5EncoderModel"),
        text_weights=("context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"),
    ),
    "chroma": dict(
        pipeline="ChromaPipeline",
        index={
            "transformer": "ChromaTransformer2DModel", "vae": "AutoencoderKL",
            "scheduler": "FlowMatchEulerDiscreteScheduler", "text_encoder": "T5EncoderModel",
            "tokenizer": "T5TokenizerFast",
        },
        t5=("text_encoder", "tokenizer"),
        scheduler=FLUX_SCHEDULER_CONFIG,
        vae=FLUX_VAE_FACTORS,
        latent_channels=16,
        simpletuner_class="Chroma",
        t5_tokens=None,  # Chroma sets none; its _encode_prompts pads T5 prompts to 512
        prompt_tokens=512,
        tokenizers=("T5TokenizerFast",),
        encoders=("T5EncoderModel",),
        text_weights=("context_embedder.weight",),  # no pooled prompt: the approximator sees only the timestep
    ),
    "lumina2": dict(
        pipeline="Lumina2Pipeline",
        index={
            "transformer": "Lumina2Transformer2DModel", "vae": "AutoencoderKL",
            "scheduler": "FlowMatchEulerDiscreteScheduler", "text_encoder": "Gemma2Model",
            "tokenizer": "GemmaTokenizerFast",
        },
        t5=("text_encoder", "tokenizer"),  # Gemma 2, not T5
        scheduler=LUMINA2_SCHEDULER_CONFIG,
        vae=FLUX_VAE_FACTORS,
        latent_channels=16,
        simpletuner_class="Lumina2",
        t5_tokens=256,  # Lumina2.check_user_config's Gemma length
        prompt_tokens=256,
        tokenizers=("PreTrainedTokenizerFast",),  # SimpleTuner loads the generic class from tokenizer/
        encoders=("Gemma2Model",),
        text_weights=("time_caption_embed.caption_embedder.1.weight", "context_refiner.0.attn.to_q.weight"),
    ),
    "auraflow": dict(
        pipeline="AuraFlowPipeline",
        index={  # fal/AuraFlow-v0.3's model_index.json
            "transformer": "AuraFlowTransformer2DModel", "vae": "AutoencoderKL",
            "scheduler": "FlowMatchEulerDiscreteScheduler", "text_encoder": "UMT5EncoderModel",
            "tokenizer": "LlamaTokenizerFast",
        },
        t5=("text_encoder", "tokenizer"),  # Pile-T5 (UMT5 blocks) and its Llama-class tokenizer
        scheduler=AURAFLOW_SCHEDULER_CONFIG,
        vae=SDXL_VAE_FACTORS,  # AuraFlow ships SDXL's VAE
        latent_channels=4,  # Auraflow.LATENT_CHANNEL_COUNT
        simpletuner_class="Auraflow",
        t5_tokens=120,  # Auraflow.check_user_config's length (768 only for the pony flavour)
        prompt_tokens=120,
        tokenizers=("LlamaTokenizerFast",),  # Auraflow.TEXT_ENCODER_CONFIGURATION
        encoders=("UMT5EncoderModel",),
        # No pooled prompt; the caption projection, then the joint blocks' text stream.
        text_weights=("context_embedder.weight", "joint_transformer_blocks.0.attn.add_q_proj.weight"),
    ),
    "z_image": dict(
        pipeline="ZImagePipeline",
        index={  # Tongyi-MAI/Z-Image-Turbo's components
            "transformer": "ZImageTransformer2DModel", "vae": "AutoencoderKL",
            "scheduler": "FlowMatchEulerDiscreteScheduler", "text_encoder": "Qwen3ForCausalLM",
            "tokenizer": "Qwen2Tokenizer",
        },
        t5=("text_encoder", "tokenizer"),  # Qwen3, not T5
        scheduler=Z_IMAGE_SCHEDULER_CONFIG,
        vae=FLUX_VAE_FACTORS,  # Z-Image ships Flux's VAE
        latent_channels=16,
        simpletuner_class="ZImage",
        t5_tokens=None,  # Z-Image sets none; its _encode_prompts pads the chat-templated prompt to 512
        prompt_tokens=512,
        tokenizers=("Qwen2Tokenizer",),  # AutoTokenizer from tokenizer/
        encoders=("Qwen3ForCausalLM",),  # AutoModelForCausalLM from text_encoder/
        # The caption embedder, then the caption stream's refiner; the masked prompt tokens only reach them.
        text_weights=("cap_embedder.1.weight", "context_refiner.0.attention.to_q.weight"),
    ),
    "z_image_omni": dict(
        pipeline="ZImageOmniPipeline",
        index={  # Z-Image's components, plus the SigLIP 2 tower and processor both Omni pipelines take
            "transformer": "ZImageTransformer2DModel", "vae": "AutoencoderKL",
            "scheduler": "FlowMatchEulerDiscreteScheduler", "text_encoder": "Qwen3ForCausalLM",
            "tokenizer": "Qwen2Tokenizer", "siglip": "Siglip2VisionModel",
            "siglip_processor": "Siglip2ImageProcessor",
        },
        t5=("text_encoder", "tokenizer"),  # Qwen3, not T5
        scheduler=Z_IMAGE_OMNI_SCHEDULER_CONFIG,  # Z-Image base's fixed shift of 6
        vae=FLUX_VAE_FACTORS,
        latent_channels=16,
        simpletuner_class="ZImageOmni",
        t5_tokens=None,  # its _encode_prompts pads the ChatML-wrapped prompt to 512, as Z-Image's
        prompt_tokens=512,
        tokenizers=("Qwen2Tokenizer",),  # AutoTokenizer from tokenizer/
        encoders=("Qwen3ForCausalLM",),  # AutoModelForCausalLM from text_encoder/
        text_weights=("cap_embedder.1.weight", "context_refiner.0.attention.to_q.weight"),
    ),
    "qwen_image": dict(
        pipeline="QwenImagePipeline",
        index={  # Qwen/Qwen-Image's model_index.json (SimpleTuner's v1.0 flavour)
            "transformer": "QwenImageTransformer2DModel", "vae": "AutoencoderKLQwenImage",
            "scheduler": "FlowMatchEulerDiscreteScheduler", "text_encoder": "Qwen2_5_VLForConditionalGeneration",
            "tokenizer": "Qwen2Tokenizer",
        },
        t5=("text_encoder", "tokenizer"),  # Qwen2.5-VL, not T5
        scheduler=QWEN_IMAGE_SCHEDULER_CONFIG,
        vae={},  # no scaling or shift factor: latents are normalised by the VAE's latents_mean / latents_std
        latent_channels=16,
        simpletuner_class="QwenImage",
        t5_tokens=None,  # Qwen-Image sets none; its pipeline pads the prompt's states to 1024 (max_sequence_length)
        prompt_tokens=1024,
        tokenizers=("Qwen2Tokenizer",),  # QwenImage.TEXT_ENCODER_CONFIGURATION
        encoders=("Qwen2_5_VLForConditionalGeneration",),
        # The text input's norm and projection, then the MM-DiT blocks' text stream.
        text_weights=("txt_in.weight", "transformer_blocks.0.attn.add_q_proj.weight"),
    ),
    "longcat_image": dict(
        pipeline="LongCatImagePipeline",
        index={  # meituan-longcat/LongCat-Image's components (SimpleTuner's "final" flavour)
            "transformer": "LongCatImageTransformer2DModel", "vae": "AutoencoderKL",
            "scheduler": "FlowMatchEulerDiscreteScheduler", "text_encoder": "Qwen2_5_VLForConditionalGeneration",
            "tokenizer": "Qwen2Tokenizer", "text_processor": "Qwen2VLProcessor",
        },
        t5=("text_encoder", "tokenizer"),  # Qwen2.5-VL, not T5
        scheduler=FLUX_SCHEDULER_CONFIG,
        vae=FLUX_VAE_FACTORS,  # LongCat-Image ships Flux's VAE
        latent_channels=16,
        simpletuner_class="LongCatImage",
        t5_tokens=None,  # LongCat sets none; its pipeline pads the prompt to 512 tokens inside its fixed template
        prompt_tokens=512,
        tokenizers=("Qwen2Tokenizer",),  # LongCatImage.TEXT_ENCODER_CONFIGURATION
        encoders=("Qwen2_5_VLForConditionalGeneration",),
        # The caption projection, then the double stream blocks' text stream.
        text_weights=("context_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight"),
        # diffusers' pipeline rewrites the prompt with the text encoder by default (512 generated tokens)
        call={"enable_prompt_rewrite": False},
    ),
    "flux3_image": dict(
        # diffusers has no FLUX.3 pipeline: SimpleTuner's own (its Flux3Image.PIPELINE_CLASSES) loads the folder.
        pipeline="Flux3ImagePipeline",
        pipeline_module="simpletuner.helpers.models.flux3_image.pipeline",
        index={  # what Flux3ImagePipeline.from_pretrained loads (the tokenizer from text_encoder/, unnamed)
            "transformer": "Flux3ImageTransformer2DModel", "vae": "AutoencoderKLFlux2",
            "scheduler": "FlowMatchEulerDiscreteScheduler", "text_encoder": "Qwen3VLModel",
        },
        t5=("text_encoder", "text_encoder"),  # Qwen3-VL, not T5; its tokenizer sits beside it
        scheduler=FLUX3_IMAGE_SCHEDULER_CONFIG,
        training_shift=6.93,  # Flux3Image forces flow_schedule_shift to its pipeline's FLOW_SHIFT
        vae={},  # no scaling or shift factor: latents are normalised by the VAE's batch-norm statistics
        latent_channels=128,  # the VAE's 32, 2 x 2 patchified (Flux3Image.LATENT_CHANNEL_COUNT)
        vae_scale=16,  # 8x down, then the patchify
        simpletuner_class="Flux3Image",
        t5_tokens=8192,  # Flux3Image's default tokenizer_max_length (text.MAX_TEXT_LENGTH)
        prompt_tokens=80,  # the chat-templated prompt, padded to a multiple of 80 (text.TEXT_PADDING_MULTIPLE)
        tokenizers=("Qwen2Tokenizer",),  # AutoTokenizer from text_encoder/
        encoders=("Qwen3VLModel",),
        # The caption projection, then the text stream's own block.
        text_weights=("context_embedder.weight", "txt_mode_blocks.0.attn.to_q.weight"),
    ),
    "ernie": dict(
        pipeline="ErnieImagePipeline",
        index={  # baidu/ERNIE-Image's model_index.json, less its optional prompt enhancer (pe, pe_tokenizer)
            "transformer": "ErnieImageTransformer2DModel", "vae": "AutoencoderKLFlux2",
            "scheduler": "FlowMatchEulerDiscreteScheduler", "text_encoder": "Mistral3Model",
            "tokenizer": "TokenizersBackend",
        },
        t5=("text_encoder", "tokenizer"),  # Ministral 3 (in a Mistral3Model), not T5
        scheduler=ERNIE_SCHEDULER_CONFIG,
        vae={},  # no scaling or shift factor: latents are normalised by the VAE's batch-norm statistics
        latent_channels=128,  # the VAE's 32, 2 x 2 patchified (Ernie.LATENT_CHANNEL_COUNT)
        vae_scale=16,  # 8x down, then the patchify
        simpletuner_class="Ernie",
        t5_tokens=None,  # Ernie sets none; its _encode_prompts pads a batch to its longest prompt
        prompt_tokens=3,  # <s> and the two words
        tokenizers=("PreTrainedTokenizerFast",),  # Ernie builds one from tokenizer.json
        encoders=("Mistral3Model",),  # AutoModel from text_encoder/, with SimpleTuner's Mistral3Config
        # The text projection, then the single stream's attention over text and image tokens.
        text_weights=("text_proj.weight", "layers.0.self_attention.to_k.weight"),
    ),
    "krea2": dict(
        pipeline="Krea2Pipeline",
        index={  # krea/Krea-2-Raw's components (SimpleTuner's "raw" flavour)
            "transformer": "Krea2Transformer2DModel", "vae": "AutoencoderKLQwenImage",
            "scheduler": "FlowMatchEulerDiscreteScheduler", "text_encoder": "Qwen3VLModel",
            "tokenizer": "Qwen2Tokenizer",
        },
        t5=("text_encoder", "tokenizer"),  # Qwen3-VL, not T5
        scheduler=KREA2_SCHEDULER_CONFIG,
        vae={},  # no scaling or shift factor: latents are normalised by the VAE's latents_mean / latents_std
        latent_channels=16,
        simpletuner_class="Krea2",
        t5_tokens=None,  # Krea 2 sets none; its pipeline pads the prompt into a fixed 512-token block
        prompt_tokens=512,
        tokenizers=("Qwen2Tokenizer",),  # AutoTokenizer from tokenizer/
        encoders=("Qwen3VLModel",),
        # The fusion across the tapped layers, then the text projection into the single stream.
        text_weights=("text_fusion.layerwise_blocks.0.attn.to_q.weight", "txt_in.linear_1.weight"),
    ),
    "flux2": dict(
        pipeline="Flux2KleinPipeline",
        index={  # black-forest-labs/FLUX.2-klein-base-4B's model_index.json (and -9B's)
            "transformer": "Flux2Transformer2DModel", "vae": "AutoencoderKLFlux2",
            "scheduler": "FlowMatchEulerDiscreteScheduler", "text_encoder": "Qwen3ForCausalLM",
            "tokenizer": "Qwen2TokenizerFast",
        },
        # SimpleTuner picks Klein's Qwen3 path by flavour only: unset, a model path runs dev's (Mistral-3 from the hub)
        settings={"model_flavour": "klein-4b"},
        t5=("text_encoder", "tokenizer"),  # Qwen3, not T5
        scheduler=FLUX_SCHEDULER_CONFIG,  # FLUX.2's is Flux's, dynamically shifted
        vae={},  # no scaling or shift factor: latents are normalised by the VAE's batch-norm statistics
        latent_channels=128,  # the VAE's 32, 2 x 2 patchified (Flux2.LATENT_CHANNEL_COUNT)
        vae_scale=16,  # 8x down, then the patchify
        simpletuner_class="Flux2",
        t5_tokens=512,  # Flux2.check_user_config's MAX_SEQUENCE_LENGTH
        prompt_tokens=512,  # the chat-templated prompt, padded to 512
        tokenizers=("Qwen2TokenizerFast",),  # Flux2._load_text_encoder_qwen3, from tokenizer/
        encoders=("Qwen3ForCausalLM",),
        # The text projection, then the double stream block's text stream.
        text_weights=("context_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight"),
    ),
    "moss_image": dict(
        # diffusers has no MOSS-Image pipeline: SimpleTuner's own (its MOSSImage.PIPELINE_CLASSES) loads the folder.
        pipeline="MOSSImagePipeline",
        pipeline_module="simpletuner.helpers.models.moss_image.pipeline",
        index={  # what MOSSImagePipeline.from_pretrained loads
            "transformer": "MOSSImageTransformer", "vae": "AutoencoderKLFlux2", "scheduler": "MOSSImageScheduler",
            "text_encoder": "Qwen3_5Model", "tokenizer": "Qwen2Tokenizer",
        },
        t5=("text_encoder", "tokenizer"),  # Qwen3.5, not T5
        scheduler=MOSS_IMAGE_SCHEDULER_CONFIG,
        training_shift=1.0,  # MOSSImage forces flow_schedule_shift 1 and trains on its own unshifted schedule
        vae={},  # no scaling or shift factor: latents are normalised by the VAE's batch-norm statistics
        latent_channels=128,  # the VAE's 32, 2 x 2 patchified (MOSSImage.LATENT_CHANNEL_COUNT)
        vae_scale=16,  # 8x down, then the patchify
        simpletuner_class="MOSSImage",
        t5_tokens=4096,  # MOSSImage's default tokenizer_max_length (text.MAX_TEXT_LENGTH), a truncation limit only
        prompt_tokens=10,  # the chat-templated prompt, unpadded: "<|im_start|>user\n" ... "<|im_start|>assistant\n"
        tokenizers=("Qwen2Tokenizer",),  # MOSSImage.TEXT_ENCODER_CONFIGURATION
        encoders=("Qwen3_5Model",),
        # The text projection, then the first single-stream block's attention over image and text tokens.
        text_weights=("text_embedder.proj.weight", "layers.0.proj.k.weight"),
    ),
}

def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    return {family: save_tiny_flow(family, tmp_path_factory.mktemp(f"tiny-{family}"), seed=0, vocabulary=VOCABULARY)
            for family in FAMILIES}


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


def test_folder_has_the_real_checkpoints_layout_and_consistent_sizes(model_dirs, family):
    spec, folder = FAMILIES[family], model_dirs[family]
    index = read_json(folder / "model_index.json")
    assert index["_class_name"] == spec["pipeline"]
    # Components only ([library, class]): FLUX.2-klein's index also records its pipeline's is_distilled flag, Krea 2's
    # its text_encoder_select_layers.
    assert {k: v[1] for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and isinstance(v[0], str)} == spec["index"]
    for component in spec["index"]:
        assert (folder / component).is_dir(), component

    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    assert {k: scheduler[k] for k in spec["scheduler"]} == spec["scheduler"]
    assert scheduler.get("use_dynamic_shifting", False) is spec["scheduler"].get("use_dynamic_shifting", False)

    vae = read_json(folder / "vae" / "config.json")
    if family in OWN_VAE_CHECKS:  # a VAE other than the 1/8 AutoencoderKL: the family's own check
        OWN_VAE_CHECKS[family](folder, vae, read_json(folder / "transformer" / "config.json"))
        return
    assert vae["latent_channels"] == spec["latent_channels"] and len(vae["block_out_channels"]) == 4  # latents 1/8
    assert {k: vae[k] for k in spec["vae"]} == spec["vae"]
    # SD3's and Flux's 16-channel VAEs have no quant convs; SDXL's (AuraFlow's) has both, and no shift factor.
    quant_convs = spec["latent_channels"] == 4
    assert vae["use_quant_conv"] is quant_convs and vae["use_post_quant_conv"] is quant_convs
    assert (vae.get("shift_factor") is None) is quant_convs

    transformer = read_json(folder / "transformer" / "config.json")
    if family == "longcat_image":
        assert_the_longcat_image_folder_is_consistent(folder, transformer)
        return
    if family == "lumina2":
        gemma = read_json(folder / "text_encoder" / "config.json")
        assert gemma["model_type"] == "gemma2" and gemma["hidden_size"] == transformer["cap_feat_dim"]
        assert not (folder / "tokenizer" / "tokenizer.model").exists()  # built offline, no sentencepiece model
        assert read_json(folder / "tokenizer" / "tokenizer_config.json")["padding_side"] == "right"
        head = transformer["hidden_size"] // transformer["num_attention_heads"]
        assert sum(transformer["axes_dim_rope"]) == head
        assert transformer["axes_lens"][0] > 256  # caption positions first, up to tokenizer_max_length
        assert transformer["in_channels"] == 16 and transformer["patch_size"] == 2
        return
    if family in ("z_image", "z_image_omni"):
        qwen = read_json(folder / "text_encoder" / "config.json")
        assert qwen["model_type"] == "qwen3" and qwen["hidden_size"] == transformer["cap_feat_dim"]
        assert qwen["num_hidden_layers"] >= 2  # Z-Image reads the second-to-last hidden states
        tokenizer = read_json(folder / "tokenizer" / "tokenizer_config.json")
        assert tokenizer["padding_side"] == "right" and "enable_thinking" in tokenizer["chat_template"]
        assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()
        head = transformer["dim"] // transformer["n_heads"]
        assert sum(transformer["axes_dims"]) == head
        assert transformer["axes_lens"][0] > 512 + 1  # caption positions first, up to the 512-token prompt
        assert transformer["in_channels"] == 16 and transformer["all_patch_size"] == [2]
        if family == "z_image":
            assert "siglip_feat_dim" not in transformer  # as the real config; SimpleTuner's class does not take it
            return
        # The SigLIP stream: the vision tower's width is the transformer's siglip_feat_dim.
        siglip = read_json(folder / "siglip" / "config.json")
        assert siglip["model_type"] == "siglip2_vision_model"
        assert siglip["hidden_size"] == transformer["siglip_feat_dim"]
        processor = read_json(folder / "siglip_processor" / "preprocessor_config.json")
        assert processor["image_processor_type"] == "Siglip2ImageProcessor"
        assert processor["patch_size"] == siglip["patch_size"] and processor["max_num_patches"] == siglip["num_patches"]
        return
    t5 = read_json(folder / spec["t5"][0] / "config.json")
    assert t5["d_model"] == transformer["joint_attention_dim"]
    assert t5["feed_forward_proj"] == "gated-gelu"  # T5 v1.1
    # Built offline, no sentencepiece model (T5's spiece.model, Pile-T5's Llama tokenizer.model).
    assert not list((folder / spec["t5"][1]).glob("*.model"))
    width = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    if family == "auraflow":
        assert t5["model_type"] == "umt5"  # Pile-T5: a relative position bias in every layer
        assert read_json(folder / "tokenizer" / "tokenizer_config.json")["padding_side"] == "right"
        assert transformer["caption_projection_dim"] == width
        assert transformer["in_channels"] == transformer["out_channels"] == 4 and transformer["patch_size"] == 2
        side = math.isqrt(transformer["pos_embed_max_size"])
        assert side * side == transformer["pos_embed_max_size"] and side >= SIZE // 8 // 2  # a square of patches
    elif family == "chroma":
        assert transformer["in_channels"] == 4 * 16 and transformer["patch_size"] == 1  # Flux's 2x2 packing
        assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
        assert transformer["approximator_num_channels"] % 4 == 0
        assert "pooled_projection_dim" not in transformer and "guidance_embeds" not in transformer
        assert "out_channels" not in transformer
    elif family == "sd3":
        clip_l = read_json(folder / "text_encoder" / "config.json")
        clip_g = read_json(folder / "text_encoder_2" / "config.json")
        assert transformer["pooled_projection_dim"] == clip_l["projection_dim"] + clip_g["projection_dim"]
        assert clip_l["hidden_size"] + clip_g["hidden_size"] < t5["d_model"]  # CLIP states are padded up to T5's
        assert transformer["caption_projection_dim"] == width
        assert transformer["in_channels"] == transformer["out_channels"] == 16
        assert transformer["dual_attention_layers"] == [0] and transformer["qk_norm"] == "rms_norm"  # SD3.5
        assert clip_l["hidden_act"] == "quick_gelu" and clip_g["hidden_act"] == "gelu"
    else:
        clip = read_json(folder / "text_encoder" / "config.json")
        assert transformer["pooled_projection_dim"] == clip["hidden_size"]  # CLIPTextModel's pooler output
        assert transformer["in_channels"] == 4 * 16 and transformer["patch_size"] == 1  # 2x2 packed latents
        assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
        assert transformer["guidance_embeds"] is True  # FLUX.1-dev
        assert "out_channels" not in transformer  # as FLUX.1-dev's config; SimpleTuner's class does not take it


def assert_the_qwen_image_folder_is_consistent(folder: Path, vae: dict, transformer: dict) -> None:
    """Qwen-Image's sizes: Qwen2.5-VL's text width == joint_attention_dim, its vision tower projects to it; the 3-D
    VAE's 16 latent channels (z_dim, 8x down: 3 downsamples) packed 2 x 2 into in_channels; the rope axes sum to the
    head size; the transformer config names only what SimpleTuner's class takes."""
    qwen = read_json(folder / "text_encoder" / "config.json")
    assert qwen["model_type"] == "qwen2_5_vl"
    assert qwen["text_config"]["hidden_size"] == transformer["joint_attention_dim"]
    assert qwen["vision_config"]["out_hidden_size"] == transformer["joint_attention_dim"]
    text = qwen["text_config"]
    head = text["hidden_size"] // text["num_attention_heads"]
    assert 2 * sum(text["rope_parameters"]["mrope_section"]) == head  # multimodal RoPE over the whole head
    tokenizer = read_json(folder / "tokenizer" / "tokenizer_config.json")
    assert tokenizer["tokenizer_class"] == "Qwen2Tokenizer" and tokenizer["padding_side"] == "right"
    assert vae["z_dim"] == 16 and len(vae["dim_mult"]) == 4 and len(vae["temperal_downsample"]) == 3
    assert len(vae["latents_mean"]) == len(vae["latents_std"]) == vae["z_dim"]
    assert transformer["in_channels"] == 4 * vae["z_dim"] and transformer["out_channels"] == vae["z_dim"]
    assert transformer["patch_size"] == 2 and sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    assert not {"zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"} & set(transformer)
    assert not (folder / "processor").exists()  # the text-to-image pipeline takes no processor


def assert_the_flux3_image_folder_is_consistent(folder: Path, vae: dict, transformer: dict) -> None:
    """FLUX.3's sizes, as SimpleTuner's flux3_image wires them: the transformer's text input is Qwen3-VL's width
    times the hidden states text.TEXT_LAYERS concatenates (so the encoder has that many layers), its vision tower
    projects to that width; the FLUX.2 VAE's 32 latent channels (8x down) patchified 2 x 2 into in_channels, batch
    norm over those; the rope axes sum to the head size; the tokenizer, with a chat template, in text_encoder/."""
    from simpletuner.helpers.models.flux3_image.text import TEXT_LAYERS

    qwen = read_json(folder / "text_encoder" / "config.json")
    assert qwen["model_type"] == "qwen3_vl"
    text = qwen["text_config"]
    assert text["num_hidden_layers"] >= max(TEXT_LAYERS)
    assert transformer["joint_attention_dim"] == len(TEXT_LAYERS) * text["hidden_size"]
    assert qwen["vision_config"]["out_hidden_size"] == text["hidden_size"]
    assert 2 * sum(text["rope_parameters"]["mrope_section"]) == text["head_dim"]  # multimodal RoPE over the head
    assert vae["latent_channels"] == 32 and len(vae["block_out_channels"]) == 4 and vae["patch_size"] == [2, 2]
    assert transformer["in_channels"] == transformer["cond_in_channels"] == 4 * vae["latent_channels"]
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    assert transformer["flow_map"] is False  # the base, flow-matching checkpoint
    tokenizer = read_json(folder / "text_encoder" / "tokenizer_config.json")
    assert tokenizer["tokenizer_class"] == "Qwen2Tokenizer" and tokenizer["chat_template"]
    assert not (folder / "tokenizer").exists()


def assert_the_flux2_klein_folder_is_consistent(folder: Path, vae: dict, transformer: dict) -> None:
    """FLUX.2-klein base's sizes, as SimpleTuner's klein flavours and diffusers' pipeline wire them: the transformer's
    text input is Qwen3's width times the hidden states both stack (KLEIN_OUTPUT_LAYERS, the pipeline's default
    text_encoder_out_layers), so the encoder has that many layers; no guidance embedding and is_distilled false (the
    base model samples with CFG); FLUX.2's VAE (32 channels, 8x down) patchified 2 x 2 into in_channels; the rope
    axes sum to the head size; Qwen3's chat template with its no-thinking block, padded on the right."""
    import inspect

    from diffusers import Flux2KleinPipeline
    from simpletuner.helpers.models.flux2.model import KLEIN_OUTPUT_LAYERS

    layers = inspect.signature(Flux2KleinPipeline.__call__).parameters["text_encoder_out_layers"].default
    assert tuple(layers) == KLEIN_OUTPUT_LAYERS
    qwen = read_json(folder / "text_encoder" / "config.json")
    assert qwen["model_type"] == "qwen3" and qwen["num_hidden_layers"] >= max(KLEIN_OUTPUT_LAYERS)
    assert transformer["joint_attention_dim"] == len(KLEIN_OUTPUT_LAYERS) * qwen["hidden_size"]
    assert transformer["guidance_embeds"] is False and read_json(folder / "model_index.json")["is_distilled"] is False
    assert vae["latent_channels"] == 32 and len(vae["block_out_channels"]) == 4 and vae["patch_size"] == [2, 2]
    assert transformer["in_channels"] == 4 * vae["latent_channels"] and transformer["patch_size"] == 1
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    tokenizer = read_json(folder / "tokenizer" / "tokenizer_config.json")
    assert "enable_thinking" in tokenizer["chat_template"] and tokenizer["padding_side"] == "right"


def assert_the_ernie_folder_is_consistent(folder: Path, vae: dict, transformer: dict) -> None:
    """ERNIE-Image's sizes: Ministral 3's width == text_in_dim == what SimpleTuner's Ernie accepts (TEXT_EMBED_DIM),
    and >= 2 layers (both read the second-to-last hidden states); FLUX.2's VAE (32 channels, 2 x 2 patchified to the
    transformer's 128); the rope axes sum to the head size; a trained (non-zero) output layer."""
    from safetensors.torch import load_file
    from simpletuner.helpers.models.ernie.model import Ernie

    mistral3 = read_json(folder / "text_encoder" / "config.json")
    text = mistral3["text_config"]
    assert mistral3["model_type"] == "mistral3" and text["model_type"] == "mistral"
    assert mistral3["vision_config"]["model_type"] == "pixtral"
    assert text["hidden_size"] == transformer["text_in_dim"] == Ernie.TEXT_EMBED_DIM and text["num_hidden_layers"] >= 2
    tokenizer = read_json(folder / "tokenizer" / "tokenizer_config.json")
    assert tokenizer["tokenizer_class"] == "TokenizersBackend"
    assert (tokenizer["bos_token"], tokenizer["eos_token"], tokenizer["pad_token"]) == ("<s>", "</s>", "<pad>")
    vocabulary = read_json(folder / "tokenizer" / "tokenizer.json")["model"]["vocab"]
    assert vocabulary["[IMG]"] == mistral3["image_token_index"] and vocabulary["<s>"] == text["bos_token_id"]
    assert vae["latent_channels"] == 32 and len(vae["block_out_channels"]) == 4 and vae["patch_size"] == [2, 2]
    assert transformer["in_channels"] == transformer["out_channels"] == 4 * vae["latent_channels"]
    assert transformer["patch_size"] == 1
    assert sum(transformer["rope_axes_dim"]) == transformer["hidden_size"] // transformer["num_attention_heads"]
    weights = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.count_nonzero(weights[name]) for name in ("final_linear.weight", "adaLN_modulation.1.weight"))
    assert not (folder / "pe").exists()  # the optional prompt enhancer: neither SimpleTuner nor these tests load it


def assert_the_krea2_folder_is_consistent(folder: Path, vae: dict, transformer: dict) -> None:
    """Krea 2's sizes, as SimpleTuner's Krea2Pipeline wires them (it builds the one it encodes prompts with from the
    loaded components, so with its default taps): Qwen3-VL's text width == text_hidden_dim, its layers cover the
    taps and the transformer fuses that many; the Qwen-Image VAE's 16 channels packed 2 x 2; the rope axes sum to the
    head size; the template's system turn and assistant suffix tokenize to the counts the pipeline drops and
    reserves."""
    from simpletuner.helpers.models.krea2.pipeline import Krea2Pipeline
    from transformers import Qwen2Tokenizer

    pipeline = Krea2Pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    taps = pipeline.text_encoder_select_layers
    assert tuple(read_json(folder / "model_index.json")["text_encoder_select_layers"]) == taps
    qwen = read_json(folder / "text_encoder" / "config.json")
    text = qwen["text_config"]
    assert qwen["model_type"] == "qwen3_vl" and text["num_hidden_layers"] >= max(taps)
    assert text["hidden_size"] == transformer["text_hidden_dim"] == qwen["vision_config"]["out_hidden_size"]
    assert transformer["num_text_layers"] == len(taps)
    assert 2 * sum(text["rope_parameters"]["mrope_section"]) == text["head_dim"]  # multimodal RoPE over the head
    assert vae["z_dim"] == 16 and len(vae["dim_mult"]) == 4 and len(vae["temperal_downsample"]) == 3
    assert transformer["in_channels"] == 4 * vae["z_dim"]
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    tokenizer = Qwen2Tokenizer.from_pretrained(str(folder / "tokenizer"))
    assert len(tokenizer(pipeline.prompt_template_encode_prefix).input_ids) == pipeline.prompt_template_encode_start_idx
    suffix = tokenizer(pipeline.prompt_template_encode_suffix).input_ids
    assert len(suffix) == pipeline.prompt_template_encode_num_suffix_tokens


def assert_the_moss_image_folder_is_consistent(folder: Path, vae: dict, transformer: dict) -> None:
    """MOSS-Image's sizes, as SimpleTuner's MOSSImage and MOSSImagePipeline wire them: Qwen3.5's text width ==
    text_dim, its vision tower projects to it, its mrope sections cover the rotary half of the head; FLUX.2's VAE
    (32 channels, 8x down) patchified 2 x 2 into latent_channels; the blocks include the pipeline's default
    negative-branch skip layers, which every call checks; Qwen3's chat template, asked for with thinking on."""
    import inspect

    from simpletuner.helpers.models.moss_image.model import MOSSImage
    from simpletuner.helpers.models.moss_image.pipeline import MOSSImagePipeline

    qwen = read_json(folder / "text_encoder" / "config.json")
    text = qwen["text_config"]
    assert qwen["model_type"] == "qwen3_5" and text["model_type"] == "qwen3_5_text"
    assert text["hidden_size"] == transformer["text_dim"] == qwen["vision_config"]["out_hidden_size"]
    rope = text["rope_parameters"]
    assert 2 * sum(rope["mrope_section"]) == text["head_dim"] * rope["partial_rotary_factor"]
    assert vae["latent_channels"] == 32 and len(vae["block_out_channels"]) == 4 and vae["patch_size"] == [2, 2]
    assert transformer["latent_channels"] == 4 * vae["latent_channels"] == MOSSImage.LATENT_CHANNEL_COUNT
    skipped = inspect.signature(MOSSImagePipeline.__call__).parameters["uncond_skip_layers"].default
    assert max(skipped) < transformer["num_layers"]
    tokenizer = read_json(folder / "tokenizer" / "tokenizer_config.json")
    assert "enable_thinking" in tokenizer["chat_template"] and tokenizer["padding_side"] == "right"


def assert_the_longcat_image_folder_is_consistent(folder: Path, transformer: dict) -> None:
    """LongCat-Image's sizes: Qwen2.5-VL's text width == joint_attention_dim, its vision tower projects to it; Flux's
    2 x 2 packing and rope axes; text_processor/ loads with AutoProcessor (as SimpleTuner loads it) over the same
    tokenizer, with a chat template (the prompt rewrite's)."""
    from transformers import AutoProcessor, Qwen2Tokenizer, Qwen2VLProcessor

    qwen = read_json(folder / "text_encoder" / "config.json")
    assert qwen["model_type"] == "qwen2_5_vl"
    assert qwen["text_config"]["hidden_size"] == transformer["joint_attention_dim"]
    assert qwen["vision_config"]["out_hidden_size"] == transformer["joint_attention_dim"]
    assert transformer["in_channels"] == 4 * 16 and transformer["patch_size"] == 1  # 2x2 packed latents
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    processor = AutoProcessor.from_pretrained(str(folder), subfolder="text_processor")
    tokenizer = Qwen2Tokenizer.from_pretrained(str(folder / "tokenizer"))
    assert type(processor) is Qwen2VLProcessor and processor.chat_template
    assert processor.tokenizer(LONGCAT_IMAGE_TEMPLATE).input_ids == tokenizer(LONGCAT_IMAGE_TEMPLATE).input_ids


def test_longcat_tokenizer_drops_exactly_the_template_as_simpletuners_pipeline_does(tmp_path):
    """SimpleTuner's LongCatImagePipeline.encode_prompt drops a fixed 36 tokens before the prompt and 5 after it."""
    from transformers import Qwen2Tokenizer

    from lcm_plugin.demo import shapes

    prefix, _, suffix = LONGCAT_IMAGE_TEMPLATE.partition("{}")
    for words in ((), VOCABULARY, shapes.VOCABULARY):
        folder = write_longcat_image_tokenizer(tmp_path / str(len(words)), words)
        tokenizer = Qwen2Tokenizer.from_pretrained(str(folder))
        tokens = [tokenizer.convert_ids_to_tokens(tokenizer(part, add_special_tokens=False).input_ids)
                  for part in (prefix, suffix)]
        assert tuple(map(len, tokens)) == LONGCAT_IMAGE_TEMPLATE_TOKENS, tokens
        assert tokens[1] == ["<|im_end|>", "\u010a", "<|im_start|>", "assistant", "\u010a"]
        assert tokens[0][:4] == ["<|im_start|>", "system", "\u010a", "As"] and tokens[0][-2:] == ["user", "\u010a"]


def test_qwen2_5_vl_tokenizer_drops_exactly_the_template_as_qwen_image_does(tmp_path):
    from transformers import AutoTokenizer, Qwen2Tokenizer

    folder = write_qwen2_5_vl_tokenizer(tmp_path / "qwen2_5_vl", VOCABULARY)
    tokenizer = Qwen2Tokenizer.from_pretrained(str(folder))
    assert type(AutoTokenizer.from_pretrained(str(folder))) is Qwen2Tokenizer
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token is None and tokenizer.padding_side == "right"
    prefix = QWEN_IMAGE_TEMPLATE.partition("{}")[0]
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prefix).input_ids)
    assert len(tokens) == QWEN_IMAGE_TEMPLATE_TOKENS  # what the real vocabulary gives: the pipeline drops that many
    newline = "\u010a"  # byte-level "\n"
    assert tokens[:4] == ["<|im_start|>", "system", newline, "Describe"]
    assert tokens[-3:] == ["<|im_start|>", "user", newline]
    ids = tokenizer([QWEN_IMAGE_TEMPLATE.format(p) for p in ("red circle", "a blue square")], padding=True).input_ids
    prompt = tokenizer.convert_ids_to_tokens(ids[0])[QWEN_IMAGE_TEMPLATE_TOKENS:]
    assert prompt[:3] == ["red", "\u0120circle", "<|im_end|>"]
    assert tokenizer.decode(ids[1], skip_special_tokens=False) == QWEN_IMAGE_TEMPLATE.format("a blue square")
    for special in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"):
        assert tokenizer.convert_ids_to_tokens(tokenizer(special).input_ids) == [special]


def test_t5_tokenizer_is_built_offline(tmp_path):
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(str(write_t5_tokenizer(tmp_path / "t5", VOCABULARY)))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)  # T5's ids
    assert tokenizer.model_max_length == 512
    encoded = tokenizer(["red circle", "Blue squares é"], padding="max_length", max_length=12, truncation=True)
    assert tokenizer.convert_ids_to_tokens(encoded.input_ids[0])[:4] == ["\u2581red", "\u2581circle", "</s>", "<pad>"]
    assert encoded.attention_mask[0] == [1, 1, 1] + [0] * 9
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids[1])
    assert tokens[:4] == ["\u2581B", "l", "u", "e"] and "\u2581square" in tokens and "<unk>" in tokens
    assert tokenizer.decode(tokenizer("Blue squares!").input_ids, skip_special_tokens=True) == "Blue squares!"


def test_gemma_tokenizer_is_built_offline(tmp_path):
    from transformers import AutoTokenizer, GemmaTokenizerFast, PreTrainedTokenizerFast

    specials, first, last = ("<pad>", "<eos>", "<bos>", "<unk>"), "<bos>", None  # Gemma: <bos> first, no <eos>
    folder = write_gemma_tokenizer(tmp_path / "gemma", VOCABULARY)
    assert sorted(path.name for path in folder.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]  # no sentencepiece model
    named = GemmaTokenizerFast
    loaded = [cls.from_pretrained(str(folder)) for cls in (named, AutoTokenizer, PreTrainedTokenizerFast)]
    assert type(loaded[1]) is named
    prompts = [" red circle", " Blue squares é"]
    encodings = [tokenizer(prompts, padding="max_length", max_length=14) for tokenizer in loaded]
    assert all(e.input_ids == encodings[0].input_ids for e in encodings)  # one pipeline, whatever loads it
    tokenizer, encoded = loaded[0], encodings[0]
    assert [tokenizer.convert_tokens_to_ids(t) for t in specials] == [0, 1, 2, 3]
    assert tokenizer.pad_token_id == specials.index("<pad>") and tokenizer.padding_side == "right"
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids[0])
    words = ["\u2581red", "\u2581circle"]
    assert [t for t in tokens if t != "<pad>"] == ([first] if first else []) + words + ([last] if last else [])
    assert tokens[-1] == "<pad>" and encoded.attention_mask[0] == [1] * (len(words) + 1) + [0] * 11  # right padding
    other = tokenizer.convert_ids_to_tokens(encoded.input_ids[1])
    assert "\u2581square" in other and "<0xC3>" in other and "<unk>" not in other  # byte fallback, no unknowns
    assert tokenizer.decode(encoded.input_ids[1], skip_special_tokens=True).strip() == "Blue squares é"


def test_qwen_tokenizer_is_built_offline_with_qwen3s_chat_template(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

    folder = write_qwen_tokenizer(tmp_path / "qwen", VOCABULARY)
    loaded = [cls.from_pretrained(str(folder)) for cls in (Qwen2Tokenizer, AutoTokenizer, PreTrainedTokenizerFast)]
    assert type(loaded[1]) is Qwen2Tokenizer
    tokenizer = loaded[0]
    # As Z-Image's _encode_prompts (SimpleTuner's and diffusers') asks for it.
    text = tokenizer.apply_chat_template([{"role": "user", "content": "red circle"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\nred circle<|im_end|>\n<|im_start|>assistant\n"
    unthinking = tokenizer.apply_chat_template([{"role": "user", "content": "red circle"}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False)
    assert unthinking == text + "<think>\n\n</think>\n\n"
    encodings = [t([text, "Blue squares é"], padding="max_length", max_length=16) for t in loaded]
    assert all(e.input_ids == encodings[0].input_ids for e in encodings)  # one pipeline, whatever loads it
    encoded = encodings[0]
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids[0])
    assert tokens[:6] == ["<|im_start|>", "user", "\u010a", "red", "\u0120circle", "<|im_end|>"]  # no BOS
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokens[-1] == "<|endoftext|>" and encoded.attention_mask[0] == [1] * 10 + [0] * 6  # right padding
    other = tokenizer.convert_ids_to_tokens(encoded.input_ids[1])
    assert "\u0120square" in other and "\u00c3" in other  # byte-level: no unknowns
    assert tokenizer.decode(encoded.input_ids[1], skip_special_tokens=True) == "Blue squares é"


def test_ernie_tekken_tokenizer_reads_the_same_through_simpletuners_and_diffusers_loaders(tmp_path):
    """SimpleTuner's Ernie builds a PreTrainedTokenizerFast from tokenizer.json and the config's special tokens
    (_load_ernie_tokenizer); diffusers' pipeline loads the folder with AutoTokenizer: one pipeline either way, <s>
    first and the Tekken specials at their real ids."""
    from simpletuner.helpers.models.ernie.model import Ernie
    from transformers import AutoTokenizer

    folder = write_tekken_tokenizer(tmp_path / "tekken", VOCABULARY)
    built = Ernie._build_ernie_tokenizer(str(folder / "tokenizer.json"), read_json(folder / "tokenizer_config.json"))
    loaded = AutoTokenizer.from_pretrained(str(folder))
    prompts = ["red circle", "Blue squares é"]
    encodings = [tokenizer(prompts, padding="longest") for tokenizer in (built, loaded)]
    assert encodings[0].input_ids == encodings[1].input_ids
    assert [built.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "[IMG]", "<pad>")] == [0, 1, 2, 10, 11]
    tokens = built.convert_ids_to_tokens(encodings[0].input_ids[0])
    assert tokens[:3] == ["<s>", "red", "\u0120circle"] and tokens[-1] == "<pad>"  # no </s>, padded on the right
    other = built.convert_ids_to_tokens(encodings[0].input_ids[1])
    assert "\u0120square" in other and "<unk>" not in other  # byte-level: no unknowns
    assert built.decode(encodings[0].input_ids[1], skip_special_tokens=True) == "Blue squares é"


def test_same_seed_writes_the_same_weights(model_dirs, tmp_path):
    from safetensors.torch import load_file

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")

    base = weights(model_dirs["flux"])
    again = weights(save_tiny_flow("flux", tmp_path / "again", seed=0, vocabulary=VOCABULARY))
    other = weights(save_tiny_flow("flux", tmp_path / "other", seed=1, vocabulary=VOCABULARY))
    assert base.keys() == again.keys() == other.keys()
    assert all(torch.equal(base[k], again[k]) for k in base)
    assert not all(torch.equal(base[k], other[k]) for k in base)


def test_diffusers_pipeline_samples_a_64px_image(model_dirs, family):
    import importlib

    spec = FAMILIES[family]
    module = importlib.import_module(spec.get("pipeline_module", "diffusers"))
    pipeline = getattr(module, spec["pipeline"]).from_pretrained(str(model_dirs[family]))
    pipeline.set_progress_bar_config(disable=True)
    # Qwen-Image's terminal stretch divides by 1 - sigma_last, 0 for a one-step schedule (NaN in diffusers): 2 steps.
    steps = 2 if family == "qwen_image" else 1
    call = FAMILIES[family].get("call", {})
    images = pipeline(prompt=PROMPTS[0], num_inference_steps=steps, height=SIZE, width=SIZE, output_type="np",
                      generator=torch.Generator().manual_seed(0), **call).images
    assert images.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(images).all()
    pil = pipeline(prompt=PROMPTS[0], num_inference_steps=steps, height=SIZE, width=SIZE,
                   generator=torch.Generator().manual_seed(0), **call).images[0]
    assert pil.size == (SIZE, SIZE)


def encode_captions(model, prompts: list[str]) -> dict:
    """`model._format_text_embedding(model._encode_prompts(prompts))`, a row per prompt. LongCat-Image's encode_prompt
    encodes only its first prompt (SimpleTuner's text cache calls it one caption at a time, at its default
    text_encoder_batch_size 1): one call per caption then, the prompt_embeds batched by its collate_prompt_embeds."""
    embeds = model._format_text_embedding(model._encode_prompts(list(prompts)))
    if embeds["prompt_embeds"].shape[0] == len(prompts):
        return embeds
    each = [model._format_text_embedding(model._encode_prompts([prompt])) for prompt in prompts]
    return {**each[0], **model.collate_prompt_embeds(each)}


def load_with_simpletuner(family: str, folder: Path, root: Path, **settings):
    """SimpleTuner's model object for `family` with `folder` loaded as its trainer loads it (CPU, fp32); `settings`
    are config.json keys on top of a LoRA run's and the family spec's own (FAMILIES' `settings`)."""
    from simpletuner.helpers.configuration.cmd_args import parse_cmdline_args
    from simpletuner.helpers.configuration.json_file import normalize_args
    from simpletuner.helpers.models.registry import ModelRegistry

    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), num_processes=1, local_process_index=0,  # Flux2's text encoder load logs it
        unwrap_model=lambda model, keep_fp32_wrapper=True: model, wait_for_everyone=lambda: None,
    )
    config = {
        "model_family": family, "model_type": "lora", "lora_type": "standard", "lora_rank": 4,
        "pretrained_model_name_or_path": str(folder), "output_dir": str(root / "output"),
        "data_backend_config": str(root / "multidatabackend.json"), "resolution": SIZE,
        "resolution_type": "pixel", "mixed_precision": "no", "optimizer": "torch-adamw",
        "max_train_steps": 2, "num_train_epochs": 0, "validation_disable": True, "report_to": "none",
        "seed": 0, **FAMILIES.get(family, {}).get("settings", {}), **settings,
    }
    args = parse_cmdline_args(input_args=normalize_args(config), exit_on_error=True)
    model = ModelRegistry.model_families()[family](args, accelerator)
    # Trainer.__init__ -> init_model: the class, then check_user_config; init_noise_schedule and the precision
    # setup set these two on the config before any training step.
    model.check_user_config()
    args.flow_matching = model.PREDICTION_TYPE.is_flow_prediction
    args.base_weight_dtype = args.weight_dtype
    # Trainer.init_text_encoder / init_vae / init_load_base_model.
    model.load_text_encoder(move_to_device=True)
    model.load_vae(move_to_device=False)
    model.load_model(move_to_device=False)
    return model


@pytest.fixture(scope="module")
def simpletuner_models(model_dirs, tmp_path_factory):
    """family -> SimpleTuner's model object with the folder loaded as its trainer loads it (CPU, fp32)."""
    import huggingface_hub.constants

    models = {}
    for family, folder in model_dirs.items():
        root = tmp_path_factory.mktemp(f"simpletuner-{family}")
        with pytest.MonkeyPatch.context() as patch:
            if family in HUB_TEXT_ENCODERS:
                # huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE from the environment once, at import; its
                # hf_hub_download / snapshot_download / is_offline_mode and transformers' cached_files read these
                # module constants at each call (diffusers, which copies HF_HUB_OFFLINE at import, loads only the
                # local folder here). Patched for the load only: the encoder and tokenizer are in memory after it.
                cache = offline_hub_cache(root / "hub", HUB_TEXT_ENCODERS[family], folder)
                patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
                patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
            models[family] = load_with_simpletuner(family, folder, root)
    return models


def test_simpletuner_loads_the_folder_with_its_trainer_functions(simpletuner_models, model_dirs, family):
    import transformers

    model = simpletuner_models[family]
    spec = FAMILIES[family]
    assert type(model).__name__ == spec["simpletuner_class"]
    assert model.config.tokenizer_max_length == spec["t5_tokens"]
    # SimpleTuner's training schedule is the folder's with `shift` replaced by flow_schedule_shift (default 3.0),
    # whatever the folder says (Lumina 2: 6.0); Qwen-Image's is its own, hard-coded (Qwen/Qwen-Image's), whatever
    # the folder or flow_schedule_shift say.
    if family == "qwen_image":
        assert {k: model.noise_schedule.config[k] for k in spec["scheduler"] if k != "_class_name"} == {
            k: v for k, v in spec["scheduler"].items() if k != "_class_name"}
    else:
        shift = spec.get("training_shift", 3.0)
        assert model.noise_schedule.config.shift == model.config.flow_schedule_shift == shift
    assert model.noise_schedule.config.use_dynamic_shifting is spec["scheduler"].get("use_dynamic_shifting", False)
    # transformers 5's T5TokenizerFast is T5Tokenizer, its PreTrainedTokenizerFast is TokenizersBackend: by identity.
    assert [type(t) for t in model.tokenizers] == [getattr(transformers, name) for name in spec["tokenizers"]]
    assert [type(e) for e in model.text_encoders] == [getattr(transformers, name) for name in spec["encoders"]]
    # SimpleTuner's own transformer class (MODEL_CLASS), not diffusers', with the folder's weights.
    assert type(model.model) is model.MODEL_CLASS
    assert model.MODEL_CLASS.__module__.startswith("simpletuner.")
    from safetensors.torch import load_file

    saved = load_file(model_dirs[family] / "transformer" / "diffusion_pytorch_model.safetensors")
    state = model.model.state_dict()
    assert saved.keys() <= state.keys()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    qwen_vae = family in ("qwen_image", "krea2")  # AutoencoderKLQwenImage: z_dim
    vae_channels = model.vae.config.z_dim if qwen_vae else model.vae.config.latent_channels
    # FLUX.2's VAE: its latents patchified 2 x 2 (post_vae_encode_transform_sample)
    if family in ("flux3_image", "ernie", "flux2", "moss_image"):
        vae_channels *= math.prod(model.vae.config.patch_size)
    assert vae_channels == model.LATENT_CHANNEL_COUNT == spec["latent_channels"]
    # SimpleTuner reads it with a default of 1.0, which Flux2 (its own load_vae sets none) gets.
    assert getattr(model, "AUTOENCODER_SCALING_FACTOR", 1.0) == spec["vae"].get("scaling_factor", 1.0)


def test_encoded_prompts_fit_the_transformer_in_simpletuners_training_step(simpletuner_models, family):
    model = simpletuner_models[family]
    spec = FAMILIES[family]
    transformer = model.model.config
    with torch.no_grad():
        embeds = encode_captions(model, PROMPTS)
    prompt_embeds, pooled = embeds["prompt_embeds"], embeds.get("pooled_prompt_embeds")
    # SimpleTuner's collate turns either mask key into the batch's encoder_attention_mask.
    mask = embeds.get("attention_masks", embeds.get("prompt_attention_mask", embeds.get("attention_mask")))
    width = (transformer.cap_feat_dim if family in ("lumina2", "z_image", "z_image_omni")
             else transformer.text_in_dim if family == "ernie"
             else transformer.text_dim if family == "moss_image"
             else transformer.text_hidden_dim if family == "krea2" else transformer.joint_attention_dim)
    # Krea 2: each token's states from the tapped encoder layers, stacked, which its text fusion collapses.
    taps = (transformer.num_text_layers,) if family == "krea2" else ()
    assert prompt_embeds.shape == (2, spec["prompt_tokens"], *taps, width)
    if family == "sd3":
        # CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width, then T5's states.
        clip_width = sum(encoder.config.hidden_size for encoder in model.text_encoders[:2])
        assert torch.count_nonzero(prompt_embeds[:, :CLIP_TOKENS, clip_width:]) == 0
        assert torch.count_nonzero(prompt_embeds[:, :CLIP_TOKENS, :clip_width]) > 0
    elif family == "longcat_image":
        # No mask: the transformer attends to the prompt's padded 512 states; the template's were dropped.
        assert mask is None and embeds["text_ids"].shape == (spec["prompt_tokens"], 3)
    else:
        assert mask.shape == (2, spec["prompt_tokens"])
    if family in ("sd3", "flux"):
        assert pooled.shape == (2, transformer.pooled_projection_dim)
    else:
        assert pooled is None  # one sequence of prompt states, no pooled embedding
    if family == "auraflow":
        # The transformer takes no mask: the pipeline zeroes the padding's states, so only the prompt's reach it.
        padding = ~mask.bool()
        assert padding.any() and torch.count_nonzero(prompt_embeds[padding]) == 0
        assert torch.count_nonzero(prompt_embeds[~padding]) > 0
    if family == "lumina2":
        # Right-padded, as the transformer reads the first mask-sum tokens; the system prompt comes first.
        assert bool((mask[:, :-1] >= mask[:, 1:]).all()) and mask[:, 0].all() and not mask[:, -1].any()
    if family in ("z_image", "z_image_omni"):
        # The chat-templated prompt, right-padded; the transformer takes each row's masked tokens only.
        assert mask.dtype == torch.bool and bool((mask[:, :-1] >= mask[:, 1:]).all()) and not mask[:, -1].any()
    if family == "krea2":
        # [prompt | padding | assistant suffix]: the pipeline pads in the middle of its template.
        suffix = model.get_pipeline(load_base_model=False).prompt_template_encode_num_suffix_tokens
        assert mask[:, 0].all() and mask[:, -suffix:].all() and not mask[:, -suffix - 1].any()

    pixels = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        # SimpleTuner's VAE cache: its pre- and post-encode hooks (Qwen-Image: a frame axis, then latents_mean /
        # latents_std), the posterior's sample, its scaling hook.
        encoded = model.vae.encode(model.pre_vae_encode_transform_sample(pixels))
        encoded = model.post_vae_encode_transform_sample(encoded)
        encoded = encoded.latent_dist.sample() if hasattr(encoded, "latent_dist") else encoded
        latents = model.scale_vae_latents_for_cache(encoded, model.vae)
    scale = spec.get("vae_scale", 8)
    assert latents.shape == (2, spec["latent_channels"], SIZE // scale, SIZE // scale)
    batch = {"prompt_embeds": prompt_embeds, "add_text_embeds": pooled, "latent_batch": latents,
             "encoder_attention_mask": mask, "batch_time_ids": None}
    torch.manual_seed(0)
    prepared = model.prepare_batch(batch, {"global_step": 0})
    model.model.zero_grad(set_to_none=True)
    output = model.model_predict(prepared)
    assert output["model_prediction"].shape == latents.shape
    loss = model.loss(prepared, output)
    assert math.isfinite(loss.item())
    loss.backward()
    # The prompt reaches the transformer: its text projections get gradients.
    for name in spec["text_weights"]:
        grad = model.model.get_parameter(name).grad
        assert grad is not None and torch.count_nonzero(grad) > 0, name


# Families whose VAE is not the 1/8 AutoencoderKL the generic folder test reads: their folder's own checks.
OWN_VAE_CHECKS = {
    "qwen_image": assert_the_qwen_image_folder_is_consistent,
    "flux3_image": assert_the_flux3_image_folder_is_consistent,
    "ernie": assert_the_ernie_folder_is_consistent,
    "flux2": assert_the_flux2_klein_folder_is_consistent,
    "krea2": assert_the_krea2_folder_is_consistent,
    "moss_image": assert_the_moss_image_folder_is_consistent,
}
