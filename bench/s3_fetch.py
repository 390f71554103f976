"""Reading a `type: aws` dataset: SimpleTuner 4.10.1's S3 backend (boto3) against the Rust client (`S3Bucket`), in
the same run, on the same bucket of a real S3-protocol server on 127.0.0.1 (moto's, from tests/s3_server.py).

Rows:
  - listing: SimpleTuner's `S3DataBackend.list_files` (list_objects_v2, every page) against `S3Bucket.list`;
  - whole-object reads of every image: SimpleTuner's `read_batch` (a thread pool of its default size) against
    `S3Bucket.get_all` (object_store, `--concurrency` requests in flight);
  - the header scan of the dataset (listing, every image and caption read, sizes and content hashes): SimpleTuner's
    discovery reads each image whole and decodes it (`load_image`), on `aspect_bucket_worker_count` (12) threads,
    against `S3Bucket.scan`; then ours again with its memo (nothing changed: the listing only; SimpleTuner restarts
    from its bucket metadata file instead).
moto is a Python server on the same 2 cores, so these figures bound the clients' overhead from above; a real S3
endpoint's latency is what concurrency hides.

    .venv/bin/python bench/s3_fetch.py [--images 2000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

BUCKET = "bench"


def images(count: int) -> dict[str, bytes]:
    """~5 KB PNGs of noise in three sizes, and a caption object beside each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    objects = {}
    for index in range(count):
        size = [(48, 32), (32, 48), (40, 40)][index % 3]
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(out, format="PNG")
        objects[f"data/{index // 500:03d}/{index:06d}.png"] = out.getvalue()
        objects[f"data/{index // 500:03d}/{index:06d}.txt"] = f"caption {index % 97}".encode()
    return objects


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    from s3_server import S3Server

    from lcm_plugin.cache import S3Bucket
    from lcm_plugin.cache_build.plan import IMAGE_EXTENSIONS

    from simpletuner.helpers.data_backend.aws import S3DataBackend
    from simpletuner.helpers.image_manipulation.load import load_image
    from simpletuner.helpers.training import image_file_extensions

    objects = images(args.images)
    with S3Server() as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda item: client.put_object(Bucket=BUCKET, Key=item[0], Body=item[1]), objects.items()))
        theirs = S3DataBackend(id="bench", bucket_name=BUCKET, accelerator=None, endpoint_url=server.endpoint,
                               aws_access_key_id="test", aws_secret_access_key="test")
        ours = S3Bucket(server.endpoint, BUCKET, "test", "test")
        rows = []

        seconds_theirs, listing = timed(lambda: [k for _, _, keys in theirs.list_files(
            file_extensions=image_file_extensions, instance_data_dir="data/") for k in keys])
        seconds_ours, listed = timed(lambda: [key for key, _ in ours.list("data/") if key.endswith(".png")])
        assert sorted(listing) == sorted(listed), "the listings differ"
        rows.append(("listing", seconds_theirs, seconds_ours))

        seconds_theirs, blobs = timed(lambda: theirs.read_batch(listing))
        seconds_ours, (ours_blobs, errors) = timed(lambda: ours.get_all(listing, args.concurrency))
        assert not errors and ours_blobs == blobs, "the bytes differ"
        rows.append((f"whole-object reads of {len(listing)} images", seconds_theirs, seconds_ours))

        def simpletuner_discovery():
            def one(key):
                return load_image(theirs.read(key)).size, theirs.read(key[:-4] + ".txt")

            with ThreadPoolExecutor(12) as pool:  # aspect_bucket_worker_count
                return list(pool.map(one, listing))

        seconds_theirs, discovered = timed(simpletuner_discovery)
        with tempfile.TemporaryDirectory() as folder:
            memo = Path(folder) / "memo"
            seconds_ours, inventory = timed(lambda: ours.scan("data/", list(IMAGE_EXTENSIONS), ".txt",
                                                              concurrency=args.concurrency))
            assert dict(zip(inventory.keys, inventory.sizes)) == {k: d[0] for k, d in zip(listing, discovered)}
            rows.append(("header scan: sizes and captions of every image", seconds_theirs, seconds_ours))
            inventory.write_memo(memo)
            time.sleep(2.1)  # out of the memo's racy window
            inventory.write_memo(memo)
            seconds_memo, again = timed(lambda: ours.scan("data/", list(IMAGE_EXTENSIONS), ".txt", memo=memo,
                                                          concurrency=args.concurrency))
            assert again.read == 0
            # SimpleTuner restarts from its bucket metadata file instead: no figure of its own on this row.
            rows.append(("our scan again at a restart (memo, nothing changed: the listing only)", None, seconds_memo))

    print(f"\n| {args.images} images on moto (127.0.0.1) | SimpleTuner 4.10.1 (boto3) | simpletuner-lcm (Rust, "
          f"concurrency {args.concurrency}) | speed-up |")
    print("| --- | --- | --- | --- |")
    for name, theirs_s, ours_s in rows:
        if theirs_s is None:
            print(f"| {name} | — | {ours_s:.2f} s | — |")
        else:
            print(f"| {name} | {theirs_s:.2f} s | {ours_s:.2f} s | {theirs_s / ours_s:.1f}× |")


if __name__ == "__main__":
    main()
