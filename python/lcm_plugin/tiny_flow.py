"""Tiny flow-matching pipelines (SD3, Flux, Chroma, Lumina 2, AuraFlow, Z-Image and Omni, Qwen-Image, LongCat-Image,
ERNIE-Image, FLUX.3 Image Klein, FLUX.2-klein, Krea 2) built from configs, fully offline.

Same component layout as the real checkpoints, at 1-2 MB, for tests that must never reach a model hub:

    SD3 (stabilityai/stable-diffusion-3.5-medium, SimpleTuner's default SD3 flavour): an MM-DiT
        `SD3Transformer2DModel` (transformer/) with SD3.5's dual-attention first block and RMS q/k norm; two CLIP
        text encoders with projection (text_encoder/: CLIP-L style, quick_gelu; text_encoder_2/: CLIP-G style,
        gelu, pads with "!"); a T5 v1.1 encoder (text_encoder_3/, gated-gelu); CLIP BPE tokenizers (tokenizer/,
        tokenizer_2/) and a T5 Unigram tokenizer (tokenizer_3/); a 16-channel AutoencoderKL without quant convs and
        SD3's shift/scaling factors; `FlowMatchEulerDiscreteScheduler` with shift 3.0.
    Flux (black-forest-labs/FLUX.1-dev): a `FluxTransformer2DModel` (double and single stream blocks, guidance
        embedding as dev ships it); one CLIP text encoder without projection (`CLIPTextModel`, text_encoder/) and
        a T5 encoder (text_encoder_2/); tokenizer/ (CLIP BPE) and tokenizer_2/ (T5 Unigram); Flux's 16-channel VAE
        factors; the scheduler with dev's dynamic shifting.
    Chroma (lodestones/Chroma1-HD): a `ChromaTransformer2DModel` (Flux's streams; modulations from its approximator
        MLP, no guidance or pooled input); one T5 encoder (text_encoder/) and its Unigram tokenizer (tokenizer/);
        Flux's VAE factors and dynamically shifted scheduler.
    Lumina 2 (Alpha-VLLM/Lumina-Image-2.0): a `Lumina2Transformer2DModel` (GQA, refiner layers); a Gemma 2 encoder
        (`Gemma2Model`, text_encoder/) and a byte-fallback BPE tokenizer (tokenizer/, padded on the right); Flux's VAE
        factors; the scheduler at a fixed shift of 6.
    AuraFlow (fal/AuraFlow, SimpleTuner's terminusresearch/auraflow-v0.3): an `AuraFlowTransformer2DModel` (MM-DiT
        joint blocks, then single blocks on the joined sequence); a UMT5 encoder (`UMT5EncoderModel`, text_encoder/,
        Pile-T5's) and its Llama-class byte-fallback BPE tokenizer (tokenizer/, `LlamaTokenizerFast`); SDXL's
        4-channel VAE (AutoencoderKL with quant convs, scaling 0.13025); the scheduler at a fixed shift of 1.73.
    Z-Image (Tongyi-MAI/Z-Image-Turbo): a `ZImageTransformer2DModel` (refiner layers per stream, then the joint
        layers); a Qwen3 causal LM (`Qwen3ForCausalLM`, text_encoder/) and a byte-level BPE tokenizer (tokenizer/,
        `Qwen2Tokenizer`, Qwen3's chat template); Flux's VAE factors; the scheduler at a fixed shift of 3. About 2 MB:
        the transformer's timestep MLP is 1024 wide whatever its width.
    Z-Image Omni (SimpleTuner's z_image_omni, TONGYI-Lab/Z-Image-Base): Z-Image's components, its transformer with the
        SigLIP stream (`siglip_feat_dim`), plus a one-layer `Siglip2VisionModel` (siglip/) and `Siglip2ImageProcessor`
        (siglip_processor/), which `ZImageOmniPipeline` takes (reference images only reach them); the scheduler at
        Z-Image base's fixed shift of 6.
    Qwen-Image (Qwen/Qwen-Image, SimpleTuner's v1.0 flavour): a `QwenImageTransformer2DModel` (MM-DiT blocks on 2 x 2
        packed latents); a Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, text_encoder/, with its one-block vision
        tower) and a byte-level BPE tokenizer (tokenizer/, `Qwen2Tokenizer`, with the vision specials); the 3-D
        `AutoencoderKLQwenImage` (16 channels, latents_mean / latents_std, no scaling factor); the scheduler with
        dynamic shifting and a terminal sigma of 0.02. No processor/: its text-to-image pipeline takes none.
    LongCat-Image (meituan-longcat/LongCat-Image, SimpleTuner's "final" flavour): a `LongCatImageTransformer2DModel`
        (Flux's double and single stream blocks, no guidance or pooled input); Qwen-Image's Qwen2.5-VL text encoder
        (text_encoder/), its tokenizer (tokenizer/, with LongCat's template words) and a `Qwen2VLProcessor`
        (text_processor/: the pipelines' prompt rewrite; SimpleTuner loads it for every pipeline); Flux's VAE and
        dynamically shifted scheduler (the pipeline's calculate_shift defaults are Flux's).
    Krea 2 (krea/Krea-2-Raw, SimpleTuner's "raw" flavour): a `Krea2Transformer2DModel` (text fusion blocks, then
        single-stream blocks on 2 x 2 packed latents); a Qwen3-VL (`Qwen3VLModel`, text_encoder/, 36 text layers and
        a one-block vision tower) and its byte-level BPE tokenizer (tokenizer/, with Qwen-Image's template words);
        Qwen-Image's 3-D VAE; the scheduler with dynamic shifting up to 6400 tokens.
    MOSS-Image (OpenMOSS-Team/MOSS-Image-SFT, SimpleTuner's "sft" flavour): SimpleTuner's own `MOSSImagePipeline`
        (diffusers has none) and `MOSSImageTransformer` (single-stream blocks on the VAE's 128 patchified channels,
        one token per latent pixel, after a text projection of two blocks); a Qwen3.5 (`Qwen3_5Model`, text_encoder/,
        a linear- and a full-attention layer, a one-block vision tower) and Qwen3's tokenizer and chat template
        (tokenizer/); FLUX.2's VAE; `MOSSImageScheduler` at its shift of 5.
    ERNIE-Image (baidu/ERNIE-Image, SimpleTuner's "base" flavour): an `ErnieImageTransformer2DModel` (single-stream
        shared-AdaLN layers on the VAE's 128 patchified channels, one token per latent pixel); a `Mistral3Model`
        (text_encoder/: Ministral 3's text blocks, a one-layer Pixtral tower) and a Tekken-style byte-level BPE
        tokenizer (tokenizer/, `TokenizersBackend`); FLUX.2's VAE; the scheduler at a fixed shift of 4. About 45 MB:
        the text width must be Ministral 3's 3072, and the vision projector is square in it. No prompt enhancer.
    FLUX.3 Image Klein base (black-forest-labs/flux-3-image-klein-base, SimpleTuner's flux3_image "klein-base"):
        SimpleTuner's own `Flux3ImagePipeline` (diffusers has none) and `Flux3ImageTransformer2DModel` (a block per
        stream, then joint blocks, on the VAE's 128 patchified channels, one token per latent pixel); a Qwen3-VL
        (`Qwen3VLModel`, text_encoder/, 32 text layers and a one-block vision tower) with its byte-level BPE tokenizer
        and chat template in the same folder (the pipeline and SimpleTuner load it from there; the index names
        none); FLUX.2's VAE; the scheduler at a fixed shift of 6.93. About 1 MB.
    FLUX.2-klein base (black-forest-labs/FLUX.2-klein-base-4B, SimpleTuner's flux2 "klein-4b" / "klein-9b"):
        `Flux2KleinPipeline` (is_distilled false) with a `Flux2Transformer2DModel` (a double and a single stream block
        on the VAE's 128 patchified channels, one token per latent pixel, no guidance embedding); a Qwen3 causal LM
        (`Qwen3ForCausalLM`, text_encoder/, 27 layers) and its byte-level BPE tokenizer with Qwen3's chat template
        (tokenizer/); FLUX.2's VAE; Flux's dynamically shifted scheduler. About 1 MB.

The sizes that must agree, as SimpleTuner 4.10.1 and diffusers wire the components together:

    SD3: prompt_embeds = cat(pad(cat(CLIP-L hidden, CLIP-G hidden), to T5 d_model), T5 hidden) along the sequence,
        so T5 d_model == transformer joint_attention_dim >= the sum of the CLIP hidden sizes (32 + 48 padded to 96);
        pooled = cat(CLIP-L projection, CLIP-G projection) == pooled_projection_dim (80);
        caption_projection_dim == num_attention_heads * attention_head_dim (the blocks' width).
    Flux: T5 d_model == joint_attention_dim; pooled = CLIPTextModel's pooler output (its hidden size, no
        projection) == pooled_projection_dim; in_channels == 4 * VAE latent channels (2x2 packing, so latent H and
        W must be even: images a multiple of 16 px); sum(axes_dims_rope) == attention_head_dim.
    Chroma: T5 d_model == joint_attention_dim; in_channels == 4 * VAE latent channels, sum(axes_dims_rope) ==
        attention_head_dim, as Flux; approximator_num_channels a multiple of 4.
    Lumina 2: Gemma's hidden size == cap_feat_dim; sum(axes_dim_rope) == hidden_size / num_attention_heads;
        axes_lens[0] > the prompt length (256, Lumina2.check_user_config), as caption positions come first; the
        tokenizer pads on the right, as the transformer reads a caption as its first mask-sum tokens.
    AuraFlow: UMT5 d_model == joint_attention_dim; caption_projection_dim == num_attention_heads *
        attention_head_dim; pos_embed_max_size a square >= the patches of the largest latent (16 x 16 here).
    Z-Image: Qwen3's hidden size == cap_feat_dim, and >= 2 layers (Z-Image reads the second-to-last hidden states);
        sum(axes_dims) == dim / n_heads; axes_lens[0] > the prompt length (512, Z-Image's _encode_prompts) + 1, as
        caption positions come first; the transformer takes each caption's masked tokens only. Omni: also SigLIP 2's
        hidden size == siglip_feat_dim.
    Qwen-Image: Qwen2.5-VL's text width == joint_attention_dim == its vision tower's out_hidden_size; its mrope
        sections sum to half the head size; in_channels == 4 * z_dim (2 x 2 packing), sum(axes_dims_rope) ==
        attention_head_dim; the template's system turn tokenizes to the 34 tokens the pipeline drops.
    LongCat-Image: Qwen2.5-VL's text width == joint_attention_dim; in_channels == 4 * VAE latent channels,
        sum(axes_dims_rope) == attention_head_dim, as Flux; the template's prefix and suffix tokenize to the 36 and 5
        tokens SimpleTuner drops, leaving the prompt's 512.
    Krea 2: Qwen3-VL's text width == text_hidden_dim, its layers > max(text_encoder_select_layers) and the number of
        taps == num_text_layers (prompt states are [tokens, taps, width]); in_channels == 4 * z_dim (2 x 2 packing),
        sum(axes_dims_rope) == attention_head_dim; the template's system turn and assistant suffix tokenize to the 34
        and 5 tokens the pipeline counts, leaving the prompt's 512.
    MOSS-Image: Qwen3.5's text width == text_dim; latent_channels == 4 * the VAE's 32 (2 x 2 patchified, 16x down);
        dim / num_heads a multiple of 8; more than 22 blocks (the pipeline's default uncond_skip_layers names 22).
    ERNIE-Image: Ministral 3's width == text_in_dim == 3072 (SimpleTuner's Ernie.TEXT_EMBED_DIM), >= 2 text layers
        (the second-to-last hidden states are read); in_channels == 4 * the VAE's 32 (2 x 2 patchified, 16x down);
        sum(rope_axes_dim) == hidden_size / num_attention_heads; the modulation and output layers not zero (diffusers
        zero-initialises them, which would make every prediction 0).
    FLUX.3 Image Klein: joint_attention_dim == 8 * Qwen3-VL's width (SimpleTuner concatenates the hidden states of
        layers 4, 8, ..., 32: text.TEXT_LAYERS), so >= 32 text layers; in_channels == cond_in_channels == 4 * the
        VAE's 32 (2 x 2 patchified, 16x down); sum(axes_dims_rope) == attention_head_dim; flow_map off (the base).
    FLUX.2-klein: joint_attention_dim == 3 * Qwen3's width (SimpleTuner and the pipeline stack the hidden states of
        layers 9, 18 and 27), so >= 27 text layers; in_channels == 4 * the VAE's 32 (2 x 2 patchified, 16x down);
        sum(axes_dims_rope) == attention_head_dim; guidance_embeds off (the base, sampled with CFG).
    All: the VAE has 4 blocks (latents 1/8 of the image, as SimpleTuner's Flux unpacking assumes), 16 latent
        channels (AuraFlow: SDXL's 4; SimpleTuner's LATENT_CHANNEL_COUNT); images a multiple of 64 px train
        (SimpleTuner forces aspect_bucket_alignment 64 for every one), 64 px gives 8x8 latents (SD3, AuraFlow: 4x4
        patches; Flux: 16 packed tokens).
    T5 tokenizer: SimpleTuner loads `T5TokenizerFast` from tokenizer_3/ (SD3) or tokenizer_2/ (Flux), AutoTokenizer
        from tokenizer/ (Chroma); it pads T5 prompts to 154 tokens for SD3 and to 512 for Flux and Chroma
        (model_max_length 512 here). Gemma tokenizer: SimpleTuner loads `PreTrainedTokenizerFast` from tokenizer/.
        Llama-class tokenizer: SimpleTuner loads `LlamaTokenizerFast` from tokenizer/ and pads AuraFlow prompts to 120.
    SimpleTuner trains every one at its own flow_schedule_shift (default 3.0), not the folder's scheduler shift;
    Qwen-Image on its own hard-coded schedule (the folder's values, whatever flow_schedule_shift says).
    SimpleTuner 4.10.1 loads AuraFlow's text encoder and tokenizer from the hub repo its class names
    (terminusresearch/auraflow-v0.3), whatever pretrained_model_name_or_path says.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lcm_plugin.tiny_sdxl import clip_text_config, tiny_vae, write_clip_tokenizer

__all__ = [
    "AURAFLOW_SCHEDULER_CONFIG", "FAMILIES", "FLUX_SCHEDULER_CONFIG", "FLUX_VAE_FACTORS", "LUMINA2_SCHEDULER_CONFIG",
    "SD3_SCHEDULER_CONFIG", "SD3_VAE_FACTORS", "SDXL_VAE_FACTORS", "T5_MAX_TOKENS", "auraflow_transformer_config",
    "chroma_transformer_config", "flux_transformer_config", "lumina2_transformer_config", "save_tiny_auraflow",
    "save_tiny_chroma", "save_tiny_flow", "save_tiny_flux", "save_tiny_lumina2", "save_tiny_sd3",
    "sd3_transformer_config", "write_gemma_tokenizer", "write_llama_tokenizer", "write_t5_tokenizer",
    "QWEN_IMAGE_SCHEDULER_CONFIG", "qwen_image_transformer_config", "save_tiny_qwen_image",
    "write_qwen2_5_vl_tokenizer",
    "Z_IMAGE_SCHEDULER_CONFIG", "qwen3_config", "save_tiny_z_image", "write_qwen_tokenizer",
    "z_image_transformer_config", "Z_IMAGE_OMNI_SCHEDULER_CONFIG", "save_tiny_z_image_omni",
    "LONGCAT_IMAGE_TEMPLATE", "LONGCAT_IMAGE_TEMPLATE_TOKENS", "longcat_image_transformer_config",
    "save_tiny_longcat_image", "write_longcat_image_tokenizer",
    "KREA2_SCHEDULER_CONFIG", "KREA2_TEXT_LAYERS", "krea2_transformer_config",
    "save_tiny_krea2", "write_krea2_tokenizer",
    "MOSS_IMAGE_SCHEDULER_CONFIG", "moss_image_transformer_config", "qwen3_5_config", "save_tiny_moss_image",
    "ERNIE_SCHEDULER_CONFIG", "ernie_transformer_config", "mistral3_config", "save_tiny_ernie", "tiny_flux2_vae",
    "write_tekken_tokenizer",
    "FLUX3_IMAGE_SCHEDULER_CONFIG", "FLUX3_IMAGE_TEXT_LAYERS", "QWEN3_VL_CHAT_TEMPLATE",
    "flux3_image_transformer_config", "qwen3_vl_config", "save_tiny_flux3_image", "write_qwen3_vl_tokenizer",
    "FLUX2_KLEIN_TEXT_LAYERS", "flux2_klein_transformer_config", "save_tiny_flux2_klein",
]

# stable-diffusion-3.5-medium's scheduler/scheduler_config.json (3.0 and 3.5 large ship the same).
SD3_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}

# FLUX.1-dev's scheduler/scheduler_config.json: the shift follows the image's token count (mu).
FLUX_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

# Lumina-Image-2.0's scheduler/scheduler_config.json: a fixed shift of 6, no dynamic shifting.
LUMINA2_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 6.0,
}

# AuraFlow's scheduler/scheduler_config.json (v0.1 to v0.3): a fixed shift of 1.73.
AURAFLOW_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.73,
}

# Z-Image-Turbo's scheduler/scheduler_config.json: a fixed shift of 3, no dynamic shifting (its pipeline passes a mu
# that the scheduler then ignores).
Z_IMAGE_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}
# Z-Image (base, Tongyi-MAI/Z-Image)'s scheduler/scheduler_config.json, the one the Omni base is sampled with: a fixed
# shift of 6, no dynamic shifting.
Z_IMAGE_OMNI_SCHEDULER_CONFIG = {**Z_IMAGE_SCHEDULER_CONFIG, "shift": 6.0}

# vae/config.json latent normalisation: latents = (encode(x) - shift_factor) * scaling_factor.
SD3_VAE_FACTORS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
SDXL_VAE_FACTORS = {"scaling_factor": 0.13025}  # AuraFlow's VAE is SDXL's

LATENT_CHANNELS = 16
T5_MAX_TOKENS = 512  # T5 v1.1 XXL tokenizer's model_max_length in both checkpoints
OPENCLIP_PAD_TOKEN = "!"

# Text encoder sizes. SD3: CLIP-L 32 + CLIP-G 48 = 80, padded to T5's 96 (real: 768 + 1280 = 2048 -> 4096).
SD3_CLIP_L_HIDDEN = 32
SD3_CLIP_G_HIDDEN = 48
SD3_T5_D_MODEL = 96
FLUX_CLIP_HIDDEN = 32
FLUX_T5_D_MODEL = 64
CHROMA_T5_D_MODEL = 64
LUMINA2_GEMMA_HIDDEN = 32
AURAFLOW_UMT5_D_MODEL = 32
Z_IMAGE_QWEN3_HIDDEN = 32
Z_IMAGE_OMNI_SIGLIP_HIDDEN = 16  # SigLIP 2's width == the transformer's siglip_feat_dim (real: 1152)

# T5's special pieces, at the ids T5 v1.1 has them (transformers 5's T5Tokenizer hard-codes unk_id 2).
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
# Pile-T5's (Llama's vocabulary): <unk>=0 <s>=1 </s>=2. It names no pad token; its UMT5 config's pad_token_id is 1.
LLAMA_UNK, LLAMA_BOS, LLAMA_EOS = "<unk>", "<s>", "</s>"
_T5_SPACE = "\u2581"  # SentencePiece's word-boundary mark
BPE_MAX_TOKENS = 512


def write_t5_tokenizer(folder: Path, words: tuple[str, ...] = ()) -> Path:
    """Write a T5-style SentencePiece Unigram tokenizer as tokenizer.json (+ configs), built with `tokenizers`.

    Vocabulary: <pad>=0, </s>=1, <unk>=2, the word mark, every printable ASCII character with and without the
    mark, and each of `words` as one piece ("\u2581red"), scored so whole words win. The pipeline is the one
    transformers 5's T5Tokenizer rebuilds around a tokenizer.json's vocabulary (whitespace split, Metaspace with
    prepend "always", "$A </s>"), so transformers 4's T5TokenizerFast (which runs tokenizer.json as is) and 5's
    T5Tokenizer (= T5TokenizerFast) give the same ids. No spiece.model: nothing needs sentencepiece.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pieces: list[tuple[str, float]] = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (_T5_SPACE, -5.0)]
    characters = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces += [(_T5_SPACE + c, -8.0) for c in characters] + [(c, -10.0) for c in characters]
    pieces += [(_T5_SPACE + w, -1.0) for w in sorted(set(words)) if w and not any(ch.isspace() for ch in w)]
    pieces = list({piece: score for piece, score in pieces}.items())  # de-duplicate, keep first order

    tokenizer = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement=_T5_SPACE, prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=_T5_SPACE, prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (T5_PAD, T5_EOS, T5_UNK)])
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"eos_token": T5_EOS, "unk_token": T5_UNK, "pad_token": T5_PAD}
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "additional_special_tokens": []}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "model_max_length": T5_MAX_TOKENS, **special,
        "extra_ids": 0, "additional_special_tokens": [], "clean_up_tokenization_spaces": True,
    }))
    return folder


def _byte_fallback_bpe(specials: list[str], unk_token: str, words: tuple[str, ...]):
    """A SentencePiece-style byte-fallback BPE `tokenizers.Tokenizer` (no pipeline yet) and its vocabulary:
    `specials` at ids 0.., the 256 byte-fallback pieces <0x00>..<0xFF>, the word mark, every printable ASCII
    character with and without the mark, and each of `words` after the mark ("\u2581red") as one piece, built by
    left-to-right merges that always start from a marked piece (so no merge of a word's tail can pre-empt another
    word's)."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    characters = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces = list(specials) + [f"<0x{b:02X}>" for b in range(256)] + [_T5_SPACE] + characters
    pieces += [_T5_SPACE + c for c in characters]
    merges = [(_T5_SPACE, c) for c in characters]
    for word in sorted(set(words)):
        if not word or any(ch.isspace() for ch in word):
            continue
        current = _T5_SPACE + word[0]
        for ch in word[1:]:
            merges.append((current, ch))
            current += ch
            pieces.append(current)
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=list(dict.fromkeys(merges)), fuse_unk=True, unk_token=unk_token,
                              byte_fallback=True))
    return tokenizer, vocab


def write_gemma_tokenizer(folder: Path, words: tuple[str, ...] = ()) -> Path:
    """Write Gemma's SentencePiece-style byte-fallback BPE tokenizer (tokenizer.json + configs), built with
    `tokenizers`: <pad>=0 <eos>=1 <bos>=2 <unk>=3, spaces normalised to the word mark, <bos> first, as Gemma 2 2B and
    Lumina-Image-2.0's tokenizer/.

    Vocabulary and merges: _byte_fallback_bpe's, the specials first. The pipeline is the one transformers 5's
    GemmaTokenizer builds around a tokenizer.json's vocabulary and merges, so the named class, AutoTokenizer and
    PreTrainedTokenizerFast (what SimpleTuner loads for Lumina2) give the same ids. Padding is on the right:
    Lumina2's transformer reads a caption as its first mask-sum tokens. No tokenizer.model: nothing needs
    sentencepiece.
    """
    from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors

    special = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
    tokenizer, vocab = _byte_fallback_bpe(list(special.values()), special["unk_token"], words)
    tokenizer.normalizer = normalizers.Replace(" ", _T5_SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(_T5_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = special["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special.values()])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", **special, "add_bos_token": True, "add_eos_token": False,
        "padding_side": "right", "model_max_length": BPE_MAX_TOKENS, "clean_up_tokenization_spaces": False,
        "legacy": False,
    }))
    return folder


def write_llama_tokenizer(folder: Path, words: tuple[str, ...] = ()) -> Path:
    """Write a Llama-class byte-fallback BPE tokenizer (tokenizer.json + configs), built with `tokenizers`, as
    Pile-T5's, which AuraFlow's UMT5 encoder reads: <unk>=0 <s>=1 </s>=2, no <s> first, </s> last, padded on the
    right with <s> (id 1: Pile-T5 names no pad token; its UMT5 config pads with 1).

    Vocabulary and merges: _byte_fallback_bpe's, the specials first. The pipeline is the one transformers 5's
    LlamaTokenizer builds around a tokenizer.json's vocabulary and merges (no normaliser, the word mark before the
    first word only), so transformers 4's LlamaTokenizerFast (which runs tokenizer.json as is) and 5's give the same
    ids. No tokenizer.model: nothing needs sentencepiece.
    """
    from tokenizers import AddedToken, decoders, pre_tokenizers, processors

    specials = [LLAMA_UNK, LLAMA_BOS, LLAMA_EOS]
    tokenizer, vocab = _byte_fallback_bpe(specials, LLAMA_UNK, words)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_T5_SPACE, prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(_T5_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=" ", left=1)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {LLAMA_EOS}", pair=f"$A {LLAMA_EOS} $B:1 {LLAMA_EOS}:1",
        special_tokens=[(LLAMA_EOS, vocab[LLAMA_EOS])],
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"unk_token": LLAMA_UNK, "bos_token": LLAMA_BOS, "eos_token": LLAMA_EOS, "pad_token": LLAMA_BOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": False, "add_eos_token": True,
        "add_prefix_space": True, "legacy": False, "padding_side": "right", "model_max_length": BPE_MAX_TOKENS,
        "clean_up_tokenization_spaces": False,
    }))
    return folder


# Qwen2/Qwen3's specials (Qwen3-4B's tokenizer: <|endoftext|> pads, <|im_end|> ends a turn; no BOS, no UNK).
QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_SPECIALS = (QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END, "<think>", "</think>")
# Qwen2Tokenizer's pre-tokenizer split (transformers' PRETOKENIZE_REGEX), before the byte-level mapping.
QWEN_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                          r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen3's chat template for what Z-Image sends (one user message, add_generation_prompt): ChatML turns, and the
# empty think block only when enable_thinking is false (Z-Image passes true, so none).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _byte_level_pieces() -> dict[int, str]:
    """GPT-2's byte -> printable character map (`bytes_to_unicode`), which byte-level BPE vocabularies are spelt in."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
    kept += list(range(ord("\xae"), ord("\xff") + 1))
    shifted = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def _byte_level_words(first: tuple[str, ...], words) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE's vocabulary (`first`, the 256 byte-level pieces, then each ASCII word of `words` as one piece
    with and without a leading space: "\u0120red", "red") and its merges, the spaced words' chains first, so that a
    word's own chain always completes."""
    byte_pieces = _byte_level_pieces()
    space = byte_pieces[ord(" ")]  # "\u0120"
    pieces = [*first, *byte_pieces.values()]
    spaced, plain = [], []
    for word in sorted(words):
        if not word or any(ch.isspace() for ch in word) or not word.isascii():
            continue
        for merges, current in ((spaced, space), (plain, "")):
            for ch in word:
                if current:
                    merges.append((current, ch))
                current += ch
                pieces.append(current)
    return {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}, list(dict.fromkeys(spaced + plain))


def write_qwen_tokenizer(folder: Path, words: tuple[str, ...] = ()) -> Path:
    """Write a Qwen2/Qwen3-style byte-level BPE tokenizer (tokenizer.json, vocab.json, merges.txt + configs), built
    with `tokenizers`, with Qwen3's chat template: the 256 byte-level pieces, each of `words` and the ChatML roles as
    one piece with and without a leading space ("\u0120red", "red"), then the specials (QWEN_SPECIALS); no BOS or
    EOS added, padded on the right with <|endoftext|>, as Qwen3-4B's tokenizer (Z-Image's).

    The pipeline (NFC, the regex split, ByteLevel without prefix space, ByteLevel decoder) is the one transformers
    5's Qwen2Tokenizer builds around a tokenizer.json's vocabulary and merges, so it, AutoTokenizer and transformers
    4's Qwen2TokenizerFast give the same ids; 4.x's slow Qwen2Tokenizer reads vocab.json and merges.txt."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = _byte_level_words((), set(words) | {"user", "assistant", "system"})
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"eos_token": QWEN_IM_END, "pad_token": QWEN_ENDOFTEXT}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", **special, "bos_token": None, "unk_token": None,
        "add_prefix_space": False, "errors": "replace", "padding_side": "right", "split_special_tokens": False,
        "model_max_length": 131072, "clean_up_tokenization_spaces": False, "chat_template": QWEN3_CHAT_TEMPLATE,
    }))
    return folder


def t5_config(vocab_size: int, d_model: int, *, umt5: bool = False):
    """T5EncoderModel config in T5 v1.1's style (gated-gelu, untied embeddings), two layers. With `umt5`, a UMT5Config
    of the same sizes (Pile-T5's blocks: a relative position bias in every layer) with Pile-T5's special ids."""
    from transformers import T5Config, UMT5Config

    config_class, pad_id, eos_id = (UMT5Config, 1, 2) if umt5 else (T5Config, 0, 1)
    return config_class(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        decoder_start_token_id=0,
    )


def tiny_flow_vae(factors: dict):
    """tiny_sdxl's VAE with 16 latent channels and no quant convs, as SD3's and Flux's VAEs, and their factors."""
    return tiny_vae(LATENT_CHANNELS, use_quant_conv=False, use_post_quant_conv=False, **factors)


def _seeded_folder(folder: Path, seed: int) -> Path:
    """`folder`, created, with torch's global generator seeded: a writer's random weights follow from `seed`."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    return folder


def sd3_transformer_config() -> dict:
    """SD3Transformer2DModel config: 2 blocks (the first dual-attention, as SD3.5), width 32 (4 heads of 8)."""
    heads, head_dim = 4, 8
    return dict(
        sample_size=8,  # latent size the pipeline defaults to: 64 px
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=SD3_T5_D_MODEL,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=SD3_CLIP_L_HIDDEN + SD3_CLIP_G_HIDDEN,
        pos_embed_max_size=32,  # latents up to 64x64: images up to 512 px
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def _flux_streams() -> dict:
    """Flux's stream layout, shared by Chroma: 1 double + 2 single stream blocks, width 32 (2 heads of 16), 2 x 2
    packed latents."""
    return dict(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (16, 56, 56) to 128
    )


def flux_transformer_config() -> dict:
    """FluxTransformer2DModel config: Flux's streams, its pooled CLIP and guidance inputs."""
    return dict(
        **_flux_streams(),
        joint_attention_dim=FLUX_T5_D_MODEL,
        pooled_projection_dim=FLUX_CLIP_HIDDEN,
        guidance_embeds=True,
    )


def _clip(folder: Path, vocabulary: tuple[str, ...], hidden: int, *, with_projection: bool, hidden_act: str,
          pad_token: str | None = None):
    """A tiny CLIP text encoder (hidden == projection size, as CLIP-L and CLIP-G) and its BPE tokenizer."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    options = {"pad_token": pad_token} if pad_token else {}
    write_clip_tokenizer(folder, vocabulary, **options)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    config = clip_text_config(tokenizer, hidden_act=hidden_act, hidden_size=hidden, projection_dim=hidden,
                              intermediate_size=2 * hidden)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return model, tokenizer, options


def _t5(folder: Path, vocabulary: tuple[str, ...], d_model: int):
    from transformers import T5EncoderModel, T5TokenizerFast

    write_t5_tokenizer(folder, vocabulary)
    tokenizer = T5TokenizerFast.from_pretrained(str(folder))
    return T5EncoderModel(t5_config(len(tokenizer), d_model)), tokenizer


def _save(pipeline, folder: Path, vocabulary: tuple[str, ...], clip_tokenizers: dict, t5_tokenizer: str | None,
          gemma_tokenizer: str | None = None, llama_tokenizer: str | None = None,
          qwen_tokenizer: str | None = None) -> Path:
    """save_pretrained, then the tokenizer files as written above: transformers 5 saves only tokenizer.json for
    CLIP (4.x loaders, SimpleTuner's among them, want vocab.json/merges.txt too) and may add files to T5's (and to
    the Gemma, Llama or Qwen tokenizer's, in subfolder `gemma_tokenizer`, `llama_tokenizer` or `qwen_tokenizer`)."""
    pipeline.save_pretrained(str(folder))
    for name, options in clip_tokenizers.items():
        write_clip_tokenizer(folder / name, vocabulary, **options)
    # transformers 5 names its T5 / Gemma / Llama tokenizer classes without "Fast" (the Fast names are aliases); in
    # 4.x those are the sentencepiece classes, which need a .model file. The real checkpoints name the fast
    # classes, as here.
    fast_classes = {}
    for subfolder, write, fast_class in ((t5_tokenizer, write_t5_tokenizer, "T5TokenizerFast"),
                                         (gemma_tokenizer, write_gemma_tokenizer, "GemmaTokenizerFast"),
                                         (llama_tokenizer, write_llama_tokenizer, "LlamaTokenizerFast"),
                                         # a byte-level BPE with vocab.json and merges.txt: 4.x's class loads too
                                         (qwen_tokenizer, write_qwen_tokenizer, "Qwen2Tokenizer")):
        if subfolder is not None:
            shutil.rmtree(folder / subfolder)
            write(folder / subfolder, vocabulary)
            fast_classes[subfolder] = fast_class
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index.update({name: ["transformers", cls] for name, cls in fast_classes.items()})
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _drop_unset_keys(folder / "transformer" / "config.json")
    return folder


def _save_with_tokenizer(pipeline, folder: Path, write_tokenizer, vocabulary: tuple[str, ...]) -> None:
    """save_pretrained, then the tokenizer/ files `write_tokenizer` writes: transformers 5 rewrites them."""
    pipeline.save_pretrained(str(folder))
    shutil.rmtree(folder / "tokenizer")
    write_tokenizer(folder / "tokenizer", vocabulary)


def _drop_unset_keys(config_file: Path) -> None:
    """Drop the null keys of a component's config, as the real configs have none: diffusers 0.42 writes some
    (FluxTransformer2DModel's `out_channels`, AutoencoderKLFlux2's `decoder_block_out_channels`) that SimpleTuner's
    own classes of those components do not take (they warn at every load)."""
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=2, sort_keys=True))


def save_tiny_sd3(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a loadable diffusers SD3 folder (SD3.5-medium layout, random weights, ~2 MB) to `folder`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = _seeded_folder(folder, seed)
    clip_l, tokenizer, options_l = _clip(folder / "tokenizer", vocabulary, SD3_CLIP_L_HIDDEN, with_projection=True,
                                         hidden_act="quick_gelu")
    clip_g, tokenizer_2, options_g = _clip(folder / "tokenizer_2", vocabulary, SD3_CLIP_G_HIDDEN,
                                           with_projection=True, hidden_act="gelu", pad_token=OPENCLIP_PAD_TOKEN)
    t5, tokenizer_3 = _t5(folder / "tokenizer_3", vocabulary, SD3_T5_D_MODEL)
    pipeline = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**sd3_transformer_config()),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
        vae=tiny_flow_vae(SD3_VAE_FACTORS),
        text_encoder=clip_l,
        tokenizer=tokenizer,
        text_encoder_2=clip_g,
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5,
        tokenizer_3=tokenizer_3,
    )
    return _save(pipeline, folder, vocabulary, {"tokenizer": options_l, "tokenizer_2": options_g}, "tokenizer_3")


def save_tiny_flux(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a loadable diffusers Flux folder (FLUX.1-dev layout: guidance embedding, dynamic shifting; random
    weights, ~1.5 MB) to `folder`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    folder = _seeded_folder(folder, seed)
    clip, tokenizer, options = _clip(folder / "tokenizer", vocabulary, FLUX_CLIP_HIDDEN, with_projection=False,
                                     hidden_act="quick_gelu")
    t5, tokenizer_2 = _t5(folder / "tokenizer_2", vocabulary, FLUX_T5_D_MODEL)
    pipeline = FluxPipeline(
        transformer=FluxTransformer2DModel(**flux_transformer_config()),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG),
        vae=tiny_flow_vae(FLUX_VAE_FACTORS),
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
    )
    return _save(pipeline, folder, vocabulary, {"tokenizer": options}, "tokenizer_2")


def chroma_transformer_config() -> dict:
    """ChromaTransformer2DModel config: Flux's stream layout without guidance or pooled inputs (1 double + 2 single
    stream blocks, width 32), its modulations from the small approximator MLP (1 layer of 32)."""
    return dict(
        **_flux_streams(),
        joint_attention_dim=CHROMA_T5_D_MODEL,
        approximator_num_channels=16,  # a multiple of 4: time, guidance and modulation-index sinusoids
        approximator_hidden_dim=32,
        approximator_layers=1,
    )


def save_tiny_chroma(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a loadable diffusers Chroma folder (lodestones/Chroma1-HD layout: one T5 encoder, no CLIP, Flux's VAE
    factors and dynamically shifted scheduler; random weights, ~1 MB) to `folder`."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    folder = _seeded_folder(folder, seed)
    t5, tokenizer = _t5(folder / "tokenizer", vocabulary, CHROMA_T5_D_MODEL)
    pipeline = ChromaPipeline(
        transformer=ChromaTransformer2DModel(**chroma_transformer_config()),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG),
        vae=tiny_flow_vae(FLUX_VAE_FACTORS),
        text_encoder=t5,
        tokenizer=tokenizer,
    )
    return _save(pipeline, folder, vocabulary, {}, "tokenizer")


def gemma2_config(vocab_size: int, hidden: int):
    """Gemma2Model config in Gemma 2's style (GQA, soft-capping, sliding window), two layers."""
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=BPE_MAX_TOKENS,
        sliding_window=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def lumina2_transformer_config() -> dict:
    """Lumina2Transformer2DModel config: 1 joint + 1 refiner layer per stream, width 32 (2 heads of 16, 1 kv head)."""
    return dict(
        sample_size=8,  # latent size the pipeline defaults to: 64 px
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        hidden_size=32,
        num_layers=1,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),  # sums to the head size, as (32, 32, 32) to 96
        axes_lens=(300, 512, 512),  # caption positions come first: >= tokenizer_max_length (256) + 1
        cap_feat_dim=LUMINA2_GEMMA_HIDDEN,
    )


def save_tiny_lumina2(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a loadable diffusers Lumina 2 folder (Alpha-VLLM/Lumina-Image-2.0 layout: a Gemma 2 encoder and its BPE
    tokenizer, Flux's VAE factors, shift 6; random weights, ~1 MB) to `folder`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Model, GemmaTokenizerFast

    folder = _seeded_folder(folder, seed)
    tokenizer = GemmaTokenizerFast.from_pretrained(str(write_gemma_tokenizer(folder / "tokenizer", vocabulary)))
    pipeline = Lumina2Pipeline(
        transformer=Lumina2Transformer2DModel(**lumina2_transformer_config()),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(LUMINA2_SCHEDULER_CONFIG),
        vae=tiny_flow_vae(FLUX_VAE_FACTORS),
        text_encoder=Gemma2Model(gemma2_config(len(tokenizer), LUMINA2_GEMMA_HIDDEN)),
        tokenizer=tokenizer,
    )
    return _save(pipeline, folder, vocabulary, {}, None, gemma_tokenizer="tokenizer")


def auraflow_transformer_config() -> dict:
    """AuraFlowTransformer2DModel config: 1 joint (MM-DiT) + 1 single block, width 32 (2 heads of 16), 2 x 2 patches
    of SDXL's 4-channel latents."""
    heads, head_dim = 2, 16
    return dict(
        sample_size=8,  # latent size the pipeline defaults to: 64 px
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=AURAFLOW_UMT5_D_MODEL,
        caption_projection_dim=heads * head_dim,
        pos_embed_max_size=256,  # a 16 x 16 grid of patches: latents up to 32 x 32, images up to 256 px
    )


def save_tiny_auraflow(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a loadable diffusers AuraFlow folder (fal/AuraFlow layout: a UMT5 encoder and its Llama-class tokenizer,
    SDXL's VAE, shift 1.73; random weights, ~1 MB) to `folder`."""
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import LlamaTokenizerFast, UMT5EncoderModel

    folder = _seeded_folder(folder, seed)
    tokenizer = LlamaTokenizerFast.from_pretrained(str(write_llama_tokenizer(folder / "tokenizer", vocabulary)))
    pipeline = AuraFlowPipeline(
        transformer=AuraFlowTransformer2DModel(**auraflow_transformer_config()),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(AURAFLOW_SCHEDULER_CONFIG),
        vae=tiny_vae(4, **SDXL_VAE_FACTORS),
        text_encoder=UMT5EncoderModel(t5_config(len(tokenizer), AURAFLOW_UMT5_D_MODEL, umt5=True)),
        tokenizer=tokenizer,
    )
    return _save(pipeline, folder, vocabulary, {}, None, llama_tokenizer="tokenizer")


def qwen3_config(vocab_size: int, hidden: int, layers: int = 2):
    """Qwen3ForCausalLM config in Qwen3-4B's style (GQA, q/k norm, tied embeddings), two layers unless told: Z-Image
    reads the second-to-last hidden states, here the first layer's."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=vocab_size - len(QWEN_SPECIALS) + QWEN_SPECIALS.index(QWEN_IM_END),
        pad_token_id=vocab_size - len(QWEN_SPECIALS) + QWEN_SPECIALS.index(QWEN_ENDOFTEXT),
    )


def z_image_transformer_config() -> dict:
    """ZImageTransformer2DModel config: 1 main + 1 refiner layer per stream, width 32 (2 heads of 16), 2 x 2 patches
    of the 16-channel latents."""
    return dict(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=LATENT_CHANNELS,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=Z_IMAGE_QWEN3_HIDDEN,
        axes_dims=(4, 6, 6),  # sums to the head size, as (32, 48, 48) to 128
        axes_lens=(1024, 512, 512),  # caption positions come first: > tokenizer_max_length (512) + 1
    )


def _z_image_components(folder: Path, vocabulary: tuple[str, ...], scheduler_config: dict, **transformer) -> dict:
    """The components Z-Image and Z-Image Omni share, for their pipelines: the transformer (z_image_transformer_config
    and `transformer`), the scheduler from `scheduler_config`, Flux's VAE, the Qwen3 causal LM and its tokenizer
    (written to folder/tokenizer)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3ForCausalLM

    tokenizer = Qwen2Tokenizer.from_pretrained(str(write_qwen_tokenizer(folder / "tokenizer", vocabulary)))
    return dict(
        transformer=ZImageTransformer2DModel(**z_image_transformer_config(), **transformer),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config),
        vae=tiny_flow_vae(FLUX_VAE_FACTORS),
        text_encoder=Qwen3ForCausalLM(qwen3_config(len(tokenizer), Z_IMAGE_QWEN3_HIDDEN)),
        tokenizer=tokenizer,
    )


def save_tiny_z_image(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a loadable diffusers Z-Image folder (Tongyi-MAI/Z-Image-Turbo layout: a Qwen3 causal LM and its
    byte-level BPE tokenizer with Qwen3's chat template, Flux's VAE, shift 3; random weights, ~2 MB, most of it the
    timestep embedder's fixed 1024-wide MLP) to `folder`."""
    from diffusers import ZImagePipeline

    folder = _seeded_folder(folder, seed)
    pipeline = ZImagePipeline(**_z_image_components(folder, vocabulary, Z_IMAGE_SCHEDULER_CONFIG))
    return _save(pipeline, folder, vocabulary, {}, None, qwen_tokenizer="tokenizer")


def save_tiny_z_image_omni(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a loadable diffusers Z-Image Omni folder (SimpleTuner's z_image_omni, TONGYI-Lab/Z-Image-Base layout:
    save_tiny_z_image's transformer with its SigLIP stream (siglip_feat_dim), text encoder, tokenizer and VAE, plus a
    one-layer SigLIP 2 vision tower (siglip/) and its image processor (siglip_processor/), which both pipelines take
    (reference images only reach them); the scheduler at Z-Image base's fixed shift of 6; random weights, ~2 MB)."""
    from diffusers import ZImageOmniPipeline
    from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    folder = _seeded_folder(folder, seed)
    siglip = Siglip2VisionModel(Siglip2VisionConfig(
        hidden_size=Z_IMAGE_OMNI_SIGLIP_HIDDEN, intermediate_size=2 * Z_IMAGE_OMNI_SIGLIP_HIDDEN, num_hidden_layers=1,
        num_attention_heads=2, patch_size=16, num_patches=16))
    pipeline = ZImageOmniPipeline(
        **_z_image_components(folder, vocabulary, Z_IMAGE_OMNI_SCHEDULER_CONFIG,
                              siglip_feat_dim=Z_IMAGE_OMNI_SIGLIP_HIDDEN),
        siglip=siglip,
        siglip_processor=Siglip2ImageProcessor(patch_size=16, max_num_patches=16),
    )
    return _save(pipeline, folder, vocabulary, {}, None, qwen_tokenizer="tokenizer")


# Qwen/Qwen-Image's scheduler/scheduler_config.json (SimpleTuner 4.10.1 trains on the same values, hard-coded in
# QwenImage.setup_training_noise_schedule): the shift follows the image's token count (mu, up to 8192 tokens), and
# the shifted schedule is stretched to end at sigma 0.02 (shift_terminal).
QWEN_IMAGE_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
# diffusers' QwenImagePipeline.prompt_template_encode: its first QWEN_IMAGE_TEMPLATE_TOKENS tokens (the system turn
# and "<|im_start|>user\n", prompt_template_encode_start_idx) are dropped from the encoder's last hidden states.
QWEN_IMAGE_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                       "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                       "<|im_end|>\n<|im_start|>assistant\n")
QWEN_IMAGE_TEMPLATE_TOKENS = 34
# Qwen2.5-VL's vision specials, after the text ones (ids 151652-151656 in the real vocabulary).
QWEN_VISION_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN_IMAGE_TEXT_HIDDEN = 32


def write_qwen2_5_vl_tokenizer(folder: Path, words: tuple[str, ...] = ()) -> Path:
    """Write Qwen2.5-VL's tokenizer as Qwen-Image ships it (tokenizer/, `Qwen2Tokenizer`): write_qwen_tokenizer's
    byte-level BPE with every word of Qwen-Image's prompt template as one piece as well as `words`, so that the
    template's system turn is QWEN_IMAGE_TEMPLATE_TOKENS tokens as with the real vocabulary (the pipeline's fixed drop
    leaves exactly the prompt), plus the vision specials (QWEN_VISION_SPECIALS) the text encoder's config names; no
    chat template (Qwen-Image formats its prompt itself)."""
    import re

    from tokenizers import AddedToken, Tokenizer

    template_words = re.findall(r"[A-Za-z]+", re.sub(r"<\|\w+\|>", " ", QWEN_IMAGE_TEMPLATE.format("")))
    folder = write_qwen_tokenizer(folder, tuple(words) + tuple(template_words))
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_VISION_SPECIALS])
    tokenizer.save(str(folder / "tokenizer.json"))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps({**config, "model_max_length": 32768}))
    return folder


def qwen2_5_vl_config(tokenizer, hidden: int):
    """Qwen2_5_VLConfig in Qwen2.5-VL's style (GQA, multimodal RoPE, untied head): two text layers of width `hidden`
    (2 heads of 16, 1 kv head; mrope sections summing to half the head size, as (16, 24, 24) to 64) and a one-block
    vision tower (patch 14, 2 x 2 merge) projecting to `hidden`; the special ids are the tokenizer's."""
    from transformers import Qwen2_5_VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token)
           for token in (QWEN_ENDOFTEXT, QWEN_IM_END, *QWEN_VISION_SPECIALS)}
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids[QWEN_ENDOFTEXT], eos_token_id=ids[QWEN_IM_END], pad_token_id=ids[QWEN_ENDOFTEXT],
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def qwen_image_transformer_config() -> dict:
    """QwenImageTransformer2DModel config: 2 MM-DiT blocks, width 32 (2 heads of 16), 2 x 2 packed latents."""
    return dict(
        patch_size=2,
        in_channels=4 * LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=QWEN_IMAGE_TEXT_HIDDEN,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (16, 56, 56) to 128
    )


def tiny_qwen_image_vae():
    """AutoencoderKLQwenImage (Wan 2.1's causal 3-D VAE) at base width 4, one res block per level: 16 latent channels,
    8x spatial downsampling (4 levels), Qwen-Image's default latents_mean / latents_std."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=4, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True, True])


def save_tiny_qwen_image(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a loadable diffusers Qwen-Image folder (Qwen/Qwen-Image layout, SimpleTuner's v1.0 flavour: a Qwen2.5-VL
    text encoder with its vision tower and tokenizer, the Qwen-Image VAE, the dynamically shifted scheduler with a
    terminal sigma; random weights, ~1 MB) to `folder`. No processor/: the text-to-image pipeline takes none."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    folder = _seeded_folder(folder, seed)
    tokenizer = Qwen2Tokenizer.from_pretrained(str(write_qwen2_5_vl_tokenizer(folder / "tokenizer", vocabulary)))
    pipeline = QwenImagePipeline(
        transformer=QwenImageTransformer2DModel(**qwen_image_transformer_config()),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG),
        vae=tiny_qwen_image_vae(),
        text_encoder=Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(tokenizer, QWEN_IMAGE_TEXT_HIDDEN)),
        tokenizer=tokenizer,
    )
    _save_with_tokenizer(pipeline, folder, write_qwen2_5_vl_tokenizer, vocabulary)
    # diffusers 0.42 writes the Qwen-Image-2512 / Edit options (all off), which SimpleTuner's own transformer class
    # does not take (it warns); Qwen/Qwen-Image's config has none of them.
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
        if config.get(key) is False:
            del config[key]
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


# LongCat-Image's prompt template (diffusers' and SimpleTuner's LongCatImagePipeline: prompt_template_encode_prefix /
# _suffix around the prompt's 512 padded tokens). SimpleTuner drops a fixed 36 tokens before the prompt and 5 after it
# from the encoder's last hidden states (prompt_template_encode_start_idx / _end_idx; diffusers counts them), so the
# tokenizer must give the prefix and suffix exactly LONGCAT_IMAGE_TEMPLATE_TOKENS tokens, as the real vocabulary does.
LONGCAT_IMAGE_TEMPLATE = ("<|im_start|>system\nAs an image captioning expert, generate a descriptive text prompt based "
                          "on an image content, suitable for input to a text-to-image model.<|im_end|>\n"
                          "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
LONGCAT_IMAGE_TEMPLATE_TOKENS = (36, 5)
LONGCAT_IMAGE_TEXT_HIDDEN = 32
_CHAT_ROLES = ("assistant", "system", "user")
# Qwen2-VL's chat template for what LongCat's prompt rewrite sends (text and image parts, a default system turn):
# its text_processor/ (Qwen2VLProcessor) needs one.
QWEN2_VL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- elif part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def write_longcat_image_tokenizer(folder: Path, words: tuple[str, ...] = ()) -> Path:
    """Write Qwen2.5-VL's tokenizer as LongCat-Image ships it (tokenizer/, text_processor/):
    write_qwen2_5_vl_tokenizer's with one piece per word of LongCat's template ("text-to-image": "-to", "-image";
    "captioning": "caption", "ing") as well as `words`, and the chat roles' merges ranked first among the unspaced
    words', so that the template's prefix and suffix are LONGCAT_IMAGE_TEMPLATE_TOKENS tokens (an unspaced
    "assistant" one token, whatever the words)."""
    import re

    folder = Path(folder)
    template = re.findall(r"-?[A-Za-z]+", re.sub(r"<\|\w+\|>", " ", LONGCAT_IMAGE_TEMPLATE.format("")))
    template = [word for word in template if word != "captioning"] + ["caption", "ing"]
    write_qwen2_5_vl_tokenizer(folder, tuple(words) + tuple(template))
    return _rank_chat_roles_first(folder)


def _rank_chat_roles_first(folder: Path) -> Path:
    """Move the chat roles' merges in `folder`'s byte-level BPE (write_qwen_tokenizer's) first among the unspaced
    words', so that an unspaced "assistant" (a template's suffix) is one token whatever the other words' merges."""
    roles = [[role[:i], role[i]] for role in _CHAT_ROLES for i in range(1, len(role))]
    tokenizer_file = folder / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    merges = [merge for merge in tokenizer["model"]["merges"] if merge not in roles]
    unspaced = next(i for i, (left, _) in enumerate(merges) if not left.startswith("\u0120"))
    merges[unspaced:unspaced] = roles  # after the spaced words' chains, which start at a leading space only
    tokenizer["model"]["merges"] = merges
    tokenizer_file.write_text(json.dumps(tokenizer, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def longcat_image_transformer_config() -> dict:
    """LongCatImageTransformer2DModel config: Flux's stream layout (1 double + 2 single stream blocks, width 32, 2 x 2
    packed latents), no guidance or pooled input; the text width is Qwen2.5-VL's."""
    return dict(**_flux_streams(), joint_attention_dim=LONGCAT_IMAGE_TEXT_HIDDEN,
                pooled_projection_dim=LONGCAT_IMAGE_TEXT_HIDDEN)


def save_tiny_longcat_image(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a loadable diffusers LongCat-Image folder (meituan-longcat/LongCat-Image layout, SimpleTuner's "final"
    flavour: a Qwen2.5-VL text encoder with its vision tower, its tokenizer (tokenizer/) and processor
    (text_processor/, `Qwen2VLProcessor`, which the pipelines load for their prompt rewrite), Flux's VAE and
    dynamically shifted scheduler; random weights, ~1.2 MB) to `folder`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImagePipeline, LongCatImageTransformer2DModel
    from transformers import (Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    folder = _seeded_folder(folder, seed)
    tokenizer = Qwen2Tokenizer.from_pretrained(str(write_longcat_image_tokenizer(folder / "tokenizer", vocabulary)))
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2_VL_CHAT_TEMPLATE)
    pipeline = LongCatImagePipeline(
        transformer=LongCatImageTransformer2DModel(**longcat_image_transformer_config()),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG),
        vae=tiny_flow_vae(FLUX_VAE_FACTORS),
        text_encoder=Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(tokenizer, LONGCAT_IMAGE_TEXT_HIDDEN)),
        tokenizer=tokenizer,
        text_processor=processor,
    )
    _save_with_tokenizer(pipeline, folder, write_longcat_image_tokenizer, vocabulary)
    # the processor's copy too (transformers 5 rewrites its tokenizer.json and config only)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / "text_processor" / name).unlink(missing_ok=True)
    write_longcat_image_tokenizer(folder / "text_processor", vocabulary)
    return folder


# baidu/ERNIE-Image's scheduler/scheduler_config.json: a fixed shift of 4, no dynamic shifting (its pipeline passes
# the plain linear sigmas, which the scheduler shifts).
ERNIE_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 4.0,
    "use_dynamic_shifting": False,
}
# Mistral's Tekken specials, at their real ids (Ministral 3's): [IMG] (10) is the text encoder's image_token_index.
TEKKEN_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>")
# Ministral 3's text width: SimpleTuner's Ernie refuses prompt states of any other (TEXT_EMBED_DIM), so the tiny
# encoder keeps it and is narrow everywhere else (one head of 8, an 8-wide MLP).
ERNIE_TEXT_HIDDEN = 3072


def write_tekken_tokenizer(folder: Path, words: tuple[str, ...] = ()) -> Path:
    """Write a Tekken-style byte-level BPE tokenizer (tokenizer.json + config) as ERNIE-Image ships it (tokenizer/,
    `TokenizersBackend`), built with `tokenizers`: the Tekken specials first (TEKKEN_SPECIALS), the 256 byte-level
    pieces, each of `words` as one piece with and without a leading space; <s> first, no </s>, padded on the right
    with <pad>. SimpleTuner builds a `PreTrainedTokenizerFast` from tokenizer.json and the config's special tokens;
    diffusers loads the folder with AutoTokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = _byte_level_words(TEKKEN_SPECIALS, set(words))
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                              fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                             special_tokens=[("<s>", vocab["<s>"])])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TEKKEN_SPECIALS])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TokenizersBackend", "backend": "tokenizers", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 2048, "clean_up_tokenization_spaces": False,
        "legacy": True, "add_prefix_space": None,
    }))
    return folder


def mistral3_config(tokenizer):
    """Mistral3Config as ERNIE-Image's text_encoder/ (a Ministral 3 text model, "mistral" blocks, and a Pixtral vision
    tower it never uses for prompts): two text layers of width ERNIE_TEXT_HIDDEN (SimpleTuner and the pipeline read
    the second-to-last hidden states), tied embeddings; a one-layer vision tower of width 16. The projector's square
    3072 x 3072 layer is most of the folder's ~45 MB."""
    from transformers import Mistral3Config

    return Mistral3Config(
        text_config=dict(
            model_type="mistral", vocab_size=len(tokenizer), hidden_size=ERNIE_TEXT_HIDDEN, intermediate_size=8,
            num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
            max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            sliding_window=None, tie_word_embeddings=True,
        ),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=28, patch_size=14),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), multimodal_projector_bias=False,
        projector_hidden_act="gelu", spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=True,
    )


def ernie_transformer_config() -> dict:
    """ErnieImageTransformer2DModel config: 1 single-stream layer, width 32 (2 heads of 16), on the 128 channels of
    2 x 2 patchified 32-channel latents (patch_size 1); the text input is Ministral 3's width."""
    return dict(hidden_size=32, num_attention_heads=2, num_layers=1, ffn_hidden_size=64, in_channels=128,
                out_channels=128, patch_size=1, text_in_dim=ERNIE_TEXT_HIDDEN, rope_theta=256,
                rope_axes_dim=(4, 6, 6))  # sums to the head size, as (32, 48, 48) to 128


def tiny_flux2_vae():
    """AutoencoderKLFlux2 (FLUX.2's VAE, ERNIE-Image's) at width 8: 32 latent channels, 8x spatial downsampling (4
    blocks), the batch norm over its 2 x 2 patchified 128 channels."""
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                              latent_channels=32)


def save_tiny_ernie(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a loadable diffusers ERNIE-Image folder (baidu/ERNIE-Image layout, SimpleTuner's "base" flavour: a
    Mistral3Model text encoder, its Tekken-style tokenizer, FLUX.2's VAE, the scheduler at a fixed shift of 4; random
    weights, ~45 MB) to `folder`. No pe/ or pe_tokenizer/: the prompt enhancer (a 3B Ministral 3 causal LM) is optional
    in the pipeline, and SimpleTuner loads neither."""
    from diffusers import ErnieImagePipeline, ErnieImageTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import Mistral3Model, PreTrainedTokenizerFast

    folder = _seeded_folder(folder, seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(write_tekken_tokenizer(folder / "tokenizer", vocabulary)))
    transformer = ErnieImageTransformer2DModel(**ernie_transformer_config())
    # diffusers zero-initialises the modulation and the output layer, so an untrained transformer predicts 0
    # whatever its input; a trained checkpoint's are not zero.
    for layer in (transformer.adaLN_modulation[-1], transformer.final_linear):
        layer.reset_parameters()
    pipeline = ErnieImagePipeline(
        transformer=transformer,
        vae=tiny_flux2_vae(),
        text_encoder=Mistral3Model(mistral3_config(tokenizer)),
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(ERNIE_SCHEDULER_CONFIG),
    )
    _save_with_tokenizer(pipeline, folder, write_tekken_tokenizer, vocabulary)
    _drop_unset_keys(folder / "vae" / "config.json")
    return folder


# FLUX.3 Image Klein (SimpleTuner's flux3_image): the static shift its pipeline samples and SimpleTuner trains at
# (FLOW_SHIFT, which Flux3Image forces on flow_schedule_shift), no dynamic shifting.
FLUX3_IMAGE_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 6.93,
    "use_dynamic_shifting": False,
}
# Qwen3-VL's hidden states SimpleTuner's flux3_image text encoding concatenates (its text.TEXT_LAYERS): the encoder
# needs that many layers, and the transformer's text input is that many times its width.
FLUX3_IMAGE_TEXT_LAYERS = (4, 8, 12, 16, 20, 24, 28, 32)
FLUX3_IMAGE_TEXT_HIDDEN = 16
# Qwen3-VL's chat template for what flux3_image sends (one user turn of text parts, add_generation_prompt): ChatML
# turns, no default system turn.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- elif part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def write_qwen3_vl_tokenizer(folder: Path, words: tuple[str, ...] = ()) -> Path:
    """Write Qwen3-VL's tokenizer: write_qwen_tokenizer's byte-level BPE with the vision specials
    (QWEN_VISION_SPECIALS) the text encoder's config names and Qwen3-VL's chat template, which takes a message's
    content as a list of parts."""
    from tokenizers import AddedToken, Tokenizer

    folder = write_qwen_tokenizer(folder, words)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_VISION_SPECIALS])
    tokenizer.save(str(folder / "tokenizer.json"))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": QWEN3_VL_CHAT_TEMPLATE, "model_max_length": 262144}))
    return folder


def qwen3_vl_config(tokenizer, hidden: int, layers: int = max(FLUX3_IMAGE_TEXT_LAYERS)):
    """Qwen3VLConfig in Qwen3-VL-4B's style (GQA, interleaved multimodal RoPE, tied embeddings): `layers` text layers
    (default: as many as FLUX3_IMAGE_TEXT_LAYERS reads) of width `hidden` (2 heads of 8, 1 kv head; mrope sections
    summing to half the head size, as (24, 20, 20) to 64) and a one-block vision tower (patch 16, 2 x 2 merge, one
    deepstack layer) projecting to `hidden`; the special ids are the tokenizer's."""
    from transformers import Qwen3VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token)
           for token in (QWEN_ENDOFTEXT, QWEN_IM_END, *QWEN_VISION_SPECIALS)}
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            max_position_embeddings=262144, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True},
            bos_token_id=ids[QWEN_ENDOFTEXT], eos_token_id=ids[QWEN_IM_END], pad_token_id=ids[QWEN_ENDOFTEXT],
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                           patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def flux3_image_transformer_config() -> dict:
    """SimpleTuner's Flux3ImageTransformer2DModel config: 1 per-stream + 1 joint block, width 32 (2 heads of 16), the
    VAE's 2 x 2 patchified 128 channels per token; the text width is the concatenated Qwen3-VL layers'."""
    return dict(
        in_channels=128,
        cond_in_channels=128,
        joint_attention_dim=len(FLUX3_IMAGE_TEXT_LAYERS) * FLUX3_IMAGE_TEXT_HIDDEN,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        axes_dims_rope=(4, 4, 4, 4),  # sums to attention_head_dim, as (32, 32, 32, 32) to 128
        timestep_channels=32,
    )


def save_tiny_flux3_image(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a FLUX.3 Image Klein base folder (SimpleTuner's flux3_image "klein-base" flavour, which diffusers has no
    pipeline for: SimpleTuner's Flux3ImagePipeline writes and loads it) to `folder`: its transformer, a Qwen3-VL text
    encoder (`Qwen3VLModel`, text_encoder/, with its tokenizer beside it, where the pipeline and SimpleTuner load it
    from), FLUX.2's VAE (`AutoencoderKLFlux2`: 32 latent channels, 2 x 2 patchified and batch-normalised to 128) and
    the scheduler at the fixed shift 6.93; random weights, ~1 MB."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from simpletuner.helpers.models.flux3_image.pipeline import Flux3ImagePipeline
    from simpletuner.helpers.models.flux3_image.transformer import Flux3ImageTransformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3VLModel

    folder = _seeded_folder(folder, seed)
    tokenizer = Qwen2Tokenizer.from_pretrained(str(write_qwen3_vl_tokenizer(folder / "tokenizer", vocabulary)))
    pipeline = Flux3ImagePipeline(
        transformer=Flux3ImageTransformer2DModel(**flux3_image_transformer_config()),
        vae=tiny_flux2_vae(),
        text_encoder=Qwen3VLModel(qwen3_vl_config(tokenizer, FLUX3_IMAGE_TEXT_HIDDEN)),
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX3_IMAGE_SCHEDULER_CONFIG),
    )
    pipeline.save_pretrained(str(folder))
    # The pipeline and SimpleTuner read the tokenizer from text_encoder/ (so the index names none), and
    # transformers 5 rewrites its files: the ones written here, there.
    shutil.rmtree(folder / "tokenizer")
    write_qwen3_vl_tokenizer(folder / "text_encoder", vocabulary)
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    del index["tokenizer"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _drop_unset_keys(folder / "vae" / "config.json")
    return folder


# krea/Krea-2-Raw's scheduler/scheduler_config.json (SimpleTuner trains on it with `shift`, which dynamic shifting
# ignores, replaced by flow_schedule_shift): the shift follows the image's token count (mu, from 256 to 6400 tokens:
# 256 to 1280 px), no terminal stretch.
KREA2_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 6400,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
# Krea2Pipeline's default text_encoder_select_layers (Qwen3-VL-4B's hidden states stacked per token as the
# transformer's text input). SimpleTuner builds the pipeline it encodes prompts with from the loaded components alone
# (get_pipeline(load_base_model=False)), so the default holds whatever model_index.json says: the text encoder needs
# the 4B's 36 layers and the transformer these 12 taps.
KREA2_TEXT_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)
KREA2_TEXT_HIDDEN = 16


def write_krea2_tokenizer(folder: Path, words: tuple[str, ...] = ()) -> Path:
    """Write Qwen3-VL's tokenizer as Krea 2 ships it (tokenizer/): write_qwen3_vl_tokenizer's with every word of
    Qwen-Image's template as one piece as well as `words`, and the chat roles' merges ranked first among the unspaced
    words', so that the template's system turn is QWEN_IMAGE_TEMPLATE_TOKENS tokens and its assistant suffix 5, as
    with the real vocabulary: Krea2Pipeline's template is Qwen-Image's, and it counts both (it drops the first and pads
    the prompt to 512 less the second before appending it)."""
    import re

    template = re.findall(r"[A-Za-z]+", re.sub(r"<\|\w+\|>", " ", QWEN_IMAGE_TEMPLATE.format("")))
    return _rank_chat_roles_first(write_qwen3_vl_tokenizer(Path(folder), tuple(words) + tuple(template)))


def krea2_transformer_config() -> dict:
    """Krea2Transformer2DModel config: 1 single-stream block, width 32 (2 heads of 16, 1 kv head), 2 x 2 packed
    latents; a text fusion of 1 block across the 12 tapped layers and 1 across the tokens, at Qwen3-VL's width."""
    return dict(
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        timestep_embed_dim=16,
        text_hidden_dim=KREA2_TEXT_HIDDEN,
        num_text_layers=len(KREA2_TEXT_LAYERS),
        text_num_attention_heads=2,
        text_num_key_value_heads=2,
        text_intermediate_size=32,
        num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (32, 48, 48) to 128
    )


def save_tiny_krea2(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a loadable diffusers Krea 2 folder (krea/Krea-2-Raw layout, SimpleTuner's "raw" flavour: a Qwen3-VL text
    encoder (`Qwen3VLModel`, 36 layers) with its vision tower and tokenizer, the Qwen-Image VAE, the dynamically
    shifted scheduler; random weights, ~1.5 MB) to `folder`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3VLModel

    folder = _seeded_folder(folder, seed)
    tokenizer = Qwen2Tokenizer.from_pretrained(str(write_krea2_tokenizer(folder / "tokenizer", vocabulary)))
    pipeline = Krea2Pipeline(
        transformer=Krea2Transformer2DModel(**krea2_transformer_config()),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(KREA2_SCHEDULER_CONFIG),
        vae=tiny_qwen_image_vae(),
        text_encoder=Qwen3VLModel(qwen3_vl_config(tokenizer, KREA2_TEXT_HIDDEN, layers=max(KREA2_TEXT_LAYERS) + 1)),
        tokenizer=tokenizer,
        text_encoder_select_layers=KREA2_TEXT_LAYERS,
    )
    _save_with_tokenizer(pipeline, folder, write_krea2_tokenizer, vocabulary)
    return folder


# Qwen3's hidden states FLUX.2-klein's prompt stacks (SimpleTuner's KLEIN_OUTPUT_LAYERS, the pipeline's default
# text_encoder_out_layers): the encoder needs that many layers, and the transformer's text input is 3x its width.
FLUX2_KLEIN_TEXT_LAYERS = (9, 18, 27)
FLUX2_KLEIN_QWEN3_HIDDEN = 16


def flux2_klein_transformer_config() -> dict:
    """Flux2Transformer2DModel config as FLUX.2-klein's (no guidance embedding): 1 double + 1 single stream block,
    width 32 (2 heads of 16), the VAE's 2 x 2 patchified 128 channels per token; the text width is the stacked Qwen3
    layers'."""
    return dict(in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=len(FLUX2_KLEIN_TEXT_LAYERS) * FLUX2_KLEIN_QWEN3_HIDDEN,
                timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),  # sums to the head size, as 4 x 32 to 128
                guidance_embeds=False)


def save_tiny_flux2_klein(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a loadable diffusers FLUX.2-klein base folder (black-forest-labs/FLUX.2-klein-base-4B layout, SimpleTuner's
    flux2 "klein-4b" / "klein-9b" flavours: `Flux2KleinPipeline` with is_distilled false, a Qwen3 causal LM of 27
    layers and its tokenizer with Qwen3's chat template, FLUX.2's VAE, Flux's dynamically shifted scheduler; random
    weights, ~1 MB) to `folder`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3ForCausalLM

    folder = _seeded_folder(folder, seed)
    tokenizer = Qwen2Tokenizer.from_pretrained(str(write_qwen_tokenizer(folder / "tokenizer", vocabulary)))
    pipeline = Flux2KleinPipeline(
        transformer=Flux2Transformer2DModel(**flux2_klein_transformer_config()),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG),
        vae=tiny_flux2_vae(),
        text_encoder=Qwen3ForCausalLM(qwen3_config(len(tokenizer), FLUX2_KLEIN_QWEN3_HIDDEN,
                                                   layers=max(FLUX2_KLEIN_TEXT_LAYERS))),
        tokenizer=tokenizer,
        is_distilled=False,
    )
    _save(pipeline, folder, vocabulary, {}, None, qwen_tokenizer="tokenizer")
    index_file = folder / "model_index.json"  # the real index names the fast class (one class in transformers 5)
    index_file.write_text(json.dumps({**json.loads(index_file.read_text()),
                                      "tokenizer": ["transformers", "Qwen2TokenizerFast"]}, indent=2, sort_keys=True))
    _drop_unset_keys(folder / "vae" / "config.json")
    return folder


# MOSSImageScheduler's options (OpenMOSS's sampling grid: linear sigmas shifted once by 5, then the terminal zero);
# SimpleTuner trains on its own unshifted schedule, whatever the folder says (MOSSImage.setup_training_noise_schedule).
MOSS_IMAGE_SCHEDULER_CONFIG = {"_class_name": "MOSSImageScheduler", "num_train_timesteps": 1000, "shift": 5.0}
MOSS_IMAGE_TEXT_HIDDEN = 32
# OpenMOSS's recommended negative-branch skip layer (the pipeline's default uncond_skip_layers, SimpleTuner's
# moss_image_uncond_skip_layers): every pipeline call checks that it names a block, so the tiny transformer keeps it.
MOSS_IMAGE_UNCOND_SKIP_LAYER = 22


def qwen3_5_config(tokenizer, hidden: int):
    """Qwen3_5Config as MOSS-Image's text_encoder/ (`Qwen3_5Model`: Qwen3.5's text model and its vision tower): two
    text layers of width `hidden` (Qwen3.5's pattern, a Gated DeltaNet linear-attention layer then a full-attention
    one; 2 heads of 16, 1 kv head, a quarter of the head rotary with the mrope sections summing to its half) and a
    one-block vision tower projecting to `hidden`; the special ids are the tokenizer's."""
    from transformers import Qwen3_5Config

    return Qwen3_5Config(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"], num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
            linear_value_head_dim=8, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                             "mrope_section": [1, 1, 0], "mrope_interleaved": True},
            pad_token_id=tokenizer.convert_tokens_to_ids(QWEN_ENDOFTEXT),
            eos_token_id=tokenizer.convert_tokens_to_ids(QWEN_IM_END),
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                           patch_size=16, num_position_embeddings=16),
        tie_word_embeddings=False,
    )


def moss_image_transformer_config() -> dict:
    """MOSSImageTransformer config: MOSS_IMAGE_UNCOND_SKIP_LAYER + 1 blocks (real: 42), width 16 (2 heads of 8,
    the smallest head the class takes), on the VAE's 128 patchified latent channels; the text input is Qwen3.5's
    width."""
    return dict(dim=16, ffn_dim=32, num_heads=2, num_layers=MOSS_IMAGE_UNCOND_SKIP_LAYER + 1,
                text_dim=MOSS_IMAGE_TEXT_HIDDEN, freq_dim=16, latent_channels=128)


def save_tiny_moss_image(folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """Write a MOSS-Image folder (SimpleTuner's "sft" flavour, as its own `MOSSImagePipeline.from_pretrained` reads
    one; diffusers has no MOSS pipeline: SimpleTuner's `MOSSImageTransformer`, a Qwen3.5 text encoder
    (`Qwen3_5Model`) with Qwen3's byte-level BPE tokenizer and chat template, FLUX.2's VAE, `MOSSImageScheduler`;
    random weights, ~0.8 MB) to `folder`."""
    from simpletuner.helpers.models.moss_image.pipeline import MOSSImagePipeline, MOSSImageScheduler
    from simpletuner.helpers.models.moss_image.transformer import MOSSImageTransformer
    from transformers import Qwen2Tokenizer, Qwen3_5Model

    folder = _seeded_folder(folder, seed)
    tokenizer = Qwen2Tokenizer.from_pretrained(str(write_qwen_tokenizer(folder / "tokenizer", vocabulary)))
    pipeline = MOSSImagePipeline(
        transformer=MOSSImageTransformer(**moss_image_transformer_config()),
        scheduler=MOSSImageScheduler.from_config(MOSS_IMAGE_SCHEDULER_CONFIG),
        vae=tiny_flux2_vae(),
        text_encoder=Qwen3_5Model(qwen3_5_config(tokenizer, MOSS_IMAGE_TEXT_HIDDEN)),
        tokenizer=tokenizer,
    )
    _save_with_tokenizer(pipeline, folder, write_qwen_tokenizer, vocabulary)
    # MOSSImageScheduler's config holds FlowMatchEulerDiscreteScheduler's options too, which its own __init__ does
    # not take (it warns at every load): only the ones it takes.
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {**MOSS_IMAGE_SCHEDULER_CONFIG, "_diffusers_version": pipeline.scheduler.config["_diffusers_version"]},
        indent=2, sort_keys=True))
    _drop_unset_keys(folder / "vae" / "config.json")
    return folder


# SimpleTuner model_family -> writer.
FAMILIES = {"sd3": save_tiny_sd3, "flux": save_tiny_flux, "chroma": save_tiny_chroma, "lumina2": save_tiny_lumina2,
            "auraflow": save_tiny_auraflow, "z_image": save_tiny_z_image, "z_image_omni": save_tiny_z_image_omni,
            "qwen_image": save_tiny_qwen_image, "longcat_image": save_tiny_longcat_image, "ernie": save_tiny_ernie,
            "flux3_image": save_tiny_flux3_image, "krea2": save_tiny_krea2, "flux2": save_tiny_flux2_klein,
            "moss_image": save_tiny_moss_image}


def save_tiny_flow(family: str, folder: Path, seed: int = 0, *, vocabulary: tuple[str, ...] = ()) -> Path:
    """The writer for SimpleTuner's model_family name (a key of FAMILIES)."""
    return FAMILIES[family](folder, seed, vocabulary=vocabulary)

