"""A `type: webshart` dataset inside the stock `simpletuner train`: the photo-like JPEGs of test_trainer_data_path.py
as members of two local tar shards with their webshart indexes (offsets, sizes, the captions), trained on
SimpleTuner's own path and on the plugin's.

- SimpleTuner's path is the judge: its batches are checked against SimpleTuner's functions run here, as in the local
  test, on the same images.
- The plugin's path reads each image's bytes from its tar at the index's offset, builds the local store, and its
  samples equal SimpleTuner's image by image: bucket, crop, time_ids and text embeddings bit for bit, latents within
  the local test's resize bound.
- SimpleTuner's own metadata backend buckets the samples on both paths; the plugin writes no bucket file for them.
- A restart encodes nothing: the scan memo holds every member's stamp (its tar's, and its offset).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from webshart_shards import Shard, write_index  # noqa: E402

from test_simpletuner_train import assert_lcm_run, run_stock_trainer
from test_trainer_data_path import (  # noqa: F401 - model_dir, simpletuner_state, text_oracle, vae_oracle: fixtures
    RESUME_AT,
    SERVED,
    SIZES,
    STEPS,
    assert_samples_equal_image_by_image,
    assert_simpletuner_geometry_and_text,
    model_dir,
    records,
    recording_env,
    samples,
    set_config,
    simpletuner_state,
    text_oracle,
    vae_oracle,
    write_run,
)


def write_webshart_run(root: Path, model_dir: Path, *, max_train_steps: int) -> Path:
    """The local test's run, its images moved into two tar shards under `root/shards` (eight each), each with a
    webshart index that holds every member's offset, length, stored size and caption (a paired `.txt` member is
    never found by SimpleTuner 4.10.1: webshart folds it into its image's sample), the entry rewritten to
    SimpleTuner's `type: webshart` keys."""
    run = write_run(root, model_dir, max_train_steps=max_train_steps)
    images = sorted((run / "data").glob("*.jpg"))
    for number, start in enumerate((0, 8)):
        members = {path.name: path.read_bytes() for path in images[start:start + 8]}
        captions = {path.name: {"captions": path.with_suffix(".txt").read_text()} for path in images[start:start + 8]}
        write_index(Shard(f"shard-{number:03d}", members, captions), run / "shards")
    shutil.move(run / "data", run / "local-copy")  # the oracles read these; the trainers cannot
    backends_file = run / "config" / "multidatabackend.json"
    backends = json.loads(backends_file.read_text())
    entry = backends[0]
    for key in ("instance_data_dir", "caption_strategy"):
        del entry[key]
    entry.update(type="webshart", source=str(run / "shards"), caption_strategy="webshart", metadata_backend="webshart")
    backends_file.write_text(json.dumps(backends, indent=2))
    return run


def train(run: Path, record_dir: Path, data_path: str | None) -> tuple[str, dict]:
    log = run_stock_trainer(run, recording_env(record_dir, data_path))
    assert_lcm_run(log, run / "output")
    return log, records(record_dir)


def local_samples(run: Path, batch: dict) -> list[dict]:
    """`samples(batch)`, each named by the image file its sample was made from (`webshart://<shard>/<n>/<name>`)."""
    out = samples(batch)
    for sample in out:
        assert "webshart://" in sample["path"], sample["path"]  # the sampler joins the dataset's cache folder to it
        sample["path"] = str(run / "local-copy" / sample["path"].rsplit("/", 1)[1])
    return out


def by_image(run: Path, recorded: dict) -> dict[str, dict]:
    out = {}
    for key in sorted(recorded):
        for sample in local_samples(run, recorded[key]):
            out.setdefault(Path(sample["path"]).name, sample)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir):
    """SimpleTuner's own path on the dataset, STEPS steps: (run, log, records)."""
    root = tmp_path_factory.mktemp("webshart-reference")
    run = write_webshart_run(root / "run", model_dir, max_train_steps=STEPS)
    log, recorded = train(run, root / "records", "simpletuner")
    return run, log, recorded


@pytest.fixture(scope="module")
def ours(tmp_path_factory, model_dir):
    """The plugin's path (an LCM run, the switch unset): RESUME_AT steps, then resumed up to STEPS. (run, first log,
    resumed log, records of both)."""
    root = tmp_path_factory.mktemp("webshart-ours")
    run = write_webshart_run(root / "run", model_dir, max_train_steps=RESUME_AT)
    first_log, first = train(run, root / "records-first", None)
    set_config(run, max_train_steps=STEPS, resume_from_checkpoint="latest")
    (run / "output" / "training_metrics.jsonl").unlink()
    resumed_log, resumed = train(run, root / "records-resumed", None)
    return run, first_log, resumed_log, {**first, **resumed}


def test_simpletuners_path_on_the_shards_is_its_own_functions(reference, simpletuner_state, text_oracle):
    run, log, recorded = reference
    assert sorted(recorded) == [(0, step) for step in range(STEPS)], log[-4000:]
    assert SERVED not in log
    for batch in recorded.values():
        for sample in local_samples(run, batch):
            assert_simpletuner_geometry_and_text(sample, text_oracle)


def test_our_path_serves_the_shards_from_the_store_and_writes_no_pt(ours):
    run, first_log, resumed_log, _ = ours
    assert f"{SERVED} ({len(SIZES)} image(s) encoded here, 0 already cached)" in first_log, first_log[-4000:]
    assert f"(0 image(s) encoded here, {len(SIZES)} already cached)" in resumed_log, resumed_log[-4000:]
    assert not list(run.rglob("*.pt"))
    manifest = json.loads((run / "cache" / "vae" / "lcm" / "manifest.json").read_text())
    names = sorted(entry["image"].rsplit("/", 1)[1] for entry in manifest["images"])
    assert names == sorted(path.name for path in (run / "local-copy").glob("*.jpg"))


def test_our_samples_equal_simpletuners_image_by_image(reference, ours, simpletuner_state, vae_oracle):
    assert_samples_equal_image_by_image(by_image(reference[0], reference[2]), by_image(ours[0], ours[3]), vae_oracle)


def test_a_restart_on_our_path_trains_on_simpletuners_geometry_and_text(ours, simpletuner_state, text_oracle):
    run, _, resumed_log, recorded = ours
    resumed = {key: batch for key, batch in recorded.items() if key[1] >= RESUME_AT}
    assert len(resumed) == STEPS - RESUME_AT, resumed_log[-4000:]
    for batch in resumed.values():
        for sample in local_samples(run, batch):
            assert_simpletuner_geometry_and_text(sample, text_oracle)
