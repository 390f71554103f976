"""kill -9 campaign: builds killed at random points, each followed by a rerun that must leave the caches bit-equal
to an uninterrupted build (no entry missing, duplicated or stale; every check passes).

Half the kills land on the build's fault points (lcm_plugin/cache_build/faults.py: after a VAE batch, after an
entry is queued — the Rust store seals a shard inside such a put —, after a SimpleTuner file is written, before a
writer commits, before the manifest, between the two bucket files), drawn uniformly over all the times the
uninterrupted build reaches them; the other half are a SIGKILL from outside after a random delay within the
build's duration, which also lands inside shard, index and temp-file writes. Every fourth cycle kills the rerun
too before a final rerun completes.

Builds run in processes forked from the test (torch and the models' code already imported), so a cycle costs
about a second. `LCM_KILL_CAMPAIGN=<kills>` sets the number of kills (default 50, the CI run);
`LCM_KILL_CAMPAIGN=500 pytest tests/integration/test_cache_build_kill.py -s` is the longer campaign.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import random
import shutil
import signal
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch

import cache_snapshot
from cache_snapshot import assert_checks_pass, snapshot
from lcm_plugin.cache_build import BuildOptions, build, faults
from lcm_plugin.cache_build.layout import LCM_DIR, TIME_IDS
from lcm_plugin.cache_build.encode import DTYPES, device, vae_dtype_on

KILLS = int(os.environ.get("LCM_KILL_CAMPAIGN", "50"))
WORDS = ("red", "blue", "circle", "square", "photo")
# One 4x8x8 latent, in the dtype SimpleTuner's VAE encodes in on this host (config.json has no vae_dtype: fp32 on
# a CPU, 1024 bytes; bf16 on an accelerator, 512), and its six int64 time_ids fill a shard: a commit every image.
LATENT_BYTES = 4 * 8 * 8 * DTYPES[vae_dtype_on(device(), "bf16")].itemsize
SHARD_BYTES = LATENT_BYTES + 6 * 8
HANG_SECONDS = 120
POINTS = ("encoded", "put", "pt", "commit", "manifest", "buckets")


def write_run(root: Path, model_dir: Path) -> Path:
    """A run folder: 9 photo-like JPEGs at 64 px in three aspect ratios (two share a caption), one file that is
    no image."""
    sizes = ((80, 64), (64, 88), (64, 64))
    images = [(f"sub/img{i}" if i == 4 else f"img{i}", sizes[i % 3], f"{WORDS[i % 2]} {WORDS[2 + i % 3 % 2]}")
              for i in range(9)]
    cache_snapshot.write_run(root, model_dir, images, resolution=64, seed=5)
    (root / "data" / "junk.png").write_bytes(b"not an image")
    (root / "data" / "junk.txt").write_text("photo")
    return root


def options(run: Path) -> BuildOptions:
    return BuildOptions(run, simpletuner_format=True, shard_bytes=SHARD_BYTES, threads=1)


def _own_tqdm_locks() -> None:
    """tqdm's class-wide write locks, made anew in this forked build. Inherited, its multiprocessing lock is one
    semaphore shared with every sibling fork, and a sibling SIGKILLed while holding it (writing its progress bar)
    hangs the next build. Separate processes, as users run builds, never share it."""
    from tqdm.std import TqdmDefaultWriteLock, tqdm

    if "mp_lock" in vars(TqdmDefaultWriteLock):
        del TqdmDefaultWriteLock.mp_lock
    TqdmDefaultWriteLock.th_lock = threading.RLock()
    classes = [tqdm]
    while classes:
        cls = classes.pop()
        classes += cls.__subclasses__()
        if "_lock" in vars(cls):
            del cls._lock


def _child(run: Path, fault: str | None) -> None:
    faulthandler.dump_traceback_later(HANG_SECONDS - 10, exit=True)  # a hang shows where it waits
    _own_tqdm_locks()
    if fault:
        os.environ["LCM_CACHE_BUILD_FAULT"] = fault
    try:
        build(options(run), log=lambda line: None)
    except BaseException:  # noqa: BLE001 - a failing build must show as a non-zero exit, not a hang
        traceback.print_exc()
        os._exit(3)
    os._exit(0)


def _reference_child(run: Path, connection) -> None:
    _own_tqdm_locks()
    os.environ["LCM_CACHE_BUILD_FAULT"] = "*:0"  # count the fault points, kill nowhere
    build(options(run), log=lambda line: None)
    connection.send(dict(faults.hits))
    os._exit(0)


def reference_build(run: Path) -> dict[str, int]:
    """An uninterrupted build (in a child, as the others); returns how often it reached each fault point."""
    context = multiprocessing.get_context("fork")
    receiving, sending = context.Pipe(duplex=False)
    process = context.Process(target=_reference_child, args=(run, sending))
    process.start()
    hits = receiving.recv()
    process.join()
    assert process.exitcode == 0
    return hits


def run_build(run: Path, fault: str | None = None, kill_after: float | None = None) -> int:
    """Exit code of a build in a forked process: -9 when killed (by its fault point or after `kill_after` s)."""
    process = multiprocessing.get_context("fork").Process(target=_child, args=(run, fault))
    process.start()
    process.join(timeout=kill_after if kill_after is not None else HANG_SECONDS)
    if process.is_alive():
        if kill_after is None:
            process.kill()
            pytest.fail("a build hung")
        os.kill(process.pid, signal.SIGKILL)
        process.join()
    return process.exitcode


def assert_complete(run: Path, reference: dict) -> None:
    assert_checks_pass(run)
    got = snapshot(run)
    for part in reference:
        ours, theirs = got[part], reference[part]
        if isinstance(theirs, dict):
            differs = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            assert not differs, f"{part} differs from the uninterrupted build at {differs}"
        assert ours == theirs, f"{part} differs from the uninterrupted build"


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    from lcm_plugin.tiny_sdxl import save_tiny_sdxl

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("kill")
    model = save_tiny_sdxl(root / "model", seed=0, vocabulary=WORDS)
    template = write_run(root / "template", model)
    reference = root / "reference"
    shutil.copytree(template, reference)
    hits = reference_build(reference)
    expected = snapshot(reference)
    latents = [data for key, (_, _, data) in expected["latents"].items() if not key.endswith(TIME_IDS)]
    assert {len(data) for data in latents} == {LATENT_BYTES}, "SHARD_BYTES assumes another latent size"
    shards = list((reference / "cache/vae/toy" / LCM_DIR).glob("*.safetensors"))
    assert len(shards) >= len(latents), f"{len(shards)} shard(s) for {len(latents)} latents: few commits to kill"
    # The time a forked build takes, to draw kill times from; it is also a fresh build equal to the reference.
    timed = root / "timed"
    shutil.copytree(template, timed)
    start = time.perf_counter()
    assert run_build(timed) == 0
    seconds = time.perf_counter() - start
    assert_complete(timed, expected)
    return root, template, expected, hits, seconds


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
def test_every_kill_is_repaired_by_a_rerun(campaign):
    root, template, reference, hits, seconds = campaign
    assert set(POINTS) <= set(hits), hits  # the reference build passed every fault point
    assert len(reference["latents"]) == 2 * 9 and len(reference["files"]) == 9 + 5 + 2  # latents, captions, buckets
    rng = random.Random(2026)
    outcomes: Counter = Counter()
    kills = cycle = 0
    while kills < KILLS:
        run = root / f"run{cycle}"
        shutil.copytree(template, run)
        history: list[str] = []
        for attempt in range(2 if cycle % 4 == 3 else 1):  # every fourth cycle: the rerun is killed too
            if rng.random() < 0.5:
                point = rng.choice(POINTS)
                fault, delay = f"{point}:{rng.randint(1, hits[point])}", None
                how = f"point {point}"
            else:
                fault, delay = None, rng.uniform(0.05, 0.8 * seconds)
                how = "timer"
            code = run_build(run, fault, delay)
            history.append(how if fault is None else fault)
            assert code in (0, -signal.SIGKILL), f"cycle {cycle}: the build failed with exit code {code}"
            outcomes[f"{how}: {'killed' if code else 'finished first'}"] += 1
            kills += code == -signal.SIGKILL
        assert run_build(run) == 0, f"cycle {cycle}: the rerun failed after {history}"
        try:
            assert_complete(run, reference)
        except AssertionError as error:
            raise AssertionError(f"cycle {cycle}, killed by {history}: {error}") from None
        shutil.rmtree(run)
        cycle += 1
    print(f"\nkill campaign: {kills} builds killed in {cycle} cycles (a build takes {seconds:.2f} s), every rerun "
          f"bit-equal to the uninterrupted build; {dict(sorted(outcomes.items()))}")
    assert sum(n for how, n in outcomes.items() if how.startswith("point") and how.endswith("killed")) >= KILLS // 4
