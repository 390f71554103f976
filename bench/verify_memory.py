"""Peak memory of a full cache verify against shard size (issue 8, "Scale").

Builds one cache per shard size, all of the same total size, of SDXL-sized bf16-like latents ([4, 128, 128] f16,
128 KiB each), then runs a full `verify` in a fresh interpreter and reads the process's peak RSS (VmHWM) before
and after the call. `verify` streams each shard through a 1 MiB buffer per thread, so its extra memory should not
grow with the shard size.

`--baseline` also runs the previous behaviour, emulated in Python: every shard read whole into memory, one per
core at a time (what `verify` did before: `fs::read` of each shard inside a rayon `par_iter`), then CRC-32.

    .venv/bin/python bench/verify_memory.py                  # 4, 32 and 256 MiB shards, 512 MiB caches
    .venv/bin/python bench/verify_memory.py --baseline --total-mb 1024
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

LATENT_SHAPE = (4, 128, 128)

MEASURE = textwrap.dedent(
    """
    import json, os, sys, zlib
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from lcm_plugin.cache import verify

    def peak_kib():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))

    folder, mode = Path(sys.argv[1]), sys.argv[2]
    before = peak_kib()
    if mode == "streaming":
        problems = verify(folder)
    else:
        records = [r for index in folder.glob("index.*.json") for r in json.loads(index.read_text())["shards"]]
        def whole_shard_crc(record):
            return zlib.crc32((folder / record["file"]).read_bytes()) == record["crc32"]
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            problems = [r for r, ok in zip(records, pool.map(whole_shard_crc, records)) if not ok]
    assert not problems, problems
    print(before, peak_kib())
    """
)


def build(folder: Path, shard_mb: int, total_mb: int) -> int:
    from lcm_plugin.cache import LatentCacheWriter

    rng = np.random.default_rng(0)
    latent_bytes = int(np.prod(LATENT_SHAPE)) * 2
    count = total_mb * (1 << 20) // latent_bytes
    with LatentCacheWriter(folder, shard_bytes=shard_mb << 20) as writer:
        for i in range(count):
            writer.put(f"k{i}", rng.standard_normal(LATENT_SHAPE, dtype=np.float32).astype(np.float16))
    return writer.shard_count


def measure(folder: Path, mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), mode], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard-mb", type=int, nargs="+", default=[4, 32, 256])
    parser.add_argument("--total-mb", type=int, default=512)
    parser.add_argument("--baseline", action="store_true", help="also run the old whole-shard verify, emulated")
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, cache: {args.total_mb} MiB of [4, 128, 128] f16 latents")
    print(f"{'shard':>9} {'shards':>7} {'mode':>10} {'peak RSS':>10} {'verify adds':>12}")
    modes = ["streaming", "whole-shard"] if args.baseline else ["streaming"]
    for shard_mb in args.shard_mb:
        with tempfile.TemporaryDirectory(prefix="verify-memory-") as tmp:
            folder = Path(tmp) / "cache"
            shards = build(folder, shard_mb, args.total_mb)
            for mode in modes:
                before, after = measure(folder, mode)
                print(f"{shard_mb:>6} MiB {shards:>7} {mode:>10} {after / 1024:>7.1f} MiB {(after - before) / 1024:>8.1f} MiB")


if __name__ == "__main__":
    main()
