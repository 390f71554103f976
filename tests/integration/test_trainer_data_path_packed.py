"""Datasets whose images lie inside other files, inside the stock `simpletuner train`: the photo-like JPEGs of
test_trainer_data_path.py, half of them as members of two local tar shards with their webshart indexes
(`type: webshart`), half as rows of a local Hugging Face dataset (`type: huggingface`: a parquet file of the
`datasets` Image feature and a `caption` column, as `Dataset.to_parquet` writes it), one run with both datasets on
SimpleTuner's own path and on the plugin's (one run for both kinds: each start of the trainer costs a minute).

- SimpleTuner's path is the judge: its batches are checked against SimpleTuner's functions run here, as in the local
  test, on the same images.
- The plugin's path reads each image's bytes from its tar at the index's offset, or from the table's image column,
  builds the local store, and its samples equal SimpleTuner's image by image: bucket, crop, time_ids and text
  embeddings bit for bit, latents within the local test's resize bound.
- SimpleTuner's own metadata backend buckets the samples on both paths; the plugin writes no bucket file for them.
- One start of ours: a restart of either kind is the scan memo's and the store's, judged by
  test_cache_build_packed.py (a rerun reads no row) and by the local and S3 trainer tests.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from webshart_shards import Shard, write_index  # noqa: E402

from test_simpletuner_train import assert_lcm_run, run_stock_trainer  # noqa: E402
from test_trainer_data_path import (  # noqa: E402, F401 - model_dir, simpletuner_state, text_oracle, vae_oracle
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
    simpletuner_state,
    text_oracle,
    vae_oracle,
    write_run,
)

KINDS = ("webshart", "huggingface")
HALF = len(SIZES) // 2  # the first half of the images (by name) in shards, the second in the table


def write_shards(run: Path, images: list[Path]) -> dict:
    """Two tar shards of the images under `run/shards`, each with a webshart index holding every member's offset,
    length, stored size and caption (a paired `.txt` member is never found by SimpleTuner 4.10.1: webshart folds it
    into its image's sample); the entry's keys."""
    for number, start in enumerate((0, len(images) // 2)):
        part = images[start:start + len(images) // 2]
        write_index(Shard(f"shard-{number:03d}", {path.name: path.read_bytes() for path in part},
                          {path.name: {"captions": path.with_suffix(".txt").read_text()} for path in part}),
                    run / "shards")
    return {"type": "webshart", "source": str(run / "shards"), "caption_strategy": "webshart",
            "metadata_backend": "webshart"}


def write_table(run: Path, images: list[Path]) -> dict:
    """One parquet file of a local Hugging Face dataset under `run/hf` (row i: the i-th of `images`); the entry's
    keys."""
    import datasets

    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": path.read_bytes(), "path": None} for path in images],
         "caption": [path.with_suffix(".txt").read_text() for path in images]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    (run / "hf" / "data").mkdir(parents=True)
    table.to_parquet(str(run / "hf" / "data" / "train-00000-of-00001.parquet"))
    return {"type": "huggingface", "dataset_name": str(run / "hf"), "caption_strategy": "huggingface",
            "metadata_backend": "huggingface"}


def write_packed_run(root: Path, model_dir: Path, *, max_train_steps: int) -> Path:
    """The local test's run, its images and captions moved into shards and a table, its image entry replaced by one
    entry per kind with SimpleTuner's keys for it (the same bucketing settings, a latent store each); the original
    files stay in `local-copy` for the oracles."""
    run = write_run(root, model_dir, max_train_steps=max_train_steps)
    images = sorted((run / "data").glob("*.jpg"))
    kinds = {"webshart": write_shards(run, images[:HALF]), "huggingface": write_table(run, images[HALF:])}
    shutil.move(run / "data", run / "local-copy")  # the oracles read these; the trainers cannot
    backends_file = run / "config" / "multidatabackend.json"
    local, *rest = json.loads(backends_file.read_text())
    for key in ("instance_data_dir", "caption_strategy"):
        del local[key]
    entries = [local | keys | {"id": kind, "cache_dir_vae": str(run / "cache" / "vae" / kind)}
               for kind, keys in kinds.items()]
    backends_file.write_text(json.dumps(entries + rest, indent=2))
    return run


def train(run: Path, record_dir: Path, data_path: str | None) -> tuple[str, dict]:
    log = run_stock_trainer(run, recording_env(record_dir, data_path))
    assert_lcm_run(log, run / "output")
    return log, records(record_dir)


def local_file(run: Path, sample_path: str) -> Path:
    """The image file a recorded sample was made from: SimpleTuner names a webshart sample
    `webshart://<shard>/<n>/<member>` (its sampler joins the dataset's cache folder before it), a row `<row>.jpg`."""
    if "webshart://" in sample_path:
        return run / "local-copy" / sample_path.rsplit("/", 1)[1]
    return sorted((run / "local-copy").glob("*.jpg"))[HALF + int(Path(sample_path).stem)]


def kind_of(path: str) -> str:
    """The kind the image `photo<i>.jpg` went to (the images sort by their number)."""
    return "webshart" if int(Path(path).stem.removeprefix("photo")) < HALF else "huggingface"


def local_samples(run: Path, batch: dict) -> list[dict]:
    out = samples(batch)
    for sample in out:
        sample["path"] = str(local_file(run, sample["path"]))
    return out


def by_image(run: Path, recorded: dict) -> dict[str, dict]:
    out = {}
    for key in sorted(recorded):
        for sample in local_samples(run, recorded[key]):
            out.setdefault(Path(sample["path"]).name, sample)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir):
    """SimpleTuner's own path on both datasets, STEPS steps: (run, log, records)."""
    root = tmp_path_factory.mktemp("packed-reference")
    run = write_packed_run(root / "run", model_dir, max_train_steps=STEPS)
    log, recorded = train(run, root / "records", "simpletuner")
    return run, log, recorded


@pytest.fixture(scope="module")
def ours(tmp_path_factory, model_dir):
    """The plugin's path (an LCM run, the switch unset) on both, STEPS steps: (run, log, records)."""
    root = tmp_path_factory.mktemp("packed-ours")
    run = write_packed_run(root / "run", model_dir, max_train_steps=STEPS)
    log, recorded = train(run, root / "records", None)
    return run, log, recorded


def test_simpletuners_path_is_its_own_functions(reference, simpletuner_state, text_oracle):
    run, log, recorded = reference
    assert sorted(recorded) == [(0, step) for step in range(STEPS)], log[-4000:]
    assert SERVED not in log
    for batch in recorded.values():
        for sample in local_samples(run, batch):
            assert_simpletuner_geometry_and_text(sample, text_oracle)


def test_our_path_serves_the_samples_from_the_store_and_writes_no_pt(ours):
    run, log, _ = ours
    assert f"{SERVED} ({len(SIZES)} image(s) encoded here, 0 already cached)" in log, log[-4000:]
    assert not list(run.rglob("*.pt"))
    names = {kind: sorted(local_file(run, entry["image"]).name for entry in json.loads(
        (run / "cache" / "vae" / kind / "lcm" / "manifest.json").read_text())["images"]) for kind in KINDS}
    images = sorted(path.name for path in (run / "local-copy").glob("*.jpg"))
    assert names == {"webshart": images[:HALF], "huggingface": images[HALF:]}


def test_our_samples_equal_simpletuners_image_by_image(reference, ours, simpletuner_state, vae_oracle, tmp_path):
    """A Hugging Face row reaches SimpleTuner's VAE cache as the PNG of the image `datasets` decoded (PIL, its EXIF
    orientation applied; HuggingfaceDatasetsBackend.read), not as the JPEG: the latent bound is taken on those
    pixels. A webshart member reaches it as its bytes."""
    from PIL import Image, ImageOps

    run, _, recorded = reference

    def as_simpletuner_reads_it(sample: dict, vae_oracle) -> float:
        if kind_of(sample["path"]) == "webshart":
            return latent_bound(sample, vae_oracle)
        view = tmp_path / Path(sample["path"]).with_suffix(".png").name
        if not view.exists():
            with Image.open(sample["path"]) as image:
                ImageOps.exif_transpose(image).save(view, "PNG")
        return latent_bound(sample, vae_oracle, simpletuner_input=str(view))

    theirs, ours_ = by_image(run, recorded), by_image(ours[0], ours[2])
    assert_samples_equal_image_by_image(theirs, ours_, vae_oracle, bound=as_simpletuner_reads_it)
    compared = {kind_of(name) for name in set(theirs) & set(ours_)}
    assert compared == set(KINDS), compared
