"""Hostile input to `cache build`: one line naming the file, key or flag, exit 1, never a traceback; and the
dataset filters SimpleTuner applies (aspect-ratio limits), checked against its own code."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

from lcm_plugin.cache_build.plan import datasets_of, read_run, scan_dataset
from lcm_plugin.cli import main
from lcm_plugin.config import validate_files
from test_cache_build_plan import IMAGES, TEXT, write_config


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["cache", *args])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"seed": -1}, "/seed: -1 is not valid; give an integer from 0 to 4294967295"),
        ({"seed": 2**32}, "/seed: 4294967296 is not valid"),
        ({"vae_batch_size": -1}, "/vae_batch_size: -1 is not valid; give an integer of at least 1"),
        ({"vae_batch_size": 0}, "/vae_batch_size: 0 is not valid"),
        ({"vae_batch_size": "four"}, "/vae_batch_size: "),
    ],
)
def test_bad_integers_in_config_json_give_one_line(tmp_path, capsys, config, expected):
    root = write_config(tmp_path, [IMAGES, TEXT], **config)
    code, lines = run_cli(capsys, "build", str(root))
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"simpletuner-lcm cache build: {root / 'config' / 'config.json'}: ")
    assert expected in lines[0]


def test_a_latent_folder_shared_by_two_datasets_warns_in_validate_and_stops_the_build(tmp_path, capsys):
    shared = {"cache_dir_vae": "cache/vae"}
    root = write_config(tmp_path, [IMAGES | shared, IMAGES | shared | {"id": "more"}, TEXT])
    config_path = root / "config" / "config.json"
    # SimpleTuner 4.10.1 trains this run: validate and the training gate only warn.
    problems = validate_files(config_path)
    assert [(p.pointer, p.severity) for p in problems] == [("/1/cache_dir_vae", "warning")], problems
    assert "'photos' (entry 0) and 'more' (entry 1)" in problems[0].message
    code, lines = run_cli(capsys, "build", str(root))
    assert code == 1 and lines == [
        f"simpletuner-lcm cache build: {root / 'config' / 'multidatabackend.json'}: /1/cache_dir_vae: 'cache/vae' is "
        "the cache_dir_vae of both 'photos' (entry 0) and 'more' (entry 1): cache build needs one per dataset"
    ]


def test_seed_range_is_the_one_simpletuner_seeds_numpy_with(tmp_path, capsys):
    import numpy as np

    # SimpleTuner's set_seed seeds numpy: the build takes exactly the seeds numpy takes.
    settings, _ = read_run(write_config(tmp_path / "largest", [IMAGES, TEXT], seed=2**32 - 1))
    assert settings.seed == 2**32 - 1
    np.random.seed(settings.seed)
    for outside in (2**32, -1):
        with pytest.raises(ValueError):
            np.random.seed(outside)
        root = write_config(tmp_path / str(outside), [IMAGES, TEXT], seed=outside)
        code, lines = run_cli(capsys, "build", str(root))
        assert code == 1 and len(lines) == 1, lines
        assert lines[0].endswith(f"/seed: {outside} is not valid; give an integer from 0 to {2**32 - 1}"), lines


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--shard-mb", "nan"], "--shard-mb nan: give a size in MB above 0"),
        (["--shard-mb", "inf"], "--shard-mb inf: give a size in MB above 0"),
        (["--shard-mb", "0"], "--shard-mb 0.0: give a size in MB above 0"),
        (["--shard-mb", "-3"], "--shard-mb -3.0: give a size in MB above 0"),
        (["--threads", "-1"], "--threads -1: give 1 or more"),
        (["--threads", "0"], "--threads 0: give 1 or more"),
    ],
)
def test_bad_flags_give_one_line(tmp_path, capsys, flags, expected):
    root = write_config(tmp_path, [IMAGES, TEXT])
    code, lines = run_cli(capsys, "build", str(root), *flags)
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"simpletuner-lcm cache build: {expected}"), lines


def test_a_file_name_that_is_not_utf8_is_named_in_one_line(tmp_path):
    root = write_config(tmp_path, [IMAGES, TEXT])
    name = os.fsencode(root / "data") + b"/caf\xe9.png"  # Latin-1 bytes
    Image.new("RGB", (64, 64)).save(name.decode("utf-8", "surrogateescape"))
    result = subprocess.run([sys.executable, "-m", "lcm_plugin.cli", "cache", "build", str(root)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"simpletuner-lcm cache build: {root / 'data'}/caf\\xe9.png: the file name is not valid UTF-8; rename it "
        "(cache keys, SimpleTuner's metadata and caption file names need UTF-8)"
    ]


@pytest.mark.parametrize("value", ["wide", -1, float("nan"), 0])
def test_bad_aspect_ratio_limits_name_the_entry_key(tmp_path, capsys, value):
    root = write_config(tmp_path, [IMAGES | {"minimum_aspect_ratio": value}, TEXT])
    code, lines = run_cli(capsys, "build", str(root))
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"simpletuner-lcm cache build: {root / 'config' / 'multidatabackend.json'}: "
                               "/0/minimum_aspect_ratio: ")


SIZES = [(10, 1000), (100, 300), (120, 200), (200, 200), (260, 200), (300, 100), (1000, 10)]


@pytest.mark.parametrize(
    "limits",
    [{"minimum_aspect_ratio": 0.5}, {"maximum_aspect_ratio": 1.5}, {"minimum_aspect_ratio": "0.6",
     "maximum_aspect_ratio": 3}, {"maximum_aspect_ratio": None}],
)
def test_aspect_ratio_limits_drop_the_buckets_simpletuner_drops(tmp_path, limits):
    """Oracle: SimpleTuner's MetadataBackend._enforce_min_aspect_ratio / _enforce_max_aspect_ratio on the same
    buckets (its constructor stores each limit as `float(value) if value else None`)."""
    from simpletuner.helpers.metadata.backends.discovery import DiscoveryMetadataBackend

    from lcm_plugin.cache import Bucketer

    root = write_config(tmp_path, [IMAGES | {"resolution": 64, "resolution_type": "pixel"} | limits, TEXT])
    for w, h in SIZES:
        Image.new("RGB", (w, h)).save(root / "data" / f"{w}x{h}.png")
        (root / "data" / f"{w}x{h}.txt").write_text("a photo")
    settings, entries = read_run(root)
    (dataset,) = datasets_of(settings, entries)
    scan_dataset(dataset, settings.seed)

    samples = Bucketer(dataset.bucket_config, seed=settings.seed).assign(list(SIZES))
    oracle = object.__new__(DiscoveryMetadataBackend)
    oracle.id, oracle.bucket_report = "photos", None
    oracle.minimum_aspect_ratio, oracle.maximum_aspect_ratio = (
        float(limits[name]) if limits.get(name) else None for name in ("minimum_aspect_ratio", "maximum_aspect_ratio")
    )
    buckets: dict[str, list[str]] = {}
    for (w, h), sample in zip(SIZES, samples):
        buckets.setdefault(sample["bucket"], []).append(str(root / "data" / f"{w}x{h}.png"))
    oracle.aspect_ratio_bucket_indices = buckets
    oracle._enforce_min_aspect_ratio()
    oracle._enforce_max_aspect_ratio()
    kept = sorted(path for paths in oracle.aspect_ratio_bucket_indices.values() for path in paths)

    assert sorted(str(item.path) for item in dataset.images) == kept
    assert len(dataset.excluded) == len(SIZES) - len(kept)
    assert all("aspect_ratio" in reason for _, reason in dataset.excluded)
    if any(limits.values()):
        assert 0 < len(kept) < len(SIZES)  # the case filters something, and not everything


def test_the_issue_10x1000_image_at_1024_is_left_out_by_minimum_aspect_ratio(tmp_path):
    root = write_config(tmp_path, [IMAGES | {"resolution": 1024, "resolution_type": "pixel",
                                             "minimum_aspect_ratio": 0.25}, TEXT])
    Image.new("RGB", (10, 1000)).save(root / "data" / "thin.png")
    (root / "data" / "thin.txt").write_text("a line")
    settings, entries = read_run(root)
    (dataset,) = datasets_of(settings, entries)
    scan_dataset(dataset, settings.seed)
    assert len(dataset.images) == 0 and dataset.excluded == [(root / "data" / "thin.png",
                                                          "bucket below minimum_aspect_ratio 0.25")]
