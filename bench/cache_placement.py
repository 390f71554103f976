"""Where the latent cache of an S3 dataset lives on a multi-machine run: a local `cache_dir_vae` that every machine
builds for itself, or the built store kept in the bucket, copied down whole or read in place with ranged GETs (not
a test; issue 19, item 2: SimpleTuner keeps an S3 dataset's VAE cache in the bucket, and every machine must reach
the shards).

    .venv/bin/python bench/cache_placement.py [--images 1000] [--latency-ms 20] [--batches 200] [--batch-size 4]

`--images 100` is a smoke run.

- Data: `--images` photo-like JPEGs of six sizes with caption objects (bench/first_step.py's `objects`), in a bucket
  of moto's S3 server in a process of its own (bench/sources.py's), filled with no latency; then `--latency-ms` is
  added to every request for everything measured. moto costs ~3 ms of CPU per request under its GIL, and serves a
  ranged GET by slicing the whole object it holds, so the bucket rows are, if anything, pessimistic.
- Run folders: first_step.py's (tiny SDXL, LCM-LoRA, 256 px pixel_area, crop), `cache_dir_vae` "cache/vae" and the
  text_embeds dataset's `cache_dir` in the run folder: the stores are `<run>/cache/vae/lcm` and `<run>/cache/text/lcm`.
  One machine plays two: run folder "a" builds, run folder "b" (the same config) is the second machine.

Rows:
1. Each machine builds its own local store: a cold `cache build` (`build()`) of "a": list + scan + fetch + decode +
   VAE and text encode + write. What every machine pays with a per-machine `cache_dir_vae`. images/s is over the
   whole build, model loading included.
2. A built store copied through the bucket: every file of both `lcm` folders of "a" but the `.lock` files (shards,
   indexes, journals, manifest, completion record), put under `lcm-store/vae/` and `lcm-store/text/` with boto3 on
   16 threads, then got into "b"'s cache folders on 16 threads (no mtimes kept, as any plain copy). Then `build()` of
   "b" must find everything cached (encoded 0): its seconds are what the second machine pays before training, over
   the copy. If it encodes anything, the bench says so with the build's log: that is a finding. The scan memo
   (`lcm-inventory.*.memo`, next to the store, not in it) is not copied, so that build lists and header-scans the
   bucket again; the same build run once more, memo in place, shows how much of its time that is. Last, a third
   folder "c" gets the same copy plus "a"'s memo (put under `lcm-memo/`): download + build.
3. Training-time reads: `--batches` batches of `--batch-size` latents drawn at random (seeded) from one aspect
   bucket each (a training batch is one bucket; `gather` needs one shape), the latent keys of "a"'s VAE store (not
   `#time_ids`, not `#pt@` records). (a) local: `LatentCacheReader.gather` on "a"'s store; (b) in the bucket: each
   key's byte span inside its uploaded shard object (from the shard's safetensors header, parsed here: 8-byte
   little-endian length, JSON header, `data_offsets` after it), `--batch-size` concurrent ranged GETs per batch; every
   range is checked against the local tensor's bytes after it is timed. 5 untimed batches each first (connection
   pool, the reader's CRC check of a shard on first use). Per batch: median and p95 ms, and bucket / local.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sources  # noqa: F401 - first: keeps proxies off 127.0.0.1 and puts tests/ on the path
from first_step import CAPTION_WORDS, fill_bucket, objects, s3_entry, write_run
from sources import ServerProcess

BUCKET = "cache-placement"
STORE_PREFIX = "lcm-store"
MEMO_PREFIX = "lcm-memo"
COPY_THREADS = 16
WARMUP_BATCHES = 5
RESOLUTION = 256


def store_folders(run: Path) -> dict[str, Path]:
    """The run's two store folders, by the name they get in the bucket."""
    from lcm_plugin.cache_build.layout import LCM_DIR

    return {"vae": run / "cache" / "vae" / LCM_DIR, "text": run / "cache" / "text" / LCM_DIR}


def store_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_file() and not path.name.endswith(".lock"))


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def upload(client, run: Path) -> tuple[int, int]:
    """Every store file of `run` to the bucket; (files, bytes)."""
    jobs = [(path, f"{STORE_PREFIX}/{name}/{path.name}") for name, folder in store_folders(run).items()
            for path in store_files(folder)]

    def put(job: tuple[Path, str]) -> int:
        body = job[0].read_bytes()
        client.put_object(Bucket=BUCKET, Key=job[1], Body=body)
        return len(body)

    with ThreadPoolExecutor(COPY_THREADS) as pool:
        return len(jobs), sum(pool.map(put, jobs))


def download(client, run: Path) -> tuple[int, int]:
    """Every object under the store prefix into `run`'s store folders; (files, bytes)."""
    folders = store_folders(run)
    keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                                      Prefix=f"{STORE_PREFIX}/")
            for item in page.get("Contents", [])]
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)

    def get(key: str) -> int:
        _, name, file = key.split("/", 2)
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        (folders[name] / file).write_bytes(body)
        return len(body)

    with ThreadPoolExecutor(COPY_THREADS) as pool:
        return len(keys), sum(pool.map(get, keys))


def shard_spans(folder: Path) -> dict[str, tuple[str, int, int]]:
    """key -> (shard file name, first byte, last byte) of every tensor of the shards in `folder`, from their
    safetensors headers."""
    spans = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with shard.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        base = 8 + length
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                spans[name] = (shard.name, base + start, base + end - 1)
    return spans


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def training_reads(client, folder: Path, batches: int, batch_size: int) -> dict[str, list[float]]:
    """Seconds per batch of the local gather and of the ranged GETs (see the module docstring, row 3)."""
    from lcm_plugin.cache import LatentCacheReader
    from lcm_plugin.cache_build.layout import PT_RECORD, TIME_IDS

    reader = LatentCacheReader(folder)
    latents = [key for key in reader.keys() if TIME_IDS not in key and PT_RECORD not in key]
    by_shape: dict[tuple, list[str]] = {}
    for key in latents:
        by_shape.setdefault(tuple(reader.get(key).shape), []).append(key)
    groups = [sorted(keys) for _, keys in sorted(by_shape.items()) if len(keys) >= batch_size]
    if not groups:
        raise SystemExit(f"no aspect bucket holds {batch_size} latents; use more --images")
    rng = random.Random(0)
    weights = [len(group) for group in groups]
    drawn = [rng.sample(rng.choices(groups, weights)[0], batch_size) for _ in range(WARMUP_BATCHES + batches)]
    spans = shard_spans(folder)
    shapes = ", ".join(f"{list(shape)}: {len(keys)}" for shape, keys in sorted(by_shape.items()))
    print(f"  {len(latents)} latents in {len(by_shape)} shapes ({shapes}), {len({spans[key][0] for key in latents})} "
          f"shard(s), {len(reader.get(latents[0]).tobytes())} bytes each (first)", flush=True)

    times: dict[str, list[float]] = {"local": [], "bucket": []}
    for index, keys in enumerate(drawn):
        start = time.perf_counter()
        reader.gather(keys)
        if index >= WARMUP_BATCHES:
            times["local"].append(time.perf_counter() - start)

    def ranged(key: str) -> bytes:
        shard, first, last = spans[key]
        answer = client.get_object(Bucket=BUCKET, Key=f"{STORE_PREFIX}/vae/{shard}", Range=f"bytes={first}-{last}")
        return answer["Body"].read()

    with ThreadPoolExecutor(batch_size) as pool:
        for index, keys in enumerate(drawn):
            start = time.perf_counter()
            bodies = list(pool.map(ranged, keys))
            if index >= WARMUP_BATCHES:
                times["bucket"].append(time.perf_counter() - start)
            for key, body in zip(keys, bodies):
                if body != reader.get(key).tobytes():
                    raise SystemExit(f"the ranged GET of {key} ({spans[key]}) is not the local tensor's bytes")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    from lcm_plugin.cache_build import BuildOptions, build
    from lcm_plugin.tiny_sdxl import save_tiny_sdxl
    from s3_server import make_client

    started = time.perf_counter()
    data = objects(args.images)
    server = ServerProcess("moto")
    rows: list[tuple[str, str, str]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="cache-placement-") as tmp:
            model = save_tiny_sdxl(Path(tmp) / "model", seed=0, vocabulary=CAPTION_WORDS)
            server.set_latency(0)
            fill_bucket(server.endpoint, BUCKET, data)
            server.set_latency(args.latency_ms)
            client = make_client(server.endpoint, max_pool_connections=COPY_THREADS, read_timeout=120)
            entry = s3_entry(server.endpoint, BUCKET)
            first = write_run(Path(tmp) / "a", model, entry, RESOLUTION)
            second = write_run(Path(tmp) / "b", model, entry, RESOLUTION)

            # 1. each machine builds its own local store
            print("row 1: cold build of run folder a", flush=True)
            report = build(BuildOptions(first), log=lambda line: print(f"  [a] {line}", flush=True))
            folders = store_folders(first)
            missing = [str(folder) for folder in folders.values() if not folder.is_dir()]
            if missing:
                raise SystemExit(f"the build wrote no store at {', '.join(missing)}")
            sizes = {name: folder_bytes(folder) for name, folder in folders.items()}
            total = sum(sizes.values())
            print(f"  encoded {report.encoded}, reused {report.reused}, failed {len(report.failed)}, "
                  f"{report.seconds:.1f} s (encode {report.encode_seconds:.1f} s)", flush=True)
            rows.append(("1. each machine builds its own local store", "cold build",
                         f"{report.seconds:.1f} s, {report.encoded / report.seconds:.1f} images/s "
                         f"({report.encoded} encoded); store {total / 1e6:.1f} MB (VAE {sizes['vae'] / 1e6:.1f}, "
                         f"text {sizes['text'] / 1e6:.1f})"))

            # 2. the built store copied through the bucket
            print("row 2: store copied through the bucket to run folder b", flush=True)
            start = time.perf_counter()
            files, sent = upload(client, first)
            up = time.perf_counter() - start
            start = time.perf_counter()
            got_files, got = download(client, second)
            down = time.perf_counter() - start
            rows.append(("2. a built store copied through the bucket",
                         f"upload ({files} files, {COPY_THREADS} threads)",
                         f"{up:.2f} s, {sent / 1e6 / up:.1f} MB/s ({sent / 1e6:.1f} MB)"))
            rows.append(("", f"download ({got_files} files, {COPY_THREADS} threads)",
                         f"{down:.2f} s, {got / 1e6 / down:.1f} MB/s ({got / 1e6:.1f} MB)"))
            logged: list[str] = []

            def log_second(line: str) -> None:
                logged.append(line)
                print(f"  [b] {line}", flush=True)

            rebuild = build(BuildOptions(second), log=log_second)
            print(f"  encoded {rebuild.encoded}, reused {rebuild.reused}, captions encoded {rebuild.captions}, "
                  f"failed {len(rebuild.failed)}, {rebuild.seconds:.1f} s", flush=True)
            if rebuild.encoded or rebuild.captions:
                print(f"\nFINDING: the build of the second folder, over a copied complete store, encoded "
                      f"{rebuild.encoded} image(s) and {rebuild.captions} caption(s) (expected 0). What it logged:",
                      flush=True)
                for line in logged or ["(nothing)"]:
                    print(f"    {line}")
                print(flush=True)
            rows.append(("", "build of the second folder over the copy",
                         f"{rebuild.seconds:.1f} s, encoded {rebuild.encoded} (expected 0), reused {rebuild.reused}, "
                         f"captions encoded {rebuild.captions}"))
            rows.append(("", "second machine in all (download + build)", f"{down + rebuild.seconds:.1f} s"))
            again = build(BuildOptions(second), log=log_second)
            rows.append(("", "the same build again (its scan memo now there)",
                         f"{again.seconds:.1f} s, encoded {again.encoded}: the rest of the line above is the "
                         "listing and scan of the bucket"))
            # the same copy plus the scan memo of "a", into a third folder
            memos = sorted((first / "cache" / "vae").glob("lcm-inventory.*.memo"))
            for memo in memos:
                client.put_object(Bucket=BUCKET, Key=f"{MEMO_PREFIX}/{memo.name}", Body=memo.read_bytes())
            third = write_run(Path(tmp) / "c", model, entry, RESOLUTION)
            start = time.perf_counter()
            download(client, third)
            for memo in memos:
                body = client.get_object(Bucket=BUCKET, Key=f"{MEMO_PREFIX}/{memo.name}")["Body"].read()
                (third / "cache" / "vae" / memo.name).write_bytes(body)
            down_memo = time.perf_counter() - start
            with_memo = build(BuildOptions(third), log=lambda line: print(f"  [c] {line}", flush=True))
            rows.append(("", f"store + scan memo ({len(memos)} file(s)) copied: download + build",
                         f"{down_memo:.2f} s + {with_memo.seconds:.1f} s, encoded {with_memo.encoded}"))

            # 3. training-time reads
            print(f"row 3: {args.batches} batches of {args.batch_size} latents, local and ranged GETs", flush=True)
            times = training_reads(client, folders["vae"], args.batches, args.batch_size)
            summary = {name: (statistics.median(values) * 1e3, percentile(values, 0.95) * 1e3)
                       for name, values in times.items()}
            (local_median, local_p95), (bucket_median, bucket_p95) = summary["local"], summary["bucket"]
            rows.append(("3. training-time reads, per batch", "local: LatentCacheReader.gather",
                         f"median {local_median:.3f} ms, p95 {local_p95:.3f} ms"))
            rows.append(("", f"bucket: {args.batch_size} concurrent ranged GETs",
                         f"median {bucket_median:.1f} ms, p95 {bucket_p95:.1f} ms"))
            rows.append(("", "bucket / local", f"median {bucket_median / local_median:.0f}x, "
                                               f"p95 {bucket_p95 / local_p95:.0f}x"))
    finally:
        server.stop()

    print(f"\n{args.images} JPEGs in a moto bucket, {args.latency_ms:g} ms added per request; tiny SDXL on the CPU, "
          f"{RESOLUTION} px; load {os.getloadavg()[0]:.1f}; {time.perf_counter() - started:.0f} s in all\n")
    print("| row | measure | result |")
    print("| --- | --- | --- |")
    for row in rows:
        print(f"| {' | '.join(row)} |")


if __name__ == "__main__":
    main()
