"""Data-path benchmark (not a test): Pillow / torch.load baselines against the Rust path, in one run, on the
same bytes held in memory. Prints wall-clock and process-CPU ratios; run on an idle machine for targets.

    OMP_NUM_THREADS=1 .venv/bin/python bench/data.py
"""

from __future__ import annotations

import io
import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the global pool (gather) on one core, like the memcpy baseline

import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lcm_plugin.cache import Bucketer, LatentCacheReader, LatentCacheWriter, decode_batch_bytes, scan_sizes

REPEATS = 5


def scene(width: int, height: int, seed: int) -> Image.Image:
    """A synthetic photo: smooth shading, hard edges, mild sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack(
        [
            128 + 100 * np.sin(x / (31 + seed) + seed) * np.cos(y / 53),
            128 + 90 * np.sin((x + y) / (47 + seed)),
            np.where((x // (80 + seed) + y // 71) % 2 == 0, 60.0, 190.0) + 30 * np.sin(y / 17),
        ],
        axis=-1,
    )
    rgb += rng.normal(0, 4, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def best_of(fn) -> tuple[float, float]:
    """(wall s, process CPU s) of the fastest of REPEATS runs."""
    runs = []
    for _ in range(REPEATS):
        w, c = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - w, time.process_time() - c))
    return min(runs)


def geometry(width: int, height: int, megapixels: float):
    """SimpleTuner's area bucket for this size (crop to the preserved aspect, centred)."""
    config = {"resolution": megapixels, "resolution_type": "area", "crop": True, "crop_aspect": "preserve", "crop_style": "center"}
    s = Bucketer(config).assign([(width, height)])[0]
    return s["resize_size"], s["crop_coordinates"], s["target_size"]


def pillow_prepare(blobs, resize, crop, target):
    top, left = crop
    for data in blobs:
        image = Image.open(io.BytesIO(data)).convert("RGB").resize(resize, Image.Resampling.LANCZOS)
        image.crop((left, top, left + target[0], top + target[1])).load()


def bench_decode(label, size, megapixels, fmt, count, thread_counts):
    blobs = [encode(scene(*size, seed=i), fmt) for i in range(count)]
    resize, crop, target = geometry(*size, megapixels)
    base_wall, base_cpu = best_of(lambda: pillow_prepare(blobs, resize, crop, target))
    print(f"{label}: {count} x {size[0]}x{size[1]} {fmt} ({sum(map(len, blobs)) / count / 1e3:.0f} kB) -> resize {resize}, crop {target}")
    print(f"  pillow (1 thread)    {base_wall / count * 1e3:7.2f} ms/img wall  {base_cpu / count * 1e3:7.2f} ms/img cpu")
    for threads in thread_counts:
        run = lambda: decode_batch_bytes(blobs, [resize] * count, [crop] * count, target, threads=threads)  # noqa: E731
        wall, cpu = best_of(run)
        print(
            f"  ours ({threads} thread{'s' if threads > 1 else ' '})     {wall / count * 1e3:7.2f} ms/img wall  "
            f"{cpu / count * 1e3:7.2f} ms/img cpu   ratio wall {base_wall / wall:5.2f}x  cpu {base_cpu / cpu:5.2f}x"
        )


def bench_scan(folder: Path, count: int):
    paths = []
    for i in range(count):
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
        path = folder / f"scan{i}.{ext}"
        exif = Image.Exif()
        exif[0x0112] = 1 + i % 8
        Image.new("RGB", (64 + i % 50, 48 + i % 30), (i % 255, 0, 0)).save(path, fmt, exif=exif.tobytes())
        paths.append(str(path))
    wall, cpu = best_of(lambda: scan_sizes(paths, threads=1))

    def pillow_probe():  # SimpleTuner's DiscoveryMetadataBackend._probe_image_dimensions
        for p in paths:
            with Image.open(p) as image:
                image.size, image.getexif().get(0x0112)

    p_wall, p_cpu = best_of(pillow_probe)
    print(f"header scan: {count} files (jpeg/png/webp with EXIF), 1 thread")
    print(f"  ours   {count / wall:9.0f} files/s wall  {count / cpu:9.0f} files/s per core (cpu)")
    print(f"  pillow {count / p_wall:9.0f} files/s wall  {count / p_cpu:9.0f} files/s per core (cpu)   ratio {p_cpu / cpu:.1f}x")


def bench_latents(folder: Path, count: int, batch: int):
    rng = np.random.default_rng(0)
    latents = [torch.from_numpy(rng.standard_normal((4, 128, 128)).astype(np.float16)) for _ in range(count)]
    files = folder / "pt"
    files.mkdir()
    for i, t in enumerate(latents):
        torch.save(t.clone(), files / f"{i}.pt")
    with LatentCacheWriter(folder / "cache", shard_bytes=64 << 20) as writer:
        for i, t in enumerate(latents):
            writer.put(f"{i}", t)
    order = list(range(count))
    random.Random(0).shuffle(order)
    nbytes = latents[0].numel() * 2

    def torch_load():
        for i in order:
            torch.load(files / f"{i}.pt")

    reader = LatentCacheReader(folder / "cache")
    keys = [str(i) for i in order]
    for k in keys:  # warm: verify shards and fault the pages in once
        reader.get(k)
    torch_load()

    def views():
        for k in keys:
            reader.get_torch(k)

    def gathers():
        for s in range(0, count, batch):
            reader.gather(keys[s : s + batch])

    gather_buffer = np.empty((batch, 4, 128, 128), np.float16)

    def gathers_into():
        for s in range(0, count, batch):
            chunk = keys[s : s + batch]
            reader.gather(chunk, out=gather_buffer[: len(chunk)])

    # memcpy baselines with gather's access pattern: the same number of bytes, copied batch by batch, into one
    # reused batch buffer (like gather(out=)) or into a fresh array per batch (like gather()).
    source = np.frombuffer(rng.bytes(nbytes * count), np.uint8)
    batch_buffer = np.empty(nbytes * batch, np.uint8)

    def memcpy():
        for s in range(0, source.size, batch_buffer.size):
            chunk = source[s : s + batch_buffer.size]
            np.copyto(batch_buffer[: chunk.size], chunk)

    def memcpy_fresh():
        for s in range(0, source.size, batch_buffer.size):
            source[s : s + batch_buffer.size].copy()

    memcpy_wall, _ = best_of(memcpy)
    fresh_wall, _ = best_of(memcpy_fresh)
    t_wall, _ = best_of(torch_load)
    v_wall, _ = best_of(views)
    g_wall, _ = best_of(gathers)
    o_wall, _ = best_of(gathers_into)
    gb = nbytes * count / 1e9
    print(f"latent reads: {count} fp16 4x128x128, random order, warm; gather on 1 thread (RAYON_NUM_THREADS=1)")
    print(f"  torch.load per file      {count / t_wall:9.0f} latents/s")
    print(f"  ours get_torch (0-copy)  {count / v_wall:9.0f} latents/s   ratio {t_wall / v_wall:6.1f}x")
    print(
        f"  ours gather(out=reused buffer, batch {batch}) {count / o_wall:9.0f} latents/s   ratio {t_wall / o_wall:6.1f}x   "
        f"{gb / o_wall:5.2f} GB/s = {memcpy_wall / o_wall * 100:.0f}% of memcpy into a reused buffer ({gb / memcpy_wall:5.2f} GB/s)"
    )
    print(
        f"  ours gather(new array,     batch {batch}) {count / g_wall:9.0f} latents/s   ratio {t_wall / g_wall:6.1f}x   "
        f"{gb / g_wall:5.2f} GB/s = {fresh_wall / g_wall * 100:.0f}% of numpy copy into a new array ({gb / fresh_wall:5.2f} GB/s)"
    )


def main():
    print(f"load average at start: {os.getloadavg()}; cores: {os.cpu_count()}")
    bench_decode("1 MP JPEG -> 0.25 MP", (1152, 896), 0.25, "JPEG", 24, (1, 2))
    bench_decode("4 MP JPEG -> 1 MP", (2304, 1792), 1.0, "JPEG", 8, (1,))
    bench_decode("1 MP PNG -> 0.25 MP", (1152, 896), 0.25, "PNG", 16, (1,))
    with tempfile.TemporaryDirectory() as tmp:
        bench_scan(Path(tmp), 3000)
        bench_latents(Path(tmp), 1000, 32)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
