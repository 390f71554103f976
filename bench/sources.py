"""Images/s of fetch + decode from an S3 bucket: our path against SimpleTuner 4.10.1's own S3 backend, on the same
objects of the same server, with 20 ms (and 0 ms) added to every request (not a test; issue 19, item 6, S3 kind).

    .venv/bin/python bench/sources.py [--images 10000] [--latencies-ms 0,20] [--servers moto,fast]
        [--vae-batch 32] [--concurrency 32] [--threads CORES]

`--images 300` is a smoke run.

Data: `--images` photo-like JPEGs (quality 90; gradients, a sine shading, sensor noise and a few hard-edged shapes;
six sizes from 320x512 to 512x384, every file's bytes different), generated in memory, nothing kept on disk.

Servers, each in a process of its own (in this one, a Python server would share the GIL with boto3's threads), each
adding the latency itself before answering a request (no proxy hop to saturate); the benchmark sets it over HTTP
between phases:
- `moto`: moto's werkzeug S3 app (threaded, HTTP/1.1 keep-alive); the images are uploaded to it with concurrent
  boto3 puts. It costs ~3 ms of CPU per GET under its GIL, so it caps every client at a few hundred GETs/s: its
  ratios are lower bounds (the "raw server" rows and the server CPU column show it).
- `fast`: a minimal read-only S3 GetObject server (asyncio on uvloop, keep-alive; ETag, Last-Modified, ranges, a
  NoSuchKey error) serving the same bytes, handed to it over a pipe; ~0.1 ms of CPU per GET, so the clients and the
  decoders, not the server, set the pace: the figures for the issue's target.

Paths, each over every image, grouped by bucket (target size) as both caches do, the same keys in the same order:
- SimpleTuner: `S3DataBackend` built as its factory's `get_aws_backend` builds it; `read_image_batch` on chunks of
  `read_batch_size` (its default, 25) keys, one after the other, as its VAECache's `read_images_in_batch` does (it
  waits on each future before queueing more): a fresh default `ThreadPoolExecutor` of boto3 GETs
  (min(32, cores + 4) threads), then SimpleTuner's `load_image` per image. No resize or crop: less work than its
  cache really does, so the ratio is conservative.
- ours, fetch then decode: per VAE batch of `--vae-batch` images, `S3Bucket.get_all` (Rust object_store,
  `--concurrency` requests in flight), then `decode_batch_bytes` (decode, resize and crop to the bucket, rayon), one
  batch after the other: what `cache build` did before its fetch window.
- ours, the build's fetch window: the same, with the next batches' objects requested while a batch decodes, up to
  `FETCH_AHEAD_OBJECTS` (64) in flight, as cache_build/fill.py fetches for the build.
- raw server (diagnostic): our client's GETs only, no decode, `--concurrency` in flight throughout.
Each phase also reports the CPU the server process and this process used (cores busy): a Python server near 1.0 is
GIL-bound, and then it, not the client, is the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import os
import shlex
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# A proxy from the environment must not hijack requests to 127.0.0.1 (boto3 and object_store both honour these).
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

BUCKET = "bench-sources"
PREFIX = "images/"
ACCESS_KEY = SECRET_KEY = "test"  # neither server checks signatures
REGION = "us-east-1"
LATENCY_PATH = "/__bench__/latency"  # the servers' control path; S3 bucket names cannot contain "_", so no clash
# Six sizes around 256-512 px, three buckets at `pixel_area` 256 (1.67, 0.6 and 1.0).
SIZES = [(512, 384), (384, 512), (448, 448), (512, 320), (320, 512), (480, 360)]
BUCKET_CONFIG = {"resolution": 256, "resolution_type": "pixel_area", "crop": True, "crop_aspect": "preserve",
                 "crop_style": "center"}
SIMPLETUNER_READ_BATCH = 25  # SimpleTuner's `read_batch_size` default (its field registry; VAECache)
WARMUP_IMAGES = 64  # per path and server, untimed: connection pools, lazy imports, first thread pools
TARGET_RATIO = 5.0  # ours / SimpleTuner at 20 ms, from the issue
TARGET_LATENCY_MS = 20.0
SERVERS = ("moto", "fast")

RAW = "raw server: our GETs only, no decode"
THEIRS = "SimpleTuner read_image_batch"
OURS = "ours, fetch then decode"
AHEAD = "ours, the build's fetch window"


# ---------------------------------------------------------------- the server processes


def serve_moto() -> None:
    """moto's S3 app on a free port of 127.0.0.1, threaded (a thread per connection, HTTP/1.1 keep-alive)."""
    import logging

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # otherwise one log line per request

    class AddedLatency:
        """Sleeps before each request, like a round trip to a distant region; set over HTTP."""

        def __init__(self, app) -> None:
            self.app = app
            self.seconds = 0.0

        def __call__(self, environ, start_response):
            if environ.get("PATH_INFO") == LATENCY_PATH:
                self.seconds = float(parse_qs(environ.get("QUERY_STRING", ""))["seconds"][0])
                start_response("204 No Content", [("Content-Length", "0")])
                return [b""]
            if self.seconds > 0:
                time.sleep(self.seconds)  # releases the GIL: other connections' requests go on meanwhile
            return self.app(environ, start_response)

    server = make_server("127.0.0.1", 0, AddedLatency(DomainDispatcherApplication(create_backend_app)), threaded=True,
                         request_handler=MotoRequestHandler)
    exit_when_orphaned()
    print(server.server_address[1], flush=True)
    server.serve_forever()


def serve_fast() -> None:
    """A read-only S3 GetObject server for the objects read from stdin, on a free port of 127.0.0.1."""
    import uvloop

    objects = read_objects(sys.stdin.buffer)
    last_modified = formatdate(time.time(), usegmt=True)
    etags = {key: '"' + hashlib.md5(body).hexdigest() + '"' for key, body in objects.items()}
    latency = [0.0]
    requests = [0]

    def answer(writer, status: str, headers: list[tuple[str, str]], body: bytes | memoryview = b"",
               send_body: bool = True) -> None:
        requests[0] += 1
        head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", f"x-amz-request-id: {requests[0]:016X}",
                *(f"{name}: {value}" for name, value in headers)]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if send_body and body:
            writer.write(body)

    def no_such_key(writer, key: str, send_body: bool) -> None:
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code><Message>The specified key '
               f"does not exist.</Message><Key>{key}</Key></Error>").encode()
        answer(writer, "404 Not Found", [("Content-Type", "application/xml")], xml, send_body)

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, target, _version = request_line.split(" ", 2)
                headers = {}
                for line in header_lines:
                    if line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                if int(headers.get("content-length") or 0):
                    await reader.readexactly(int(headers["content-length"]))
                split = urlsplit(target)
                if split.path == LATENCY_PATH:
                    latency[0] = float(parse_qs(split.query)["seconds"][0])
                    answer(writer, "204 No Content", [])
                elif method not in ("GET", "HEAD"):
                    answer(writer, "501 Not Implemented", [])
                else:
                    if latency[0] > 0:
                        await asyncio.sleep(latency[0])
                    bucket, _, key = unquote(split.path).lstrip("/").partition("/")
                    body = objects.get(key) if bucket == BUCKET else None
                    send_body = method == "GET"
                    if body is None:
                        no_such_key(writer, key, send_body)
                    else:
                        meta = [("ETag", etags[key]), ("Last-Modified", last_modified), ("Accept-Ranges", "bytes"),
                                ("Content-Type", "image/jpeg")]
                        wanted = headers.get("range", "")
                        if wanted.startswith("bytes="):  # object_store resumes a cut-off body with one
                            first, _, last = wanted[len("bytes="):].partition("-")
                            start, end = int(first), min(int(last) if last else len(body) - 1, len(body) - 1)
                            meta.append(("Content-Range", f"bytes {start}-{end}/{len(body)}"))
                            answer(writer, "206 Partial Content", meta, memoryview(body)[start : end + 1], send_body)
                        else:
                            answer(writer, "200 OK", meta, body, send_body)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client hung up
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(connection, "127.0.0.1", 0, backlog=1024)
        exit_when_orphaned()
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    uvloop.run(main())


def exit_when_orphaned() -> None:
    """Exit when stdin reaches EOF: the benchmark closed it, or exited or died, whatever the way."""

    def watch() -> None:
        while sys.stdin.buffer.read(65536):
            pass
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def write_objects(stream, objects: dict[str, bytes]) -> None:
    stream.write(struct.pack("<Q", len(objects)))
    for key, body in objects.items():
        name = key.encode()
        stream.write(struct.pack("<IQ", len(name), len(body)))
        stream.write(name)
        stream.write(body)
    stream.flush()


def read_objects(stream) -> dict[str, bytes]:
    def exactly(size: int) -> bytes:
        data = stream.read(size)
        if len(data) != size:
            raise EOFError("the object list was cut short")
        return data

    (count,) = struct.unpack("<Q", exactly(8))
    objects = {}
    for _ in range(count):
        name_length, body_length = struct.unpack("<IQ", exactly(12))
        key = exactly(name_length).decode()  # read before the body: `d[k()] = v()` calls v first
        objects[key] = exactly(body_length)
    return objects


class ServerProcess:
    """A server in a child process, in its own session (a Ctrl-C here does not reach it; `stop` does)."""

    def __init__(self, kind: str, objects: dict[str, bytes] | None = None) -> None:
        self.kind = kind
        self.process = subprocess.Popen([sys.executable, __file__, "--serve", kind], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, start_new_session=True)
        try:
            if objects is not None:
                write_objects(self.process.stdin, objects)
            self.endpoint = f"http://127.0.0.1:{self._read_port(timeout=120)}"
        except BaseException:
            self.stop()
            raise

    def _read_port(self, timeout: float) -> int:
        found: list[bytes] = []
        reader = threading.Thread(target=lambda: found.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not found or not found[0].strip().isdigit():
            raise RuntimeError(f"the {self.kind} server process did not start (exit code {self.process.poll()})")
        return int(found[0])

    def set_latency(self, milliseconds: float) -> None:
        request = urllib.request.Request(f"{self.endpoint}{LATENCY_PATH}?seconds={milliseconds / 1000}", method="POST")
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as response:
            assert response.status == 204, response.status

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process, all its threads."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()  # its watchdog exits on EOF
                self.process.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


# ---------------------------------------------------------------- data


@dataclass
class Dataset:
    objects: dict[str, bytes]
    sizes: dict[str, tuple[int, int]]  # key -> (width, height) as generated
    geometry: dict[str, dict]  # key -> Bucketer sample (resize_size, crop_coordinates, target_size)
    keys: list[str] = field(init=False)  # each bucket's keys together, as both caches visit them

    def __post_init__(self) -> None:
        self.keys = sorted(self.objects, key=lambda k: (tuple(self.geometry[k]["target_size"]), k))

    def by_bucket(self) -> dict[tuple[int, int], list[str]]:
        groups: dict[tuple[int, int], list[str]] = defaultdict(list)
        for key in self.keys:
            groups[tuple(self.geometry[key]["target_size"])].append(key)
        return groups


class PhotoMaker:
    """Cheap photo-like JPEGs: the costly noise is drawn once and sliced at a random offset per image."""

    def __init__(self, seed: int = 0) -> None:
        import numpy as np

        self.rng = np.random.default_rng(seed)
        side = max(max(size) for size in SIZES) + 64
        self.noise = self.rng.normal(0, 6, (side, side, 3)).astype(np.float32)

    def jpeg(self, width: int, height: int) -> bytes:
        import numpy as np
        from PIL import Image, ImageDraw

        rng = self.rng
        x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
        y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
        base = rng.uniform(40, 200, 3).astype(np.float32)
        slope_x, slope_y = rng.uniform(-70, 70, (2, 3)).astype(np.float32)
        shading = 25 * np.sin(rng.uniform(3, 14) * x + rng.uniform(0, 6)) * np.cos(rng.uniform(2, 9) * y)
        dy, dx = rng.integers(0, 64, 2)
        rgb = base + slope_x * x + slope_y * y + shading + self.noise[dy : dy + height, dx : dx + width]
        image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 6))):
            x0, x1 = sorted(rng.integers(0, width, 2))
            y0, y1 = sorted(rng.integers(0, height, 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1 + 8, y1 + 8), fill=colour)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=90)
        return out.getvalue()


def generate(count: int) -> Dataset:
    from lcm_plugin.cache import Bucketer
    from tqdm import tqdm

    maker = PhotoMaker()
    bucketer = Bucketer(BUCKET_CONFIG)
    geometry_of_size = {size: bucketer.assign([size])[0] for size in SIZES}
    objects, sizes = {}, {}
    for index in tqdm(range(count), unit="img", desc="generate"):
        size = SIZES[index % len(SIZES)]
        key = f"{PREFIX}{index // 1000:03d}/{index:06d}.jpg"
        objects[key], sizes[key] = maker.jpeg(*size), size
    return Dataset(objects, sizes, {key: geometry_of_size[size] for key, size in sizes.items()})


def upload(endpoint: str, dataset: Dataset) -> None:
    """Concurrent boto3 puts (moto only: the fast server is handed the bytes)."""
    from s3_server import make_client
    from tqdm import tqdm

    client = make_client(endpoint, max_pool_connections=16, read_timeout=60)
    client.create_bucket(Bucket=BUCKET)
    with ThreadPoolExecutor(8) as pool, tqdm(total=len(dataset.keys), unit="img", desc="upload to moto") as bar:
        def put(item: tuple[str, bytes]) -> None:
            client.put_object(Bucket=BUCKET, Key=item[0], Body=item[1])
            bar.update(1)

        list(pool.map(put, dataset.objects.items()))


# ---------------------------------------------------------------- the paths


def chunks(keys: list[str], size: int) -> list[list[str]]:
    return [keys[start : start + size] for start in range(0, len(keys), size)]


def batches(dataset: Dataset, size: int, keys: list[str] | None = None) -> list[list[str]]:
    """Per bucket, `size` keys at a time (a VAE batch: one target size)."""
    wanted = None if keys is None else set(keys)
    return [chunk for group in dataset.by_bucket().values()
            for chunk in chunks([k for k in group if wanted is None or k in wanted], size) if chunk]


@dataclass
class Outcome:
    images: int = 0
    failed: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (width, height) as decoded


def simpletuner_path(backend, dataset: Dataset, keys: list[str] | None = None) -> Outcome:
    outcome = Outcome()
    for chunk in batches(dataset, SIMPLETUNER_READ_BATCH, keys):
        available, images = backend.read_image_batch(chunk)
        for key, image in zip(available, images):
            outcome.shapes[key] = image.size
        outcome.failed += sorted(set(chunk) - set(available))
    outcome.images = len(outcome.shapes)
    return outcome


def decode(dataset: Dataset, chunk: list[str], blobs: list, threads: int | None, outcome: Outcome,
           oriented: bool = False) -> None:
    """As fill.py `_decode` after its fetch: the fetched blobs of one VAE batch to its bucket's pixels (`oriented`:
    after their EXIF orientation, as SimpleTuner reads the kind; never for S3 objects)."""
    from lcm_plugin.cache import decode_batch_bytes

    fetched = [i for i, blob in enumerate(blobs) if blob is not None]
    outcome.failed += [chunk[i] for i, blob in enumerate(blobs) if blob is None]
    samples = [dataset.geometry[chunk[i]] for i in fetched]
    pixels, ok, errors = decode_batch_bytes(
        [blobs[i] for i in fetched], [s["resize_size"] for s in samples], [s["crop_coordinates"] for s in samples],
        samples[0]["target_size"], names=[chunk[i] for i in fetched], threads=threads, oriented=oriented,
    )
    outcome.failed += [chunk[fetched[i]] for i, _ in errors]
    height, width = pixels.shape[1:3]  # (images, height, width, RGB)
    for i in ok:
        outcome.shapes[chunk[fetched[i]]] = (int(width), int(height))
    outcome.images += len(ok)


def our_path(bucket, dataset: Dataset, args, keys: list[str] | None = None) -> Outcome:
    """Per VAE batch, fetch all, then decode all (cache build before its fetch window)."""
    outcome = Outcome()
    for chunk in batches(dataset, args.vae_batch, keys):
        blobs, _failures = bucket.get_all(chunk, args.concurrency)
        decode(dataset, chunk, blobs, args.threads, outcome)
    return outcome


def our_path_fetch_ahead(bucket, dataset: Dataset, args) -> Outcome:
    """As `cache build` fetches (cache_build/fill.py): the next batches' objects requested while a batch decodes, up
    to FETCH_AHEAD_OBJECTS of them in flight, one get_all per batch (it releases the GIL)."""
    from lcm_plugin.cache_build.fill import FETCH_AHEAD_OBJECTS, FetchWindow

    outcome = Outcome()
    work = batches(dataset, args.vae_batch)
    with ThreadPoolExecutor(FETCH_AHEAD_OBJECTS, thread_name_prefix="fetch-ahead") as fetcher:
        window = FetchWindow([len(chunk) for chunk in work],
                             lambda i: fetcher.submit(bucket.get_all, work[i], args.concurrency))
        for index, chunk in enumerate(work):
            blobs, _failures = window.take(index).result()
            decode(dataset, chunk, blobs, args.threads, outcome)
    return outcome


def raw_fetch(bucket, dataset: Dataset, args) -> Outcome:
    """GETs only, `concurrency` in flight throughout (large get_all calls): what the server serves this client."""
    outcome = Outcome()
    for chunk in chunks(dataset.keys, 1024):
        blobs, _failures = bucket.get_all(chunk, args.concurrency)
        for key, blob in zip(chunk, blobs):
            if blob != dataset.objects[key]:
                outcome.failed.append(key)
        outcome.images += len(chunk)
    return outcome


# ---------------------------------------------------------------- measuring


@dataclass
class Measure:
    server: str
    latency_ms: float
    path: str
    images: int
    seconds: float
    bench_cpu: float  # this process, all threads (boto3's, tokio's, rayon's)
    server_cpu: float
    outcome: Outcome

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def measure(server: ServerProcess, latency_ms: float, path: str, run) -> Measure:
    server_before, cpu_before, start = server.cpu_seconds(), time.process_time(), time.perf_counter()
    outcome = run()
    seconds = time.perf_counter() - start
    result = Measure(server.kind, latency_ms, path, outcome.images, seconds, time.process_time() - cpu_before,
                     server.cpu_seconds() - server_before, outcome)
    print(f"  {path:<38} {result.images:>6} images {seconds:7.2f} s {result.rate:7.0f} images/s   CPU: server "
          f"{result.server_cpu / seconds:4.2f} cores, bench {result.bench_cpu / seconds:4.2f} cores", flush=True)
    if outcome.failed:
        raise RuntimeError(f"{path}: {len(outcome.failed)} image(s) failed, e.g. {outcome.failed[:3]}")
    return result


def check_same_images(dataset: Dataset, theirs: Outcome, ours: Outcome) -> None:
    """Both paths decoded every image: SimpleTuner's at its stored size, ours at its bucket's target size."""
    assert theirs.images == ours.images == len(dataset.keys), (theirs.images, ours.images, len(dataset.keys))
    assert set(theirs.shapes) == set(ours.shapes) == set(dataset.keys), "the paths decoded different keys"
    wrong = [k for k in dataset.keys if theirs.shapes[k] != dataset.sizes[k]
             or ours.shapes[k] != tuple(dataset.geometry[k]["target_size"])]
    assert not wrong, f"unexpected decoded sizes, e.g. {wrong[:3]}"


def run_server(kind: str, dataset: Dataset, args, latencies: list[float]) -> list[Measure]:
    from lcm_plugin.cache import S3Bucket
    from simpletuner.helpers.data_backend.factory import get_aws_backend

    server = ServerProcess(kind, dataset.objects if kind == "fast" else None)
    try:
        print(f"\n{kind} server (own process, pid {server.process.pid}) at {server.endpoint}")
        if kind == "moto":
            upload(server.endpoint, dataset)
        # As SimpleTuner's factory builds it for a `type: aws` dataset (the accelerator is unused by reads).
        theirs = get_aws_backend(aws_bucket_name=BUCKET, aws_region_name=REGION, aws_endpoint_url=server.endpoint,
                                 aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, accelerator=None,
                                 identifier="bench")
        ours = S3Bucket(server.endpoint, BUCKET, ACCESS_KEY, SECRET_KEY, region=REGION)
        warmup = dataset.keys[:: max(1, len(dataset.keys) // WARMUP_IMAGES)][:WARMUP_IMAGES]
        simpletuner_path(theirs, dataset, warmup)
        our_path(ours, dataset, args, warmup)

        results = []
        for latency in latencies:
            server.set_latency(latency)
            print(f"{kind}, added latency {latency:g} ms:")
            results.append(measure(server, latency, RAW, lambda: raw_fetch(ours, dataset, args)))
            theirs_run = measure(server, latency, THEIRS, lambda: simpletuner_path(theirs, dataset))
            ours_run = measure(server, latency, OURS, lambda: our_path(ours, dataset, args))
            ahead_run = measure(server, latency, AHEAD, lambda: our_path_fetch_ahead(ours, dataset, args))
            for run in (ours_run, ahead_run):
                check_same_images(dataset, theirs_run.outcome, run.outcome)
            results += [theirs_run, ours_run, ahead_run]
        return results
    finally:
        server.stop()


def report(args, dataset: Dataset, results: list[Measure], wall: float) -> None:
    by = {(m.server, m.latency_ms, m.path): m for m in results}
    runs = sorted({(m.server, m.latency_ms) for m in results}, key=lambda r: (SERVERS.index(r[0]), r[1]))
    default_workers = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor()'s default, as read_batch uses it
    print(f"\n## S3 fetch + decode, {len(dataset.keys)} images\n")
    print(f"SimpleTuner: read_image_batch of {SIMPLETUNER_READ_BATCH} keys ({default_workers} GET threads here: "
          "min(32, cores + 4), more on a bigger machine), "
          f"decode only (no resize/crop: less work, so the ratio is conservative). Ours: VAE batch {args.vae_batch}, "
          f"{args.concurrency} GETs in flight, decode + resize + crop. Same keys, same order, both decoded all of "
          "them (checked, and their sizes).\n")
    print("| kind | images | added latency | SimpleTuner images/s | ours images/s | ours ÷ SimpleTuner |")
    print("|---|---|---|---|---|---|")
    for server, latency in runs:
        theirs = by[(server, latency, THEIRS)]
        for path, how in ((OURS, ""), (AHEAD, ", fetch window")):
            ours = by[(server, latency, path)]
            print(f"| S3 ({server} server{how}) | {ours.images} | {latency:g} ms | {theirs.rate:.0f} | "
                  f"{ours.rate:.0f} | {ours.rate / theirs.rate:.1f}× |")

    print("\n| server | added latency | phase | images/s | server CPU (cores) | bench CPU (cores) |")
    print("|---|---|---|---|---|---|")
    for m in results:
        print(f"| {m.server} | {m.latency_ms:g} ms | {m.path} | {m.rate:.0f} | {m.server_cpu / m.seconds:.2f} | "
              f"{m.bench_cpu / m.seconds:.2f} |")

    print()
    for server, latency in runs:
        raw, ahead = by[(server, latency, RAW)], by[(server, latency, AHEAD)]
        busy = raw.server_cpu / raw.seconds
        verdict = ("near one core (a Python server's GIL): the server is the limit, so its ratios are lower bounds"
                   if busy > 0.85 else "the server has headroom")
        print(f"- {server}, {latency:g} ms: raw server throughput {raw.rate:.0f} GETs/s to our client, "
              f"{raw.server_cpu / raw.images * 1e3:.2f} ms of server CPU per GET, {busy:.2f} cores busy: {verdict}; "
              f"ours with decode (fetch window) reaches {ahead.rate / raw.rate:.0%} of it.")
    if ("fast", TARGET_LATENCY_MS) in runs:
        theirs = by[("fast", TARGET_LATENCY_MS, THEIRS)]
        verdicts = []
        for path in (OURS, AHEAD):
            ratio = by[("fast", TARGET_LATENCY_MS, path)].rate / theirs.rate
            verdicts.append(f"{path}: {ratio:.1f}×, {'met' if ratio >= TARGET_RATIO else 'NOT met'}")
        print(f"- target: >= {TARGET_RATIO:g}× SimpleTuner's images/s on S3 at {TARGET_LATENCY_MS:g} ms (fast server): "
              f"{'; '.join(verdicts)}.")
    print(f"- client, server and decoders share {os.cpu_count()} cores; load average at the end: "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}; wall time of the whole run: {wall:.0f} s.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="images per kind (300: a smoke run)")
    parser.add_argument("--kinds", default="s3,webshart,huggingface",
                        help="any of s3, webshart, huggingface (the last two: bench/packed_sources.py)")
    parser.add_argument("--latencies-ms", default=f"0,{TARGET_LATENCY_MS:g}", help="added per-request latencies")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"any of {', '.join(SERVERS)}")
    parser.add_argument("--vae-batch", type=int, default=32, help="our images per fetch + decode (a VAE batch)")
    parser.add_argument("--concurrency", type=int, default=32, help="our requests in flight (S3Bucket.get_all)")
    parser.add_argument("--threads", type=int, default=None, help="our decode threads (default: rayon's, all cores)")
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)  # a server process's entry
    args = parser.parse_args()
    if args.serve:
        {"moto": serve_moto, "fast": serve_fast}[args.serve]()
        return
    import packed_sources

    latencies = [float(v) for v in args.latencies_ms.split(",")]
    servers = args.servers.split(",")
    if unknown := set(servers) - set(SERVERS):
        parser.error(f"unknown server(s) {sorted(unknown)}")
    kinds = args.kinds.split(",")
    if unknown := set(kinds) - {"s3", *packed_sources.KINDS}:
        parser.error(f"unknown kind(s) {sorted(unknown)}")

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"cpu count: {os.cpu_count()}; load average at the start: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    started = time.perf_counter()
    dataset = generate(args.images)
    total = sum(map(len, dataset.objects.values()))
    print(f"{len(dataset.keys)} JPEGs, {total / 1e6:.0f} MB ({total / len(dataset.keys) / 1e3:.0f} kB each); "
          f"buckets: {', '.join(f'{w}x{h}: {len(k)}' for (w, h), k in dataset.by_bucket().items())}")
    packed = [packed_sources.run_kind(kind, dataset, args) for kind in kinds if kind in packed_sources.KINDS]
    if "s3" in kinds:
        results = [m for server in servers for m in run_server(server, dataset, args, latencies)]
        report(args, dataset, results, time.perf_counter() - started)
    if packed:
        packed_sources.report(packed, args)


if __name__ == "__main__":
    main()
