"""A `type: huggingface` dataset inside the stock `simpletuner train`: the photo-like JPEGs of
test_trainer_data_path.py as rows of a local Hugging Face dataset (a parquet file with the `datasets` Image feature
and a `caption` column, as `Dataset.to_parquet` writes it), trained on SimpleTuner's own path and on the plugin's.

- SimpleTuner's path is the judge: its batches are checked against SimpleTuner's functions run here, as in the local
  test, on the same images.
- The plugin's path reads the table by column, builds the local store, and its samples equal SimpleTuner's image by
  image: bucket, crop, time_ids and text embeddings bit for bit, latents within the local test's resize bound.
- SimpleTuner's own metadata backend buckets the rows on both paths; the plugin writes no bucket file for them.
- A restart encodes nothing and reads no image: the scan memo holds every row's stamp (the table file's).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_simpletuner_train import assert_lcm_run, run_stock_trainer
from test_trainer_data_path import (  # noqa: F401 - model_dir, simpletuner_state, text_oracle, vae_oracle: fixtures
    RESUME_AT,
    SERVED,
    SIZES,
    STEPS,
    assert_samples_equal_image_by_image,
    assert_simpletuner_geometry_and_text,
    latent_bound,
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


def write_hf_run(root: Path, model_dir: Path, *, max_train_steps: int) -> Path:
    """The local test's run, its images and captions moved into `root/hf` as one parquet file of a local Hugging
    Face dataset (row i: the i-th image by name), the entry rewritten to SimpleTuner's `type: huggingface` keys."""
    import datasets

    run = write_run(root, model_dir, max_train_steps=max_train_steps)
    images = sorted((run / "data").glob("*.jpg"))
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": path.read_bytes(), "path": None} for path in images],
         "caption": [path.with_suffix(".txt").read_text() for path in images]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    (run / "hf" / "data").mkdir(parents=True)
    table.to_parquet(str(run / "hf" / "data" / "train-00000-of-00001.parquet"))
    shutil.move(run / "data", run / "local-copy")  # the oracles read these; the trainers cannot
    backends_file = run / "config" / "multidatabackend.json"
    backends = json.loads(backends_file.read_text())
    entry = backends[0]
    for key in ("instance_data_dir", "caption_strategy"):
        del entry[key]
    entry.update(type="huggingface", dataset_name=str(run / "hf"), caption_strategy="huggingface",
                 metadata_backend="huggingface")
    backends_file.write_text(json.dumps(backends, indent=2))
    return run


def train(run: Path, record_dir: Path, data_path: str | None) -> tuple[str, dict]:
    # `load_dataset` copies the table into its own cache: the run's, not the user's.
    env = recording_env(record_dir, data_path) | {"HF_DATASETS_CACHE": str(run / "datasets-cache")}
    log = run_stock_trainer(run, env)
    assert_lcm_run(log, run / "output")
    return log, records(record_dir)


def local_samples(run: Path, batch: dict) -> list[dict]:
    """`samples(batch)`, each named by the image file its row was made from (`<row>.jpg` -> the row-th by name)."""
    images = sorted((run / "local-copy").glob("*.jpg"))
    out = samples(batch)
    for sample in out:
        sample["path"] = str(images[int(Path(sample["path"]).stem)])
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
    root = tmp_path_factory.mktemp("hf-reference")
    run = write_hf_run(root / "run", model_dir, max_train_steps=STEPS)
    log, recorded = train(run, root / "records", "simpletuner")
    return run, log, recorded


@pytest.fixture(scope="module")
def ours(tmp_path_factory, model_dir):
    """The plugin's path (an LCM run, the switch unset): RESUME_AT steps, then resumed up to STEPS. (run, first log,
    resumed log, records of both)."""
    root = tmp_path_factory.mktemp("hf-ours")
    run = write_hf_run(root / "run", model_dir, max_train_steps=RESUME_AT)
    first_log, first = train(run, root / "records-first", None)
    set_config(run, max_train_steps=STEPS, resume_from_checkpoint="latest")
    (run / "output" / "training_metrics.jsonl").unlink()
    resumed_log, resumed = train(run, root / "records-resumed", None)
    return run, first_log, resumed_log, {**first, **resumed}


def test_simpletuners_path_on_the_table_is_its_own_functions(reference, simpletuner_state, text_oracle):
    run, log, recorded = reference
    assert sorted(recorded) == [(0, step) for step in range(STEPS)], log[-4000:]
    assert SERVED not in log
    for batch in recorded.values():
        for sample in local_samples(run, batch):
            assert_simpletuner_geometry_and_text(sample, text_oracle)


def test_our_path_serves_the_table_from_the_store_and_writes_no_pt(ours):
    run, first_log, resumed_log, _ = ours
    assert f"{SERVED} ({len(SIZES)} image(s) encoded here, 0 already cached)" in first_log, first_log[-4000:]
    assert f"(0 image(s) encoded here, {len(SIZES)} already cached)" in resumed_log, resumed_log[-4000:]
    assert not list(run.rglob("*.pt"))
    manifest = json.loads((run / "cache" / "vae" / "lcm" / "manifest.json").read_text())
    assert sorted(entry["image"] for entry in manifest["images"]) == sorted(f"{i}.jpg" for i in range(len(SIZES)))


def test_our_samples_equal_simpletuners_image_by_image(reference, ours, simpletuner_state, vae_oracle, tmp_path):
    """SimpleTuner's VAE cache decodes, for a row, the PNG of the image `datasets` decoded (PIL, its EXIF orientation
    applied; HuggingfaceDatasetsBackend.read), not the JPEG: the latent bound is taken on those pixels."""
    from PIL import Image, ImageOps

    def as_simpletuner_reads_it(sample: dict, vae_oracle) -> float:
        view = tmp_path / Path(sample["path"]).with_suffix(".png").name
        if not view.exists():
            with Image.open(sample["path"]) as image:
                ImageOps.exif_transpose(image).save(view, "PNG")
        return latent_bound(sample, vae_oracle, simpletuner_input=str(view))

    assert_samples_equal_image_by_image(by_image(reference[0], reference[2]), by_image(ours[0], ours[3]), vae_oracle,
                                        bound=as_simpletuner_reads_it)


def test_a_restart_on_our_path_trains_on_simpletuners_geometry_and_text(ours, simpletuner_state, text_oracle):
    run, _, resumed_log, recorded = ours
    resumed = {key: batch for key, batch in recorded.items() if key[1] >= RESUME_AT}
    assert len(resumed) == STEPS - RESUME_AT, resumed_log[-4000:]
    for batch in resumed.values():
        for sample in local_samples(run, batch):
            assert_simpletuner_geometry_and_text(sample, text_oracle)
