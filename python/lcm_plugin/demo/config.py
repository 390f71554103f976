"""The demo's SimpleTuner config, derived from the SDXL LCM quickstart seed shipped in assets/.

The seed's model type, family, distillation method and `distillation_config.lcm` block are kept as
the user writes them (the demo only picks the consistency variant, `DemoTraining.lcm_settings`); sizes shrink
to a 64x64 dataset and a CPU (NOTES.md "A working CPU environment"), and keys that reach a hub, a tracker or a
validation run are dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lcm_plugin.demo import shapes

ASSETS = Path(__file__).parent / "assets"
SEED_CONFIG = ASSETS / "seed_config.json"
SEED_BACKENDS = ASSETS / "seed_multidatabackend.json"
TEACHER = ASSETS / "teacher"  # the tiny SDXL teacher (scripts/train_demo_teacher.py)
FLOW_TEACHER = ASSETS / "flow_teacher"  # the tiny SD3 teacher (scripts/train_demo_teacher.py --family sd3)
FLOW_TEACHER_T5_TOKENS = 16  # the T5 prompt length it was trained with (its prompts are three words)

# Seed keys with no meaning in an offline, validation-free CPU run.
DROPPED_KEYS = (
    "push_to_hub", "hub_model_id", "tracker_project_name", "tracker_run_name", "resume_from_checkpoint",
    "validation_resolution", "validation_prompt", "validation_negative_prompt", "validation_step_interval",
    "maximum_image_size",
    # The seed's 64 is out of SimpleTuner's range (decimal places, 1-9); the default 2 suits one square bucket.
    "aspect_bucket_rounding",
    # Pixel sizes live on the dataset entry; the seed's 0.5 is a megapixel value.
    "minimum_image_size",
)


@dataclass(frozen=True)
class DemoTraining:
    """What the demo changes in the seed besides paths: the CPU-sized schedule of the LoRA run."""

    max_train_steps: int
    learning_rate: float
    lr_scheduler: str
    lora_rank: int
    train_batch_size: int
    image_size: int
    # Merged over the seed's `distillation_config.lcm` block: the consistency variant the demo distils with.
    lcm_settings: dict = field(default_factory=dict)


def load_seed() -> tuple[dict, list[dict]]:
    return json.loads(SEED_CONFIG.read_text()), json.loads(SEED_BACKENDS.read_text())


def derive_config(seed: dict, training: DemoTraining, *, teacher_dir: Path, output_dir: Path,
                  backend_file: Path) -> dict:
    """SimpleTuner config.json for the demo run: the seed with CPU sizes and local paths."""
    config = {key: value for key, value in seed.items() if key not in DROPPED_KEYS}
    config.update(
        pretrained_model_name_or_path=str(teacher_dir),
        # Its default is a hub VAE; the teacher ships its own.
        pretrained_vae_model_name_or_path=str(teacher_dir / "vae"),
        output_dir=str(output_dir),
        data_backend_config=str(backend_file),
        resolution=training.image_size,
        resolution_type="pixel",
        max_train_steps=training.max_train_steps,
        num_train_epochs=0,
        learning_rate=training.learning_rate,
        lr_scheduler=training.lr_scheduler,
        lr_warmup_steps=min(seed.get("lr_warmup_steps", 0), training.max_train_steps // 10),
        train_batch_size=training.train_batch_size,
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,
        lora_rank=training.lora_rank,
        lora_alpha=training.lora_rank,
        # SimpleTuner's caption dropout zeroes SDXL time_ids; the distiller builds its own unconditional branch.
        caption_dropout_probability=0.0,
        # CPU: no bf16 optimizer, no mixed precision, no validation images, metrics to a local jsonl.
        optimizer="torch-adamw",
        mixed_precision="no",
        validation_disable=True,
        report_to="simpletuner",
        checkpoint_step_interval=training.max_train_steps + 1,
        # Not for validation (off) but for the inference code of the model card the run writes in output/:
        # a prompt and size of this teacher. "WxH", because SimpleTuner reads a bare number under 128 as megapixels.
        validation_prompt=shapes.prompt("red", "circle"),
        validation_resolution=f"{training.image_size}x{training.image_size}",
        checkpoints_total_limit=1,
        push_to_hub=False,
    )
    if training.lcm_settings:
        lcm = {**seed["distillation_config"]["lcm"], **training.lcm_settings}
        config["distillation_config"] = {**seed["distillation_config"], "lcm": lcm}
    return config


def derive_backends(seed_backends: list[dict], training: DemoTraining, *, data_dir: Path, cache_dir: Path) -> list[dict]:
    """multidatabackend.json: the seed's image entry on the generated dataset and its text_embeds entry."""
    image_entry = next(entry for entry in seed_backends if entry.get("dataset_type", "image") == "image")
    text_entry = next(entry for entry in seed_backends if entry.get("dataset_type") == "text_embeds")
    image = {key: value for key, value in image_entry.items() if key not in ("maximum_image_size", "target_downsample_size")}
    image.update(
        id="shapes",
        instance_data_dir=str(data_dir),
        cache_dir_vae=str(cache_dir / "vae"),
        resolution=training.image_size,
        resolution_type="pixel",
        minimum_image_size=training.image_size // 2,
        caption_strategy="textfile",
        crop=False,
    )
    text = dict(text_entry, cache_dir=str(cache_dir / "text"), write_batch_size=64)
    return [image, text]


def write_run_folder(run_dir: Path, training: DemoTraining, *, teacher_dir: Path, data_dir: Path) -> Path:
    """Write run_dir/config/{config.json, multidatabackend.json}; return the config.json path."""
    seed_config, seed_backends = load_seed()
    config_dir = run_dir / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    backend_file = config_dir / "multidatabackend.json"
    backends = derive_backends(seed_backends, training, data_dir=data_dir, cache_dir=run_dir / "cache")
    backend_file.write_text(json.dumps(backends, indent=2) + "\n")
    config = derive_config(seed_config, training, teacher_dir=teacher_dir, output_dir=run_dir / "output",
                           backend_file=backend_file)
    config_file = config_dir / "config.json"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return config_file
