"""Oracle: SimpleTuner 4.10.1's own code judges real configs; `simpletuner-lcm validate` must agree with it.

The judge (simpletuner_judge.py) is what the trainer runs before it loads a model, in its order, from the
folder training starts in (the one above config/): `normalize_args` and `parse_cmdline_args` for
config.json; the file named by the parsed `data_backend_config`; per enabled entry, the steps FactoryRegistry
applies to its dataset type. Refusals that depend only on this machine (Apple's Metal kernels, attention
packages) are counted apart, as acceptances: the config is valid for the machine it was written for.

Corpora: (a) every example SimpleTuner ships in its wheel, with its dataloader file; (b) the config.json and
multidatabackend.json blocks of SimpleTuner's documentation (tests/fixtures/simpletuner_docs/blocks.json,
extracted by scripts/extract_simpletuner_doc_configs.py; fragments are completed with a minimal run);
(c) generated runs that change several keys together. Agreement: SimpleTuner accepts and we report no
error, or SimpleTuner refuses and one of our errors sits in the file (and entry) it refused, at a key its
message names. Each test prints its counts.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from simpletuner_judge import simpletuner_entry_refusal, simpletuner_parses

from lcm_plugin.config import validate_files
from lcm_plugin.config.argv import examples_root
from lcm_plugin.config.catalogue import load_catalogue
from lcm_plugin.config.databackend import ENTRY_MODELS, check_entry
from lcm_plugin.config.run import inherited_settings
from lcm_plugin.config.training import check_training_config

DOC_BLOCKS = Path(__file__).resolve().parents[1] / "fixtures" / "simpletuner_docs" / "blocks.json"
# Messages of refusals about the machine SimpleTuner runs on, not about the config.
MACHINE_REFUSALS = re.compile(
    r"requires a CUDA or ROCm device|without a CUDA device|Metal Flash Attention|SageAttention is not installed|"
    r"xformers|kohaku|not supported on Apple hardware"
)
# What the documentation's config.json fragments are completed with: a run SimpleTuner accepts on its own.
BASE_CONFIG = {
    "model_family": "sdxl",
    "model_type": "lora",
    "output_dir": "output",
    "optimizer": "adamw_bf16",
    "mixed_precision": "bf16",
    "data_backend_config": "config/multidatabackend.json",
}
BASE_ENTRIES = [
    {"id": "images", "type": "local", "instance_data_dir": "datasets/images", "caption_strategy": "textfile"},
    {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
]


@dataclass
class Refusal:
    file: str  # "config.json" or "multidatabackend.json"
    entry: int | None  # the dataset entry SimpleTuner refused, when it judged one
    message: str


@dataclass
class Tally:
    name: str
    accepted_by_both: int = 0
    refused_by_both: int = 0
    refused_only_for_this_machine: int = 0
    disagreements: list[str] = field(default_factory=list)

    def add(self, label: str, refusals: list[Refusal], errors: list) -> None:
        """Count one judged item: SimpleTuner's refusals against our error Problems."""
        ours = [problem.render() for problem in errors]
        if refusals and all(MACHINE_REFUSALS.search(refusal.message) for refusal in refusals):
            self.refused_only_for_this_machine += 1
            refusals = []
        if not refusals and not errors:
            self.accepted_by_both += 1
        elif not refusals:
            self.disagreements.append(f"{label}: SimpleTuner accepts, we refuse: {ours}")
        elif any(_names_the_refused_key(refusal, errors) for refusal in refusals):
            self.refused_by_both += 1
        else:
            refused = "; ".join(f"{r.file} entry {r.entry}: {r.message}" for r in refusals)
            self.disagreements.append(f"{label}: SimpleTuner refuses ({refused}); our errors: {ours}")

    def report(self, capsys) -> None:
        with capsys.disabled():
            print(
                f"\n[validate oracle] {self.name}: accepted by both {self.accepted_by_both}, refused by both "
                f"{self.refused_by_both}, disagreements {len(self.disagreements)} (SimpleTuner refused "
                f"{self.refused_only_for_this_machine} only for lack of a GPU or package here)"
            )
        assert not self.disagreements, "\n".join(self.disagreements)


def _names_the_refused_key(refusal: Refusal, errors: list) -> bool:
    """One of our errors is in the refused file (and entry), at or about a key SimpleTuner's message names."""
    here = [p for p in errors if Path(p.file).name == refusal.file]
    if refusal.entry is not None:
        here = [p for p in here if p.pointer.split("/")[1:2] == [str(refusal.entry)]]
    named = _keys_named_in(refusal.message)
    if not here or not named:
        return bool(here)
    return any(_words(p.pointer) & named or _words(p.message) & named for p in here)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text.replace("--", " ")))


def _keys_named_in(message: str) -> set[str]:
    """Config keys in a SimpleTuner message: `--options` and the names of known options and dataset keys."""
    known = set(load_catalogue()["keys"]) | {
        name for model in ENTRY_MODELS.values() for name in model.model_fields
    }
    options = set(re.findall(r"--([A-Za-z0-9_-]+)", message))
    return options | (_words(message) & known - {"id", "type", "config", "default", "model_type"})


def simpletuner_judges_run(root: Path, config: dict) -> list[Refusal]:
    """What SimpleTuner refuses of the run in root/config/, judged from root as the trainer runs."""
    with contextlib.chdir(root):
        args, message = simpletuner_parses(config)
        if args is None:
            return [Refusal("config.json", None, message)]
        backend_path = Path(args.data_backend_config)
        if not backend_path.is_file():
            return [Refusal("config.json", None, f"data_backend_config {backend_path} not found")]
        entries = json.loads(backend_path.read_text())
        if not isinstance(entries, list) or not entries:
            return [Refusal("multidatabackend.json", None, "expected a non-empty list of datasets")]
        refusals = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                refusals.append(Refusal("multidatabackend.json", index, "not an object"))
            elif not (entry.get("disabled", False) or entry.get("disable", False)):
                message = simpletuner_entry_refusal(entry, args)
                if message:
                    refusals.append(Refusal("multidatabackend.json", index, message))
        return refusals


def our_errors_for_run(root: Path) -> list:
    with contextlib.chdir(root):
        return [p for p in validate_files(root / "config" / "config.json") if p.severity == "error"]


def write_run(root: Path, config: dict, entries: list | None = None) -> Path:
    (root / "config").mkdir(parents=True)
    (root / "config" / "config.json").write_text(json.dumps(config, indent=1))
    if entries is not None:
        (root / "config" / "multidatabackend.json").write_text(json.dumps(entries, indent=1))
    return root


# (a) ----------------------------------------------------------------------------------------------------------


def test_every_shipped_example_gets_simpletuners_verdict(tmp_path, capsys):
    tally = Tally("(a) SimpleTuner's shipped examples")
    examples = sorted(examples_root().glob("*/config.json"))
    assert len(examples) > 100  # the wheel's examples folder was found
    for example in examples:
        root = tmp_path / example.parent.name
        (root / "config").mkdir(parents=True)
        (root / "config" / "config.json").write_text(example.read_text())
        try:
            config = json.loads(example.read_text())
        except json.JSONDecodeError as error:  # json_file.load_json_config refuses the file
            tally.add(example.parent.name, [Refusal("config.json", None, str(error))], our_errors_for_run(root))
            continue
        tally.add(example.parent.name, simpletuner_judges_run(root, config), our_errors_for_run(root))
    tally.report(capsys)


# (b) ----------------------------------------------------------------------------------------------------------


def _doc_blocks() -> dict:
    return json.loads(DOC_BLOCKS.read_text(encoding="utf-8"))


def test_documentation_blocks_get_simpletuners_verdict(tmp_path, capsys):
    fixture = _doc_blocks()
    tally = Tally(f"(b) SimpleTuner documentation blocks at {fixture['commit'][:12]}")
    (tmp_path / "config").mkdir()
    with contextlib.chdir(tmp_path):
        base_args, message = simpletuner_parses(BASE_CONFIG)
    assert message is None, message
    defaults = inherited_settings(BASE_CONFIG)
    for block in fixture["blocks"]:
        label = f"{block['path']}:{block['line']}"
        if block["kind"] == "config":
            config = {**BASE_CONFIG, **block["block"]}
            with contextlib.chdir(tmp_path):
                _, message = simpletuner_parses(config)
                ours = check_training_config(config, "config.json", tmp_path / "config")
            refusals = [Refusal("config.json", None, message)] if message else []
            tally.add(label, refusals, [p for p in ours if p.severity == "error"])
            continue
        entries = block["block"] if isinstance(block["block"], list) else [block["block"]]
        for index, entry in enumerate(entries):
            if entry.get("disabled") or entry.get("disable"):
                continue
            message = simpletuner_entry_refusal(entry, base_args)
            refusals = [Refusal("multidatabackend.json", index, message)] if message else []
            ours = check_entry(entry, index, "multidatabackend.json", defaults)
            tally.add(f"{label} entry {index}", refusals, [p for p in ours if p.severity == "error"])
    assert tally.accepted_by_both + tally.refused_by_both > 150  # the fixture was read
    tally.report(capsys)


# (c) ----------------------------------------------------------------------------------------------------------

RESOLUTION_TYPES = [None, "pixel", "area", "pixel_area"]
RESOLUTIONS = [None, 1024, 1.0]
SIZE_PAIRS = [None, (1024, 1024), (2048, 1024), (2.0, 1.0), (25, 1.0), (300, 1024), (4096, 4096)]
CROPS = [
    {"crop": True, "crop_aspect": "square", "crop_style": "center"},
    {"crop": False, "crop_aspect": "preserve"},
    {"crop": True, "crop_aspect": "random", "crop_aspect_buckets": [1.0, 0.75]},
    {"crop": True, "crop_aspect": "closest"},
    {"crop": "true", "crop_aspect": "random", "crop_aspect_buckets": [{"aspect_bucket": 1.0, "weight": 1.0}]},
    {"crop": True, "crop_style": "middle"},
]
# Values of each JSON type and their string spellings, for keys of each argparse kind.
SPELLINGS = [True, False, "true", "false", "True", "yes", "no", 1, 0, "1", "", None, [7, 8, 9], ["a"], {"a": 1}]
KEYS_BY_KIND = ["gradient_checkpointing", "skip_file_discovery", "train_batch_size", "validation_guidance", "lora_type"]


def _with(mapping: dict, **changes) -> dict:
    result = dict(mapping)
    for key, value in changes.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def _sizes(pair) -> dict:
    return {} if pair is None else {"maximum_image_size": pair[0], "target_downsample_size": pair[1]}


def _generated_runs():
    base_config = {**BASE_CONFIG, "resolution": 1024, "resolution_type": "pixel"}
    # config.json: resolution_type x resolution x sizes, inherited by an entry that sets none of them.
    for resolution_type, resolution, sizes in itertools.product(RESOLUTION_TYPES, RESOLUTIONS, SIZE_PAIRS):
        config = _with(base_config, resolution_type=resolution_type, resolution=resolution) | _sizes(sizes)
        yield f"config {resolution_type} {resolution} {sizes}", config, BASE_ENTRIES
    # the image entry: resolution_type x resolution x sizes, under two config.json unit systems.
    for config_type, resolution_type, resolution, sizes in itertools.product(
        ["pixel", "pixel_area"], RESOLUTION_TYPES, RESOLUTIONS, SIZE_PAIRS
    ):
        entry = _with(BASE_ENTRIES[0], resolution_type=resolution_type, resolution=resolution) | _sizes(sizes)
        config = _with(base_config, resolution_type=config_type)
        yield f"entry {resolution_type} {resolution} {sizes} under {config_type}", config, [entry, BASE_ENTRIES[1]]
    # crop settings x resolution_type x sizes.
    for crop, resolution_type, sizes in itertools.product(CROPS, RESOLUTION_TYPES, [None, (1024, 1024), (2.0, 1.0)]):
        entry = _with(BASE_ENTRIES[0], resolution_type=resolution_type) | crop | _sizes(sizes)
        yield f"crop {crop} {resolution_type} {sizes}", base_config, [entry, BASE_ENTRIES[1]]
    # booleans, strings, numbers, lists and objects for keys of each kind, two keys at a time.
    for (key_a, key_b), (value_a, value_b) in itertools.product(
        itertools.combinations(KEYS_BY_KIND, 2), itertools.product(SPELLINGS[:12], SPELLINGS[::3])
    ):
        if (SPELLINGS.index(value_a) + SPELLINGS.index(value_b)) % 3:
            continue  # a third of the value pairs keeps the cost modest; every value meets every key
        config = dict(base_config)
        config[key_a], config[key_b] = value_a, value_b
        yield f"{key_a}={value_a!r} {key_b}={value_b!r}", config, BASE_ENTRIES
    # two datasets sharing one latent folder, in two spellings: SimpleTuner trains it, so validate only warns.
    for spelling in ("cache/vae/shared", "./cache/../cache/vae/shared/"):
        entries = [
            BASE_ENTRIES[0] | {"cache_dir_vae": "cache/vae/shared"},
            BASE_ENTRIES[0] | {"id": "more", "cache_dir_vae": spelling},
            BASE_ENTRIES[1],
        ]
        yield f"cache_dir_vae {spelling!r} shared by two datasets", base_config, entries
    for value in SPELLINGS:
        yield f"validation_guidance_skip_layers={value!r} sd3", base_config | {
            "model_family": "sd3",
            "validation_guidance_skip_layers": value,
        }, BASE_ENTRIES
    # skip-layer guidance under every family SimpleTuner's parser offers: validate copies its list of families.
    for family, value in itertools.product(_simpletuner_model_families(), ["[7, 8, 9]", "[7, 8"]):
        yield f"validation_guidance_skip_layers={value!r} {family}", base_config | {
            "model_family": family,
            "validation_guidance_skip_layers": value,
        }, BASE_ENTRIES


def _simpletuner_model_families() -> list[str]:
    from simpletuner.helpers.configuration.cmd_args import get_argument_parser

    families = get_argument_parser()._option_string_actions["--model_family"].choices
    assert len(families) > 10 and "sd3" in families and "sdxl" in families
    return list(families)


def test_generated_key_combinations_get_simpletuners_verdict(tmp_path, capsys):
    tally = Tally("(c) generated key combinations")
    for number, (label, config, entries) in enumerate(_generated_runs()):
        root = write_run(tmp_path / str(number), config, entries)
        tally.add(label, simpletuner_judges_run(root, config), our_errors_for_run(root))
    assert tally.refused_by_both > 50 and tally.accepted_by_both > 50  # the corpus exercises both verdicts
    tally.report(capsys)


@pytest.mark.parametrize("override", ["", "1"])
def test_size_override_environment_is_applied_as_simpletuner_applies_it(tmp_path, monkeypatch, override):
    monkeypatch.setenv("SIMPLETUNER_MAXIMUM_IMAGE_SIZE_OVERRIDE", override)
    config = {**BASE_CONFIG, "resolution_type": "area", "resolution": 1}
    entry = BASE_ENTRIES[0] | {"maximum_image_size": 25, "target_downsample_size": 22}
    root = write_run(tmp_path, config, [entry, BASE_ENTRIES[1]])
    refusals = simpletuner_judges_run(root, config)
    assert bool(refusals) == (not override)
    errors = our_errors_for_run(root)
    assert bool(errors) == (not override)
    if errors:
        assert errors[0].pointer == "/0/maximum_image_size"
