"""`simpletuner-lcm cache build` on a `type: aws` dataset, against moto's real S3 server on 127.0.0.1: the plan is the
same Rust columns as a local folder's (object keys name the images), the bytes are fetched concurrently and decoded
from memory as SimpleTuner decodes S3 objects (no EXIF orientation), and the store it writes equals, entry for entry
and bit for bit, the store a local folder of the same files gives. A rerun fetches and encodes nothing; no credential
reaches a log line, the manifest or the memo."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s3_server import FaultProxy, S3Server  # noqa: E402

from lcm_plugin.cache import LatentCacheReader  # noqa: E402
from lcm_plugin.cache_build import BuildOptions, build  # noqa: E402
from lcm_plugin.cache_build.layout import LCM_DIR, MANIFEST  # noqa: E402
from lcm_plugin.cache_build.plan import BuildError  # noqa: E402

BUCKET = "photos"
KEY_ID, SECRET = "AKIDLCMNEVERSHOWN", "SECRETLCMNEVERSHOWN"
SIZES = ((160, 128), (128, 160), (128, 128))


def objects() -> dict[str, bytes]:
    """Images under "images/" (one in a subfolder) with caption objects, and an EXIF-rotated JPEG."""
    rng = np.random.default_rng(11)
    found = {}
    for i in range(7):
        w, h = SIZES[i % 3]
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out, format="PNG")
        key = f"images/{'sub/' if i == 3 else ''}img{i}.png"
        found[key] = out.getvalue()
        found[key[:-4] + ".txt"] = f"caption {i % 4}".encode()
    out, exif = io.BytesIO(), Image.Exif()
    exif[0x0112] = 6  # "rotate 90°": SimpleTuner's S3 path decodes and buckets it as stored
    Image.fromarray(rng.integers(0, 256, (128, 160, 3), dtype=np.uint8)).save(out, format="JPEG", exif=exif)
    found["images/rotated.jpg"], found["images/rotated.txt"] = out.getvalue(), b"rotated"
    return found


def write_run(root: Path, model_dir: Path, entry: dict) -> Path:
    (root / "config").mkdir(parents=True)
    backends = [
        {"id": "toy", "crop": False, "resolution": 128, "resolution_type": "pixel", "minimum_image_size": 64,
         "cache_dir_vae": "cache/vae/toy", "caption_strategy": "textfile"} | entry,
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    (root / "config" / "multidatabackend.json").write_text(json.dumps(backends))
    config = {"model_type": "lora", "model_family": "sdxl", "output_dir": "output",
              "pretrained_model_name_or_path": str(model_dir), "pretrained_vae_model_name_or_path": str(model_dir / "vae"),
              "data_backend_config": "config/multidatabackend.json", "resolution": 128, "resolution_type": "pixel",
              "optimizer": "torch-adamw", "mixed_precision": "no", "vae_batch_size": 2, "max_train_steps": 1,
              "num_train_epochs": 0, "seed": 3}
    (root / "config" / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        for key, body in objects().items():
            client.put_object(Bucket=BUCKET, Key=key, Body=body)
        yield server


def aws_entry(endpoint: str, **changes) -> dict:
    return {"type": "aws", "aws_bucket_name": BUCKET, "aws_data_prefix": "images/", "aws_region_name": None,
            "aws_endpoint_url": endpoint, "aws_access_key_id": KEY_ID, "aws_secret_access_key": SECRET} | changes


def entries(run: Path) -> dict[str, np.ndarray]:
    reader = LatentCacheReader(run / "cache" / "vae" / "toy" / LCM_DIR)
    return {key: np.array(reader.get(key)) for key in reader.keys()}


def test_an_s3_dataset_builds_the_store_a_folder_of_the_same_files_builds(s3, tmp_path, tiny_sdxl_dir, capsys):
    remote = write_run(tmp_path / "s3", tiny_sdxl_dir, aws_entry(s3.endpoint))
    local = write_run(tmp_path / "local", tiny_sdxl_dir, {"type": "local", "instance_data_dir": "data"})
    for key, body in objects().items():  # the same files, under the same names as the object keys
        (local / "data" / key).parent.mkdir(parents=True, exist_ok=True)
        (local / "data" / key).write_bytes(body)

    report = build(BuildOptions(remote), log=print)
    build(BuildOptions(local), log=print)
    assert report.encoded == 8 and not report.failed
    ours, theirs = entries(remote), entries(local)
    rotated = {key for key in ours if key.startswith("images/rotated.jpg@")}
    assert len(rotated) == 2  # its latent and time_ids
    # every other entry: the same keys (object key = relative path, same recipe) and the same bits
    assert set(ours) - rotated == {key for key in theirs if not key.startswith("images/rotated.jpg@")}
    for key in set(ours) - rotated:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    # the JPEG is bucketed and cropped as stored (160 x 128, W x H), the local folder's as displayed (128 x 160)
    (time_ids,) = [ours[key] for key in rotated if key.endswith("#time_ids")]
    (local_ids,) = [theirs[key] for key in theirs if key.startswith("images/rotated.jpg@") and key.endswith("#time_ids")]
    assert time_ids.tolist()[:2] == [128, 160] and local_ids.tolist()[:2] == [160, 128]  # original (H, W)

    rerun = build(BuildOptions(remote), log=print)
    assert rerun.encoded == 0 and rerun.reused == 8
    shown = capsys.readouterr()
    manifest = (remote / "cache" / "vae" / "toy" / LCM_DIR / MANIFEST).read_text()
    assert "s3://photos/images/" in manifest
    memos = [path.read_bytes() for path in (remote / "cache" / "vae" / "toy").glob("lcm-inventory.*.memo")]
    assert memos
    for secret in (KEY_ID, SECRET):
        assert secret not in shown.out + shown.err and secret not in manifest
        assert all(secret.encode() not in memo for memo in memos)


@pytest.mark.parametrize(("change", "expected"), [
    ({"aws_secret_access_key": None}, "aws_access_key_id: no credentials"),
    ({"aws_data_prefix": ["a/", "b/"]}, "aws_data_prefix: give one key prefix"),
    ({"metadata_backend": "parquet", "parquet": {"path": "absent.parquet", "filename_column": "file"}},
     r"parquet/path: cannot read absent.parquet in S3Bucket\(\"photos\" at .*not found"),
], ids=["no-credentials", "prefix-list", "parquet-object-missing"])
def test_what_an_s3_dataset_cannot_be_is_named_by_its_key(s3, tmp_path, tiny_sdxl_dir, monkeypatch, change, expected):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    entry = aws_entry(s3.endpoint, **change)
    if "aws_data_prefix" in change:
        entry["aws_data_prefix"] = change["aws_data_prefix"]
    run = write_run(tmp_path, tiny_sdxl_dir, entry)
    with pytest.raises(BuildError, match=expected) as error:
        build(BuildOptions(run), log=print)
    assert SECRET not in str(error.value) and KEY_ID not in str(error.value)


def test_a_missing_aws_key_and_the_simpletuner_format_are_refused(s3, tmp_path, tiny_sdxl_dir):
    entry = aws_entry(s3.endpoint)
    del entry["aws_region_name"]
    with pytest.raises(BuildError, match=r"multidatabackend.json: /0: type 'aws' requires 'aws_region_name'"):
        build(BuildOptions(write_run(tmp_path / "a", tiny_sdxl_dir, entry)), log=print)
    with pytest.raises(BuildError, match="--format simpletuner writes SimpleTuner's files next to local images"):
        build(BuildOptions(write_run(tmp_path / "b", tiny_sdxl_dir, aws_entry(s3.endpoint)), simpletuner_format=True),
              log=print)


def test_faults_are_ridden_out_and_an_object_that_stays_broken_is_skipped_by_its_key(s3, tmp_path, tiny_sdxl_dir):
    """Through a proxy that injects faults: 500s, a dropped connection, a cut body and a slow answer are retried; an
    object that answers 500 to every try is skipped with one line naming its key, and the others are built. Once it
    answers again, the rerun encodes it alone. The store then holds what a build that saw no fault holds: the same
    entries, equal up to float noise (the first build's VAE batches lacked the broken image, so their compositions
    differ from the clean build's, and a CPU convolution's last bits follow the batch)."""
    clean = write_run(tmp_path / "clean", tiny_sdxl_dir, aws_entry(s3.endpoint))
    build(BuildOptions(clean), log=print)
    with FaultProxy(s3.endpoint) as proxy:
        run = write_run(tmp_path / "faulty", tiny_sdxl_dir, aws_entry(proxy.endpoint))
        proxy.fail("images/img0.png", "500", "drop")
        proxy.fail("images/img1.png", "truncate", "503")
        proxy.fail("images/img2.png", "slow:0.5")
        proxy.fail("images/img5.png", *["500"] * 40)
        report = build(BuildOptions(run), log=print)
        # what the CLI prints as "skipped <key>: <why>", one line
        assert [path for path, _ in report.failed] == ["images/img5.png"], report.failed
        (why,) = [why for _, why in report.failed]
        assert "\n" not in why and "500" in why and KEY_ID not in why and SECRET not in why, why
        assert report.encoded == 7
        for key in ("images/img0.png", "images/img1.png", "images/img2.png"):
            assert proxy.faults_left(key) == 0, key
        proxy.clear()
        rerun = build(BuildOptions(run), log=print)
    assert (rerun.encoded, rerun.reused, rerun.failed) == (1, 7, [])
    ours, theirs = entries(run), entries(clean)
    assert set(ours) == set(theirs)
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=1e-5, err_msg=key)


def test_a_killed_s3_build_resumes_to_the_store_of_an_uninterrupted_one(s3, tmp_path, tiny_sdxl_dir):
    """kill -9 of the build (its own SIGKILL at the sixth stored entry; 1 KB shards, so each entry before it is
    committed), then a rerun: what was committed is kept, and nothing is lost, duplicated or stale against an
    uninterrupted build of the same objects."""
    clean = write_run(tmp_path / "clean", tiny_sdxl_dir, aws_entry(s3.endpoint))
    build(BuildOptions(clean), log=print)
    run = write_run(tmp_path / "killed", tiny_sdxl_dir, aws_entry(s3.endpoint))
    # The killed build's torch pool as large as this process's (conftest sizes it per xdist worker): a convolution's
    # last bits follow the thread count, and the comparison is bit for bit.
    env = dict(os.environ, LCM_CACHE_BUILD_FAULT="put:6", OMP_NUM_THREADS=str(torch.get_num_threads()))
    killed = subprocess.run([sys.executable, "-m", "lcm_plugin.cli", "cache", "build", str(run), "--shard-mb", "0.001"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    rerun = build(BuildOptions(run, shard_bytes=1024), log=print)
    assert 0 < rerun.encoded < 8 and not rerun.failed
    ours, theirs = entries(run), entries(clean)
    assert set(ours) == set(theirs)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
