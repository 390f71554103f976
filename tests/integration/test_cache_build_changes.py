"""A cache never serves what the current config would not produce: build, change one setting, build again, and
the result equals a fresh build with the new setting, bit for bit (store entries, manifest, SimpleTuner-format
files and bucket metadata). Before the rebuild, `check_run` (what `cache verify RUN` prints) names the change.

The issue's repro: a build at resolution 128 then 64 reported "0 image(s) encoded, 10 already cached" and kept
the 128-px latents.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import cache_snapshot
from cache_snapshot import assert_checks_pass, snapshot, store
from lcm_plugin.cache_build import BuildOptions, build
from lcm_plugin.cache_build.build import check_run
from lcm_plugin.cache_build.layout import LCM_DIR, TIME_IDS

WORDS = ("red", "blue", "circle", "square", "photo")
SIZES = ((192, 128), (128, 160), (128, 128))


def write_run(root: Path, model_dir: Path) -> Path:
    """Six photo-like JPEGs in three aspect ratios at pixel resolution 128, textfile captions, the tiny SDXL."""
    images = [(f"img{i}", SIZES[i % 3], f"{WORDS[i % 2]} {WORDS[2 + i % 2]}") for i in range(6)]
    return cache_snapshot.write_run(root, model_dir, images, resolution=128, seed=3)


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def resolution_64(run: Path) -> None:
    edit_json(run / "config/multidatabackend.json", lambda b: b[0].update(resolution=64))
    edit_json(run / "config/config.json", lambda c: c.update(resolution=64))


def center_crop(run: Path) -> None:
    # At 128 px the 3:2 images keep their shape and the 4:5 ones are cropped to a square at random; now every
    # non-square image is cropped to a square in the centre.
    edit_json(run / "config/multidatabackend.json", lambda b: b[0].update(crop=True, crop_style="center"))


def other_vae(run: Path) -> None:
    from lcm_plugin.tiny_sdxl import tiny_vae

    torch.manual_seed(1)
    tiny_vae().save_pretrained(run / "model" / "vae")


def vae_fp32(run: Path) -> None:
    edit_json(run / "config/config.json", lambda c: c.update(vae_dtype="fp32"))


def seed_4(run: Path) -> None:
    edit_json(run / "config/config.json", lambda c: c.update(seed=4))


def new_caption(run: Path) -> None:
    for i in (1, 3, 5):  # every "blue square": that caption goes, "square photo" comes
        (run / "data" / f"img{i}.txt").write_text("square photo")


def vae_scaling_factor(run: Path) -> None:
    # Only the scaling factor: the VAE's weights and every other config key stay.
    edit_json(run / "model" / "vae" / "config.json", lambda c: c.update(scaling_factor=0.5))


def captions_from_file_names(run: Path) -> None:
    # The caption source changes, not the caption files: "img0" ... "img5" replace the two textfile captions.
    edit_json(run / "config/multidatabackend.json", lambda b: b[0].update(caption_strategy="filename"))


def redrawn_image(run: Path) -> None:
    Image.new("RGB", SIZES[0], (9, 9, 9)).save(run / "data" / "img0.jpg", quality=90)


CHANGES = {
    # change, what the rebuild says (one line per reason, with its count)
    "resolution": (resolution_64, ["toy: 6 latent(s) to encode: the target size changed (resolution settings)"]),
    "crop": (center_crop, ["toy: 4 latent(s) to encode: the crop changed (crop settings or seed)"]),
    "vae": (other_vae, ["toy: 6 latent(s) to encode: the VAE changed (its config or weights)"]),
    "vae scaling_factor": (vae_scaling_factor, ["toy: 6 latent(s) to encode: the VAE scaling_factor changed: "]),
    "vae_dtype": (vae_fp32, ["toy: 6 latent(s) to encode: vae_dtype changed: bf16 -> fp32"]),  # on cpu:0 (below)
    "seed": (seed_4, ["toy: 6 latent(s) to encode: seed changed: 3 -> 4"]),
    "caption": (new_caption, ["1 caption(s) to encode: new caption(s)", "removed 1 SimpleTuner text file(s)"]),
    "caption source": (
        captions_from_file_names,
        ["6 caption(s) to encode: new caption(s)", "removed 2 SimpleTuner text file(s)"],
    ),
    "image file": (redrawn_image, ["toy: 1 latent(s) to encode: the image file's content changed"]),
}
# The environment a change's two builds run in. SimpleTuner converts its VAE to config.json's vae_dtype only where
# it moves it off the plain CPU (encode.vae_dtype_on): on cpu:0 (`accelerate launch --cpu`, several processes),
# as on an accelerator, the default is bf16 and fp32 a change; on this host's plain CPU both are fp32 (below).
ENVIRONMENTS = {"vae_dtype": {"ACCELERATE_TORCH_DEVICE": "cpu:0"}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from lcm_plugin.tiny_sdxl import save_tiny_sdxl

    torch.set_num_threads(1)
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"), seed=0, vocabulary=WORDS)


def fresh_copy(run: Path, where: Path) -> Path:
    """The run's inputs without anything a build wrote."""
    ignored = shutil.ignore_patterns("cache", "output", "aspect_ratio_bucket_*.json")
    return Path(shutil.copytree(run, where, ignore=ignored))


@pytest.mark.parametrize("setting", list(CHANGES))
def test_rebuild_after_a_change_equals_a_fresh_build(tmp_path, model_dir, monkeypatch, setting):
    for name, value in ENVIRONMENTS.get(setting, {}).items():
        monkeypatch.setenv(name, value)
    rebuild_equals_fresh_build(tmp_path, model_dir, *CHANGES[setting])


def test_vae_dtype_changes_nothing_where_simpletuner_keeps_the_vae_in_fp32(tmp_path, model_dir, monkeypatch):
    """On the plain CPU SimpleTuner never converts its VAE: vae_dtype bf16 (the default) and fp32 both give fp32
    latents, so switching it leaves the cache valid, and the rebuild encodes nothing."""
    monkeypatch.setenv("ACCELERATE_TORCH_DEVICE", "cpu")
    run = write_run(tmp_path / "run", model_dir)
    assert build(BuildOptions(run), log=print).encoded == 6
    before = snapshot(run)
    assert {dtype for key, (dtype, _, _) in before["latents"].items() if TIME_IDS not in key} == {"float32"}
    vae_fp32(run)
    assert check_run(run) == []
    lines: list[str] = []
    assert build(BuildOptions(run), log=lines.append).encoded == 0, lines
    assert snapshot(run) == before


def test_a_newer_recipe_version_rebuilds_to_a_fresh_build(tmp_path, model_dir, monkeypatch):
    from lcm_plugin.cache_build import fingerprint

    version = fingerprint.RECIPE_VERSION

    def newer_recipe(run: Path) -> None:  # what the next simpletuner-lcm release does to the constant
        monkeypatch.setattr(fingerprint, "RECIPE_VERSION", version + 1)

    why = f"the cache recipe version changed (a newer simpletuner-lcm encodes differently): {version} -> {version + 1}"
    said = [f"toy: 6 latent(s) to encode: {why}", "3 caption(s) to encode: "]  # two, and "" for caption dropout
    rebuild_equals_fresh_build(tmp_path, model_dir, newer_recipe, said)


def rebuild_equals_fresh_build(tmp_path: Path, model_dir: Path, change, said: list[str]) -> None:
    """Build, `change` the run, build again: the rebuild says `said` and equals a fresh build of the changed run."""
    run = write_run(tmp_path / "run", tmp_path / "run" / "model")
    shutil.copytree(model_dir, run / "model")
    options = BuildOptions(run, simpletuner_format=True, shard_bytes=4096)
    assert build(options, log=print).encoded == 6
    before = latent_keys(run)

    change(run)
    assert check_run(run), "the changed config went unnoticed at read"
    lines: list[str] = []
    rebuilt = build(options, log=lines.append)
    for expected in said:
        assert any(expected in line for line in lines), (expected, lines)

    fresh = fresh_copy(run, tmp_path / "fresh")
    build(BuildOptions(fresh, simpletuner_format=True, shard_bytes=4096), log=print)
    after = latent_keys(fresh)
    # Exactly the images whose latent differs under the new setting were encoded again.
    assert rebuilt.encoded == len([image for image in after if before.get(image) != after[image]])
    for folder in (run, fresh):
        assert_checks_pass(folder)
    ours, theirs = snapshot(run), snapshot(fresh)
    assert ours["manifest"] == theirs["manifest"]
    assert ours["files"] == theirs["files"]
    for part in ("latents", "text"):
        assert {key: ours[part][key] for key in theirs[part]} == theirs[part], part
        # Entries the fresh build lacks are the old setting's, under other keys: nothing references them.
        unused = {key.split("#")[0].split("/")[0] for key in set(ours[part]) - set(theirs[part])}
        assert not [key for key in unused if key in ours["manifest"]]

    # --prune drops them: then the stores too hold exactly the fresh build's entries.
    assert build(BuildOptions(run, simpletuner_format=True, shard_bytes=4096, prune=True), log=print).encoded == 0
    assert_checks_pass(run)
    assert snapshot(run) == theirs


def test_a_prune_killed_between_its_renames_is_completed_by_the_next_build(tmp_path, model_dir):
    run = write_run(tmp_path / "run", model_dir)
    build(BuildOptions(run), log=print)
    folder = run / "cache/vae/toy" / LCM_DIR
    expected = store(folder)
    folder.rename(folder.with_name(LCM_DIR + ".pruned-away"))  # the kill fell after the first rename
    (folder.with_name(LCM_DIR + ".pruning")).mkdir()  # with a copy half written
    assert build(BuildOptions(run), log=print).encoded == 0
    assert store(folder) == expected and check_run(run) == []
    # No half-written copy or renamed-away store is left (the scan memo lives beside the store).
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.startswith("lcm-inventory.")) == [LCM_DIR]


def latent_keys(run: Path) -> dict[str, str]:
    manifest = json.loads((run / "cache/vae/toy" / LCM_DIR / "manifest.json").read_text())
    return {entry["image"]: entry["key"] for entry in manifest["images"]}


def test_verify_names_a_changed_resolution_and_exits_1(tmp_path, model_dir):
    import subprocess
    import sys

    run = write_run(tmp_path / "run", model_dir)
    build(BuildOptions(run), log=print)
    resolution_64(run)
    verify = [str(Path(sys.executable).parent / "simpletuner-lcm"), "cache", "verify", str(run)]
    result = subprocess.run(verify, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{run / 'cache/vae/toy' / LCM_DIR}: 6 image(s) stale: the target size changed" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("forged", ["shape", "dtype", "time_ids"])
def test_an_entry_that_disagrees_with_the_plan_stops_the_build(tmp_path, model_dir, capsys, forged):
    """Entries are checked per key against the plan: a store holding, under the plan's key, a latent of another
    shape or dtype, or other time_ids, was not written by this build, and is never served."""
    from lcm_plugin.cache import LatentCacheWriter
    from lcm_plugin.cache_build.build import plan_run
    from lcm_plugin.cache_build.encode import DTYPES
    from lcm_plugin.cli import main

    run = write_run(tmp_path / "run", model_dir)
    settings, (dataset,), _ = plan_run(run, None)
    item = next(image for image in dataset.images if tuple(image.sample["target_size"]) == (128, 128))
    # The plan's latent: 128x128 px -> 4x16x16, in the dtype SimpleTuner's VAE takes on this host (fp32 on a CPU).
    planned = DTYPES[settings.vae_dtype]
    other = torch.float32 if planned == torch.bfloat16 else torch.bfloat16
    shape = (4, 8, 8) if forged == "shape" else (4, 16, 16)
    with LatentCacheWriter(run / "cache/vae/toy" / LCM_DIR, writer="forger") as writer:
        writer.put(item.cache_key, torch.zeros(shape, dtype=other if forged == "dtype" else planned))
        writer.put(item.cache_key + TIME_IDS, torch.tensor([1, 2, 3, 4, 5, 6]))
    assert main(["cache", "build", str(run)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    needs = f"the plan needs {'F32' if planned == torch.float32 else 'BF16'} (4, 16, 16)"
    said = {"shape": f"(4, 8, 8), {needs}", "dtype": f"(4, 16, 16), {needs}",
            "time_ids": "has time_ids [1, 2, 3, 4, 5, 6], the plan"}[forged]
    assert len(lines) == 1 and repr(item.cache_key) in lines[0] and said in lines[0], lines
