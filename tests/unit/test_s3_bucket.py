"""The Rust S3 client (`S3Bucket`) against a real S3-protocol server on 127.0.0.1 (moto's), through a proxy that
injects faults: it lists, reads and sizes a `type: aws` dataset as SimpleTuner 4.10.1 does, rides out 5xx answers,
dropped connections, slow and truncated responses, names an object that stays broken or was deleted after the
listing, and a restart with its memo fetches only what changed.

Judges: SimpleTuner's own `S3DataBackend` (boto3) for the listing and the caption bytes, and its `load_image` for the
sizes (it decodes a remote image whole, without applying the EXIF orientation, unlike a local header scan).
"""

from __future__ import annotations

import io
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s3_server import FaultProxy, S3Server  # noqa: E402

from lcm_plugin.cache import RemoteReadError, S3Bucket  # noqa: E402
from lcm_plugin.cache_build.plan import IMAGE_EXTENSIONS  # noqa: E402

from simpletuner.helpers.data_backend.aws import S3DataBackend  # noqa: E402
from simpletuner.helpers.image_manipulation.load import load_image  # noqa: E402
from simpletuner.helpers.training import image_file_extensions  # noqa: E402

BUCKET = "photos"
CREDENTIALS = {"access_key_id": "test", "secret_access_key": "test"}


def png(size: tuple[int, int], colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def rotated_jpeg(size: tuple[int, int]) -> bytes:
    """A JPEG stored at `size` whose EXIF says "rotate 90°" (orientation 6)."""
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", size, (30, 30, 200)).save(out, format="JPEG", exif=exif)
    return out.getvalue()


OBJECTS = {
    "images/a.png": png((40, 30)),
    "images/a.txt": b"a red circle\n",
    "images/sub/b.jpg": rotated_jpeg((60, 20)),
    "images/sub/b.txt": "two lines\nof caption é".encode(),
    "images/C.PNG": png((16, 48)),
    "images/x y é.png": png((32, 32)),
    "images/.hidden/h.png": png((24, 24)),
    "images/clip.mp4": b"not read",
    "images/notes.json": b"{}",
    "images2/d.png": png((20, 20)),  # the raw prefix "images" lists it too, as SimpleTuner's does
}


@pytest.fixture(scope="module")
def server():
    with S3Server() as s3:
        yield s3


@pytest.fixture
def s3(server):
    server.reset()
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    for key, body in OBJECTS.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
    with FaultProxy(server.endpoint) as proxy:
        yield SimpleNamespace(client=client, proxy=proxy, endpoint=server.endpoint)


def bucket(endpoint: str, **patience) -> S3Bucket:
    return S3Bucket(endpoint, BUCKET, **CREDENTIALS, **({"retries": 3, "backoff_s": 0.01, "timeout_s": 5} | patience))


def simpletuner_backend(endpoint: str) -> S3DataBackend:
    return S3DataBackend(id="photos", bucket_name=BUCKET, accelerator=None, endpoint_url=endpoint,
                         aws_access_key_id="test", aws_secret_access_key="test", read_retry_interval=0)


@pytest.mark.parametrize("prefix", ["images/", "images", "images/sub/", ""])
def test_the_listing_and_sizes_are_simpletuners(s3, prefix):
    judge = simpletuner_backend(s3.endpoint)
    listed = [key for _, _, keys in judge.list_files(file_extensions=image_file_extensions, instance_data_dir=prefix)
              for key in keys]
    others = sorted(set(ext.lstrip(".") for ext in image_file_extensions) - {e.lstrip(".") for e in IMAGE_EXTENSIONS})
    inventory = bucket(s3.endpoint).scan(prefix, list(IMAGE_EXTENSIONS), ".txt",
                                         other_extensions=[f".{ext}" for ext in others])
    assert sorted(inventory.keys + inventory.others) == sorted(listed)
    assert "images/clip.mp4" not in inventory.keys and ("images/clip.mp4" in inventory.others) == (prefix != "images/sub/")
    for key, size in zip(inventory.keys, inventory.sizes):
        assert size == load_image(judge.read(key)).size, key  # stored size: (60, 20) for the rotated JPEG
    assert inventory.errors == [] and inventory.read == len(inventory.keys)


@pytest.mark.parametrize("prefix", ["images/", "images", "images/sub/", ""])
def test_the_bucket_listing_is_simpletuners_list_files_in_its_order(s3, prefix):
    """The trainer's data path answers `S3DataBackend.list_files` from the scan (D7): the same folders, [] and keys,
    in the same order, for SimpleTuner's extensions."""
    from lcm_plugin import trainer_cache

    judge = simpletuner_backend(s3.endpoint)
    listed = judge.list_files(file_extensions=image_file_extensions, instance_data_dir=prefix)
    others = sorted({f".{ext.lower().lstrip('.')}" for ext in image_file_extensions} - set(IMAGE_EXTENSIONS))
    inventory = bucket(s3.endpoint).scan(prefix, list(IMAGE_EXTENSIONS), ".txt", other_extensions=others)
    trainer_cache._coverage.datasets["photos"] = trainer_cache.DatasetCache(
        "photos", None, {}, listed=(prefix, trainer_cache.listed_as(image_file_extensions), inventory), kind="aws")
    try:
        assert trainer_cache.take_listing("photos", "elsewhere/", image_file_extensions) is None
        assert trainer_cache.take_listing("photos", prefix, ["png"]) is None  # not the extensions it listed
        assert trainer_cache.take_listing("photos", prefix, image_file_extensions) == listed
        assert trainer_cache.take_listing("photos", prefix, image_file_extensions) is None  # once
    finally:
        trainer_cache.reset()


def test_bucket_files_are_put_and_their_stamp_is_the_servers(s3, tmp_path):
    """What the trainer writes into a bucket (SimpleTuner's bucket files) and how it tells that nobody rewrote them:
    the size and ETag the server reports (boto3's HeadObject is the judge)."""
    from lcm_plugin.cache_build.simpletuner_format import WrittenMetadata

    client = bucket(s3.endpoint)
    e_tag = client.put("images/aspect_ratio_bucket_metadata_photos.json", b'{"a": 1}')
    judged = s3.client.head_object(Bucket=BUCKET, Key="images/aspect_ratio_bucket_metadata_photos.json")
    assert client.head("images/aspect_ratio_bucket_metadata_photos.json") == (judged["ContentLength"], e_tag)
    assert e_tag == judged["ETag"] and client.head("images/none.json") is None
    written = WrittenMetadata("images/aspect_ratio_bucket_metadata_photos.json", (8, e_tag), {"a": 1}, client)
    assert written.is_unchanged(Path("images/aspect_ratio_bucket_metadata_photos.json"))
    assert not written.is_unchanged("images/aspect_ratio_bucket_metadata_other.json")
    s3.client.put_object(Bucket=BUCKET, Key="images/aspect_ratio_bucket_metadata_photos.json", Body=b'{"a": 2}')
    assert not written.is_unchanged("images/aspect_ratio_bucket_metadata_photos.json")  # same size, another ETag
    unreachable = WrittenMetadata("k.json", (8, e_tag), {}, S3Bucket("http://127.0.0.1:9", BUCKET, **CREDENTIALS,
                                                                     retries=0, timeout_s=2))
    assert not unreachable.is_unchanged("k.json")


def test_captions_are_the_caption_objects_bytes(s3):
    judge = simpletuner_backend(s3.endpoint)
    inventory = bucket(s3.endpoint).scan("images/", list(IMAGE_EXTENSIONS), ".txt")
    captions = dict(zip(inventory.keys, inventory.captions))
    assert captions["images/a.png"] == judge.read("images/a.txt").decode()
    assert captions["images/sub/b.jpg"] == judge.read("images/sub/b.txt").decode()
    assert captions["images/C.PNG"] is None  # no caption object


def test_faults_are_ridden_out_and_the_bytes_are_whole(s3):
    clean = bucket(s3.endpoint).scan("images/", list(IMAGE_EXTENSIONS), ".txt")
    s3.proxy.fail("images/a.png", "500", "drop", "503")
    s3.proxy.fail("images/sub/b.jpg", "truncate", "slow:0.3")
    s3.proxy.fail("images/a.txt", "truncate")
    faulty = bucket(s3.proxy.endpoint).scan("images/", list(IMAGE_EXTENSIONS), ".txt")
    assert faulty.errors == [] and faulty.caption_errors == []
    assert (faulty.keys, faulty.sizes, faulty.contents, faulty.captions) == (
        clean.keys, clean.sizes, clean.contents, clean.captions)
    assert s3.proxy.faults_left("images/a.png") == 0 and s3.proxy.faults_left("images/sub/b.jpg") == 0


def test_an_object_that_stays_broken_is_named_and_the_rest_are_read(s3):
    s3.proxy.fail("images/a.png", *["500"] * 10)
    inventory = bucket(s3.proxy.endpoint, retries=2).scan("images/", list(IMAGE_EXTENSIONS), ".txt")
    errors = {inventory.keys[i]: why for i, why in inventory.errors}
    assert list(errors) == ["images/a.png"] and "images/a.png" in errors["images/a.png"]
    assert all(size is not None for key, size in zip(inventory.keys, inventory.sizes) if key != "images/a.png")


def test_an_object_deleted_after_the_listing_is_named(s3):
    # The first object read is held back; while its read waits, the second is deleted.
    s3.proxy.fail("images/.hidden/h.png", "slow:1.0")

    def delete_once_the_first_read_began():
        deadline = time.monotonic() + 10
        while ("GET", "images/.hidden/h.png") not in s3.proxy.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        s3.client.delete_object(Bucket=BUCKET, Key="images/C.PNG")

    deleter = threading.Thread(target=delete_once_the_first_read_began)
    deleter.start()
    inventory = bucket(s3.proxy.endpoint).scan("images/", list(IMAGE_EXTENSIONS), ".txt", concurrency=1)
    deleter.join()
    errors = {inventory.keys[i]: why for i, why in inventory.errors}
    assert list(errors) == ["images/C.PNG"] and "not found" in errors["images/C.PNG"]


def test_a_restart_fetches_only_what_changed(s3, tmp_path):
    memo = tmp_path / "memo"
    first = bucket(s3.endpoint).scan("images/", list(IMAGE_EXTENSIONS), ".txt", memo=memo)
    first.write_memo(memo)
    time.sleep(2.1)  # rows written within the memo's racy window are read again
    first.write_memo(memo)
    again = bucket(s3.endpoint).scan("images/", list(IMAGE_EXTENSIONS), ".txt", memo=memo)
    assert again.read == 0 and again.contents == first.contents
    s3.client.put_object(Bucket=BUCKET, Key="images/a.png", Body=png((40, 30), colour=(0, 255, 0)))
    s3.client.put_object(Bucket=BUCKET, Key="images/sub/b.txt", Body=b"a new caption")
    changed = bucket(s3.endpoint).scan("images/", list(IMAGE_EXTENSIONS), ".txt", memo=memo)
    assert changed.read == 2
    index = changed.keys.index("images/a.png")
    assert changed.contents[index] != first.contents[index]
    assert dict(zip(changed.keys, changed.captions))["images/sub/b.jpg"] == "a new caption"


def test_an_object_that_could_not_be_fetched_is_fetched_again_by_the_restart(s3, tmp_path):
    """A network failure is not remembered as the object's answer: the memo of a scan that could not fetch an image
    or a caption makes the next scan fetch those again (and only those), while a changed-nothing object is not."""
    memo = tmp_path / "memo"
    s3.proxy.fail("images/a.png", *["500"] * 10)
    s3.proxy.fail("images/sub/b.txt", *["500"] * 10)
    first = bucket(s3.proxy.endpoint, retries=1).scan("images/", list(IMAGE_EXTENSIONS), ".txt", memo=memo)
    assert [first.keys[i] for i, _ in first.errors] == ["images/a.png"] and first.caption_errors
    first.write_memo(memo)
    time.sleep(2.1)  # rows written within the memo's racy window are read again
    first.write_memo(memo)
    s3.proxy.clear()
    again = bucket(s3.proxy.endpoint).scan("images/", list(IMAGE_EXTENSIONS), ".txt", memo=memo)
    assert again.errors == [] and again.caption_errors == []
    assert again.read == 2  # a.png (with its caption), and b.jpg for its caption
    assert sorted(key for method, key in s3.proxy.requests if method == "GET" and key) == [
        "images/a.png", "images/a.txt", "images/sub/b.jpg", "images/sub/b.txt"]
    captions = dict(zip(again.keys, again.captions))
    assert captions["images/sub/b.jpg"] == "two lines\nof caption é" and again.sizes[again.keys.index("images/a.png")]


def test_an_unreachable_server_is_one_error_naming_the_bucket():
    with pytest.raises(RemoteReadError, match=r"s3://photos/images/"):
        S3Bucket("http://127.0.0.1:9", BUCKET, **CREDENTIALS, retries=0, timeout_s=2).scan("images/", [".png"])


def test_credentials_are_not_shown():
    client = S3Bucket("http://127.0.0.1:9", BUCKET, "AKIDSHOWN", "SECRETSHOWN")
    assert "SHOWN" not in repr(client)
