"""A `type: aws` dataset inside the stock `simpletuner train`: the same photo-like JPEGs as
test_trainer_data_path.py, as objects of a bucket on moto's S3 server (127.0.0.1, behind the recording proxy of
tests/s3_server.py), trained on SimpleTuner's own path and on the plugin's.

- SimpleTuner's path is the judge: its recorded batches are checked against SimpleTuner's functions run here (as in
  the local test), and the bucket files it writes into the bucket are the reference for ours.
- The plugin's path builds a local store from the objects, writes SimpleTuner's bucket files into the bucket (where
  SimpleTuner keeps them), and its samples equal SimpleTuner's image by image: bucket, crop, time_ids and text
  embeddings bit for bit, latents within the resize bound of the local test.
- Its restart reads no image object: the scan memo holds every object's stamp, the store every latent.
- Our run's dataset lists the bucket under the key prefix "photos/" (SimpleTuner's lists it whole), which trains only
  with install.py's S1.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from test_trainer_data_path import (  # noqa: F401 - model_dir, simpletuner_state, text_oracle, vae_oracle: fixtures
    BACKEND_ID,
    METADATA_KEYS,
    RESUME_AT,
    SERVED,
    SIZES,
    STEPS,
    assert_samples_equal_image_by_image,
    assert_simpletuner_geometry_and_text,
    model_dir,
    samples,
    set_config,
    simpletuner_state,
    text_oracle,
    train,
    vae_oracle,
    write_run,
)

sys.path.insert(0, str(Path(__file__).parents[1]))
from s3_server import REGION, FaultProxy, S3Server  # noqa: E402

BUCKET = "training-data"
# moto checks no signature: credentials that no log line or file may show
KEY_ID, SECRET = "AKIDTRAINERNEVERSHOWN", "SECRETTRAINERNEVERSHOWN"
# The objects' folder. SimpleTuner's run lists the whole bucket (aws_data_prefix ""), ours lists this prefix:
# SimpleTuner 4.10.1's sampler alone stops at the first batch with any prefix but "" (install.py S1).
PREFIX = "photos/"
IMAGE_SUFFIX = ".jpg"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server and the proxy in front of it (which records every request the trainers make)."""
    with S3Server() as server, FaultProxy(server.endpoint) as proxy:
        yield server, proxy


def write_s3_run(root: Path, model_dir: Path, s3, *, max_train_steps: int, bucket: str, folder: str = PREFIX,
                 data_prefix: str = "") -> Path:
    """The local test's run, its dataset moved into `bucket` under `folder` (images and caption files), the entry
    rewritten to SimpleTuner's `type: aws` keys; the VAE cache is the relative `cache/vae` (a key prefix in the bucket
    on SimpleTuner's path, a local folder of the run on ours)."""
    server, proxy = s3
    run = write_run(root, model_dir, max_train_steps=max_train_steps)
    client = server.client()
    client.create_bucket(Bucket=bucket)
    for path in sorted((run / "data").iterdir()):
        client.put_object(Bucket=bucket, Key=folder + path.name, Body=path.read_bytes())
    shutil.move(run / "data", run / "local-copy")  # the oracles read these; the trainers cannot
    backends_file = run / "config" / "multidatabackend.json"
    backends = json.loads(backends_file.read_text())
    entry = backends[0]
    del entry["instance_data_dir"]
    entry.update(type="aws", aws_bucket_name=bucket, aws_data_prefix=data_prefix, aws_region_name=REGION,
                 aws_endpoint_url=proxy.endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                 cache_dir_vae="cache/vae")
    backends_file.write_text(json.dumps(backends, indent=2))
    return run


def local_samples(run: Path, batch: dict, folder: str = PREFIX) -> list[dict]:
    """`samples(batch)`, each named by the local copy of its object (the oracles read files)."""
    out = samples(batch)
    for sample in out:
        assert sample["path"].startswith(folder), sample["path"]
        sample["path"] = str(run / "local-copy" / sample["path"][len(folder):])
    return out


def keys(s3, bucket: str, prefix: str = "") -> list[str]:
    client = s3[0].client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def bucket_json(s3, bucket: str, key: str) -> dict:
    return json.loads(s3[0].client().get_object(Bucket=bucket, Key=key)["Body"].read())


def image_gets(requests: list[tuple[str, str | None]]) -> list[str]:
    return [key for method, key in requests if method == "GET" and key and key.endswith(IMAGE_SUFFIX)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir, s3):
    """SimpleTuner's own path on the bucket, STEPS steps: (run, log, records)."""
    root = tmp_path_factory.mktemp("s3-reference")
    run = write_s3_run(root / "run", model_dir, s3, max_train_steps=STEPS, bucket=BUCKET + "-reference")
    log, recorded = train(run, root / "records", "simpletuner")
    return run, log, recorded


@pytest.fixture(scope="module")
def ours(tmp_path_factory, model_dir, s3):
    """The plugin's path (an LCM run, the switch unset) on its own bucket of the same objects: RESUME_AT steps, then
    resumed up to STEPS. (run, first log, resumed log, records of both, image GETs of each start)."""
    proxy = s3[1]
    root = tmp_path_factory.mktemp("s3-ours")
    run = write_s3_run(root / "run", model_dir, s3, max_train_steps=RESUME_AT, bucket=BUCKET + "-ours",
                       data_prefix=PREFIX)
    before_first = len(proxy.requests)
    first_log, first = train(run, root / "records-first", None)
    set_config(run, max_train_steps=STEPS, resume_from_checkpoint="latest")
    (run / "output" / "training_metrics.jsonl").unlink()
    before_resumed = len(proxy.requests)
    resumed_log, resumed = train(run, root / "records-resumed", None)
    requests = proxy.requests
    gets = (image_gets(requests[before_first:before_resumed]), image_gets(requests[before_resumed:]))
    return run, first_log, resumed_log, {**first, **resumed}, gets


def test_simpletuners_path_on_the_bucket_is_its_own_functions(reference, s3, simpletuner_state, text_oracle):
    run, log, recorded = reference
    assert sorted(recorded) == [(0, step) for step in range(STEPS)], log[-4000:]
    assert SERVED not in log
    assert any(key.startswith("cache/vae/") and key.endswith(".pt") for key in keys(s3, BUCKET + "-reference")), \
        "SimpleTuner keeps an S3 dataset's latents in the bucket"
    for batch in recorded.values():
        for sample in local_samples(run, batch):
            assert_simpletuner_geometry_and_text(sample, text_oracle)


def test_our_path_serves_the_bucket_from_a_local_store_and_writes_no_pt(ours, s3):
    run, first_log, resumed_log, _, _ = ours
    assert f"{SERVED} ({len(SIZES)} image(s) encoded here, 0 already cached)" in first_log, first_log[-4000:]
    assert f"(0 image(s) encoded here, {len(SIZES)} already cached)" in resumed_log, resumed_log[-4000:]
    assert not [key for key in keys(s3, BUCKET + "-ours") if key.endswith(".pt")]
    assert not list(run.rglob("*.pt"))
    manifest = json.loads((run / "cache" / "vae" / "lcm" / "manifest.json").read_text())
    assert sorted(entry["image"] for entry in manifest["images"]) == sorted(
        f"{PREFIX}photo{i:02d}{IMAGE_SUFFIX}" for i in range(len(SIZES)))
    ours_lines = [line for log in (first_log, resumed_log) for line in log.splitlines() if "simpletuner-lcm" in line]
    written = [path.read_bytes() for path in (run / "cache").rglob("*") if path.is_file()]
    for secret in (KEY_ID, SECRET):
        assert not [line for line in ours_lines if secret in line]
        assert not [data for data in written if secret.encode() in data]


def test_our_bucket_files_in_the_bucket_are_simpletuners(reference, ours, s3):
    """The bucket files our build wrote into the bucket hold what SimpleTuner's own discovery wrote into its bucket:
    the same images in the same buckets, the same metadata per image."""
    names = (f"aspect_ratio_bucket_indices_{BACKEND_ID}.json", f"aspect_ratio_bucket_metadata_{BACKEND_ID}.json")
    theirs = [bucket_json(s3, BUCKET + "-reference", name) for name in names]  # aws_data_prefix "": the root
    ours_ = [bucket_json(s3, BUCKET + "-ours", PREFIX + name) for name in names]  # under aws_data_prefix
    buckets = ours_[0]["aspect_ratio_bucket_indices"]
    assert {bucket: sorted(paths) for bucket, paths in buckets.items()} == {
        bucket: sorted(paths) for bucket, paths in theirs[0]["aspect_ratio_bucket_indices"].items()}
    assert sorted(ours_[1]) == sorted(theirs[1]) == sorted(f"{PREFIX}photo{i:02d}{IMAGE_SUFFIX}"
                                                          for i in range(len(SIZES)))
    for key, metadata in theirs[1].items():
        assert {k: ours_[1][key][k] for k in METADATA_KEYS} == {k: metadata[k] for k in METADATA_KEYS}, key


def test_our_samples_equal_simpletuners_image_by_image(reference, ours, simpletuner_state, vae_oracle):
    def by_image(run: Path, recorded: dict) -> dict[str, dict]:
        out = {}
        for key in sorted(recorded):
            for sample in local_samples(run, recorded[key]):
                out.setdefault(Path(sample["path"]).name, sample)
        return out

    assert_samples_equal_image_by_image(by_image(reference[0], reference[2]), by_image(ours[0], ours[3]), vae_oracle)


def test_a_restart_on_our_path_reads_no_image_object(ours, simpletuner_state, text_oracle):
    run, _, resumed_log, recorded, (first_gets, resumed_gets) = ours
    # The first start read each image once (the proxy sees them), the restart none.
    assert sorted(set(first_gets)) == sorted(f"{PREFIX}photo{i:02d}{IMAGE_SUFFIX}" for i in range(len(SIZES)))
    assert resumed_gets == [], resumed_gets
    resumed = {key: batch for key, batch in recorded.items() if key[1] >= RESUME_AT}
    assert len(resumed) == STEPS - RESUME_AT
    for batch in resumed.values():
        for sample in local_samples(run, batch):
            assert_simpletuner_geometry_and_text(sample, text_oracle)


def test_an_s3_dataset_sized_and_captioned_by_a_parquet_object_trains_on_our_path(tmp_path, model_dir, s3,
                                                                                  simpletuner_state, text_oracle):
    """`metadata_backend: parquet` and `caption_strategy: parquet` on an S3 dataset, the table an object of the
    bucket: the build reads it by column and buckets by its sizes; the trainer's batches hold SimpleTuner's geometry
    of each image and the encoders' embeddings of its caption from the table. The objects lie at the bucket's root:
    SimpleTuner looks a size up by the file name's stem and a caption by the key below aws_data_prefix, one id for
    both only there."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    bucket = BUCKET + "-parquet"
    run = write_s3_run(tmp_path / "run", model_dir, s3, max_train_steps=3, bucket=bucket, folder="")
    images = sorted((run / "local-copy").glob("*.jpg"))
    sizes = [Image.open(path).size for path in images]
    table = pa.table({"file": [path.stem for path in images], "width": [w for w, _ in sizes],
                      "height": [h for _, h in sizes],
                      "caption": [path.with_suffix(".txt").read_text() for path in images]})
    out = io.BytesIO()
    pq.write_table(table, out)
    s3[0].client().put_object(Bucket=bucket, Key="photos.parquet", Body=out.getvalue())
    backends_file = run / "config" / "multidatabackend.json"
    backends = json.loads(backends_file.read_text())
    backends[0] |= {"metadata_backend": "parquet", "caption_strategy": "parquet",
                    "parquet": {"path": "photos.parquet", "filename_column": "file", "caption_column": "caption"}}
    backends_file.write_text(json.dumps(backends, indent=2))
    log, recorded = train(run, tmp_path / "records", None)
    assert f"{SERVED} ({len(SIZES)} image(s) encoded here, 0 already cached)" in log, log[-4000:]
    assert not list(run.rglob("*.pt")) and not [key for key in keys(s3, bucket) if key.endswith(".pt")]
    assert len(recorded) == 3
    for batch in recorded.values():
        for sample in local_samples(run, batch, folder=""):
            assert_simpletuner_geometry_and_text(sample, text_oracle)
