"""How the caches are laid out: the store folder, the manifest, and the key of every entry (latents, their
time_ids, caption embeddings, records of SimpleTuner-format files). Shared by the build, the trainer's data path and
the SimpleTuner-format writer; imports nothing of theirs."""

from __future__ import annotations

import hashlib
from pathlib import Path

LCM_DIR = "lcm"  # the mmap cache lives in <cache_dir_vae>/lcm and <text cache_dir>/lcm
MANIFEST = "manifest.json"
# 3: one image entry per line (a build reads back only the entries it needs); 2: the same JSON indented.
MANIFEST_VERSION = 3
TIME_IDS = "#time_ids"  # latent key + this suffix: SDXL add_time_ids of the image
PROMPT_EMBEDS = "/prompt_embeds"
POOLED_PROMPT_EMBEDS = "/pooled_prompt_embeds"
# model_family -> the parts of a caption entry, as the family's SimpleTuner text cache file holds them.
TEXT_PARTS = {
    "sdxl": (PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS),
    "sd1x": (PROMPT_EMBEDS,),
    "sd3": (PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS),
    "flux": (PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS, "/time_ids", "/attention_masks"),
    "chroma": (PROMPT_EMBEDS, "/attention_masks"),
    "lumina2": (PROMPT_EMBEDS, "/prompt_attention_mask"),
    "auraflow": (PROMPT_EMBEDS, "/prompt_attention_mask"),
    "z_image": (PROMPT_EMBEDS, "/attention_mask"),
    "z_image_omni": (PROMPT_EMBEDS, "/attention_mask"),
    "longcat_image": (PROMPT_EMBEDS, "/text_ids"),  # no mask; the text's rope positions (float64)
}
# Families whose captions the trainer's own SimpleTuner model encodes (its `encode_text_batch`, then
# `pack_text_embeddings_for_cache`, as its text cache does); each part is stored as that dict holds it. SDXL's and
# SD 1.x's are encoded here (cache_build/encode.py), their prompt_embeds stored without the batch axis.
MODEL_ENCODED_FAMILIES = ("sd3", "flux", "chroma", "lumina2", "auraflow", "z_image", "z_image_omni", "longcat_image")
# Model families whose latents and text embeddings the trainer's data path produces as SimpleTuner does.
FAMILIES = ("sdxl", "sd1x", *MODEL_ENCODED_FAMILIES)
# latent or caption key + this + "<size>.<mtime_ns>.<inode>": the SimpleTuner-format file of that entry that
# this build wrote. A file whose stat matches a record is ours and holds that entry.
PT_RECORD = "#pt@"


def text_key(caption: str) -> str:
    """md5 of a caption, as SimpleTuner names its text cache files."""
    return hashlib.md5(caption.encode()).hexdigest()


def text_entry(caption: str, text_digest: str) -> str:
    """Key of a caption's embeddings in the store: its md5 and the text fingerprint's digest."""
    return f"{text_key(caption)}@{text_digest}"


def time_ids(sample: dict) -> list[int]:
    """SDXL add_time_ids: original (H, W), crop (top, left), target (H, W) (sample sizes are (W, H))."""
    (ow, oh), (top, left), (tw, th) = sample["original_size"], sample["crop_coordinates"], sample["target_size"]
    return [oh, ow, top, left, th, tw]


def pt_record(key: str, path: Path) -> str | None:
    """The record key saying that `path` (SimpleTuner format) holds `key`'s entry, from its stat; None if absent."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return f"{key}{PT_RECORD}{stat.st_size}.{stat.st_mtime_ns}.{stat.st_ino}"
