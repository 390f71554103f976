"""Generated datasets for bench/scale.py: tiny PNGs of several aspect ratios with textfile captions, fast enough for
a million files (zlib by hand, the shared part of each image compressed once), in subfolders of at most 10,000 files.

Every image differs from every other one in its bytes (its index is stamped into the last pixels of its last row),
so the content hashes differ. Captions are drawn from CAPTION_COUNT distinct strings of the tiny SDXL's vocabulary
(bench/data_path.py's CAPTION_WORDS): the text cache stays small at any N.

A master folder is written once per N and reused (a marker file records N and GENERATOR_VERSION); runs work on
hard-linked copies of it (`link_copy`) and change files only by writing a new file and renaming it over the old
name (`change_images`), which leaves the master untouched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import time
import zlib
from multiprocessing import get_context
from pathlib import Path

from data_path import CAPTION_WORDS  # the tiny SDXL's vocabulary

GENERATOR_VERSION = 1
# (W, H). At `resolution: 64` (pixel_area, alignment 64) they fall in buckets 1.0, 2.0 and 0.5.
SIZES = ((96, 64), (64, 96), (80, 80), (128, 64), (144, 64), (64, 144), (112, 80))
IMAGES_PER_FOLDER = 5000  # + as many caption files: 10,000 files per folder
CAPTION_COUNT = 1000
VARIANTS = 8  # distinct backgrounds per size
STAMP = 16  # bytes at the end of the pixel data that make an image unique
MARKER = "generated.json"


def caption(index: int) -> str:
    """Caption number `index` (0 <= index < CAPTION_COUNT): four words, the base-8 digits of the index."""
    words = []
    for _ in range(4):
        words.append(CAPTION_WORDS[index % len(CAPTION_WORDS)])
        index //= len(CAPTION_WORDS)
    return " ".join(words)


CAPTIONS = [caption(i) for i in range(CAPTION_COUNT)]
assert len(set(CAPTIONS)) == CAPTION_COUNT


def image_name(index: int) -> str:
    """Path of image `index` below the dataset folder."""
    return f"{index // IMAGES_PER_FOLDER:04d}/img_{index:07d}.png"


def size_of(index: int) -> tuple[int, int]:
    return SIZES[index % len(SIZES)]


def caption_of(index: int) -> int:
    return (index * 7919 + index // 7) % CAPTION_COUNT


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


class PngMaker:
    """PNG bytes of image `index` (salt 0) or of a rewritten version of it (salt > 0): RGB, 8 bits, filter 0."""

    def __init__(self) -> None:
        self.heads: dict[tuple[int, int, int], tuple[object, bytes]] = {}

    def _head(self, width: int, height: int, variant: int):
        key = (width, height, variant)
        if key not in self.heads:
            rows = []
            for y in range(height):
                row = bytearray([0])  # filter type None
                for x in range(width):  # 8x8 blocks of one colour: small files, written fast
                    bx, by = x // 8, y // 8
                    row += bytes(((bx * 37 + by * 11 + variant * 50) % 256, (bx * 13 + by * 29 + variant * 17) % 256,
                                  (bx * by * 7 + variant * 90) % 256))
                rows.append(bytes(row))
            raw = b"".join(rows)
            compressor = zlib.compressobj(6)
            prefix = compressor.compress(raw[:-STAMP])
            header = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            self.heads[key] = (compressor, header, prefix)
        return self.heads[key]

    def png(self, index: int, salt: int = 0) -> bytes:
        width, height = size_of(index)
        compressor, header, prefix = self._head(width, height, (index // len(SIZES)) % VARIANTS)
        tail = compressor.copy()
        stamp = index.to_bytes(8, "little") + salt.to_bytes(8, "little")
        idat = prefix + tail.compress(stamp) + tail.flush()
        return header + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def write_image(folder: Path, maker: PngMaker, index: int, salt: int = 0) -> None:
    """Image `index` and its caption file in `folder`; replaced by rename when they exist (hard links stay intact)."""
    name = image_name(index)
    target = folder / name
    target.parent.mkdir(exist_ok=True)
    caption = CAPTIONS[caption_of(index)].encode()
    for path, data in ((target, maker.png(index, salt)), (target.with_suffix(".txt"), caption)):
        temp = path.with_name(f".{path.name}.tmp")
        _write(str(temp), data)
        os.replace(temp, path)


def _write_folder(job: tuple[str, int, int]) -> int:
    root, start, stop = job
    maker = PngMaker()
    folder = Path(root) / image_name(start).split("/")[0]
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(start, stop):
        stem = str(folder / f"img_{index:07d}")
        _write(stem + ".png", maker.png(index))
        _write(stem + ".txt", CAPTIONS[caption_of(index)].encode())
    return stop - start


def ensure_master(work: Path, count: int, processes: int) -> tuple[Path, float | None]:
    """The master folder of `count` images under `work` (generated unless its marker matches), and the seconds its
    generation took (None: reused)."""
    master = work / f"n{count}" / "master"
    marker = work / f"n{count}" / MARKER
    expected = {"n": count, "generator_version": GENERATOR_VERSION}
    if marker.is_file() and json.loads(marker.read_text()) == expected and master.is_dir():
        return master, None
    marker.unlink(missing_ok=True)
    shutil.rmtree(master, ignore_errors=True)
    master.mkdir(parents=True)
    start = time.perf_counter()
    jobs = [(str(master), s, min(s + IMAGES_PER_FOLDER, count)) for s in range(0, count, IMAGES_PER_FOLDER)]
    with get_context("fork").Pool(processes) as pool:
        written = sum(pool.imap_unordered(_write_folder, jobs))
    assert written == count, (written, count)
    seconds = time.perf_counter() - start
    marker.write_text(json.dumps(expected))
    return master, seconds


def link_copy(master: Path, target: Path) -> None:
    """`target` = a hard-linked copy of `master` (no file bytes copied)."""
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-al", str(master), str(target)], check=True)


def plan_changes(count: int, fraction: float = 0.01, seed: int = 0) -> dict[str, list[int]]:
    """Which images a "1% changed" restart rewrites, adds and removes: `fraction` of `count`, about a third each."""
    total = max(3, round(count * fraction))
    removed = added = total // 3
    changed = total - removed - added
    picked = random.Random(seed).sample(range(count), changed + removed)
    return {
        "changed": sorted(picked[:changed]),
        "removed": sorted(picked[changed:]),
        "added": list(range(count, count + added)),
    }


def change_images(folder: Path, changes: dict[str, list[int]]) -> None:
    """Apply `plan_changes`' answer to a dataset copy: new pixels (same size) for `changed`, new files for `added`,
    image and caption deleted for `removed`. Files are replaced by rename, never written in place."""
    maker = PngMaker()
    for index in changes["changed"]:
        write_image(folder, maker, index, salt=1)
    for index in changes["added"]:
        write_image(folder, maker, index)
    for index in changes["removed"]:
        image = folder / image_name(index)
        image.unlink()
        image.with_suffix(".txt").unlink()
