"""An offline Hugging Face hub cache holding a local model folder under a hub repo's name, for the families whose
SimpleTuner 4.10.1 class loads a component from a fixed hub repo whatever `pretrained_model_name_or_path` says."""

from __future__ import annotations

from pathlib import Path

# SimpleTuner loads AuraFlow's text encoder and tokenizer from this repo (helpers/models/auraflow/model.py:95,
# TEXT_ENCODER_CONFIGURATION's "path", which common.py's _resolve_text_encoder_path prefers; no config key overrides
# it for AuraFlow).
HUB_TEXT_ENCODERS = {"auraflow": "terminusresearch/auraflow-v0.3"}


def offline_hub_cache(cache: Path, repo_id: str, model: Path) -> Path:
    """A huggingface_hub cache (what HF_HUB_CACHE names) whose `repo_id` main revision is the folder `model`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / commit).symlink_to(model, target_is_directory=True)
    return cache
