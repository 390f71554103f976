"""Two ranks (gloo on 127.0.0.1, accelerate's process group, as `accelerate launch --multi_gpu` on a CPU) start the
data path through the trainer's D1 wrapper, then meet in a barrier and an object gather, as SimpleTuner's
`configure_multi_databackend` does next (tests/integration/rank_worker.py).

A failure injected on one rank (lcm_plugin.cache_build.faults, `LCM_CACHE_BUILD_RAISE`), in rank 0's checks of the
existing caches or in rank 1's encoding: both ranks decide alike (nothing served, SimpleTuner's own path
everywhere) and quickly, the failing rank logs its own error and the other one names that rank, and both pass the
barrier and gather that follow. Without a failure both ranks serve the same images.
"""

from __future__ import annotations

import json
import shutil
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cache_snapshot

WORKER = Path(__file__).with_name("rank_worker.py")
WORLD = 2
SECONDS = 240  # both ranks, start-up (torch, accelerate, the tiny models) included; the build itself takes seconds
INJECTED = "InjectedFault: LCM_CACHE_BUILD_RAISE={spec}: fault injected at point {point!r}"


@pytest.fixture
def run(tmp_path, tiny_sdxl_dir) -> Path:
    """8 photo-like JPEGs in two aspect buckets, VAE batches of 2: rank 1 encodes two of the four batches."""
    images = [(f"img{i}", ((64, 64), (80, 64))[i % 2], f"{('red', 'blue')[i % 2]} {('circle', 'square')[i // 4]}")
              for i in range(8)]
    return cache_snapshot.write_run(tmp_path / "run", tiny_sdxl_dir, images, resolution=64, seed=3)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(run: Path | list[Path], model_dir: Path, faults: dict[int, str], late: dict[int, float] | None = None
              ) -> list[tuple[dict, str]]:
    """(result, log) of each rank; `faults`: rank -> LCM_CACHE_BUILD_RAISE for that rank; `late`: rank -> seconds it
    waits before the data path. Given one run folder, the ranks are one machine's; given one per rank, each rank is
    a machine of its own, started in its folder."""
    port = free_port()
    processes = []
    for rank in range(WORLD):
        folder, local = (run, rank) if isinstance(run, Path) else (run[rank], 0)
        env = {key: value for key, value in os.environ.items()
               if key not in ("LCM_CACHE_BUILD_FAULT", "LCM_CACHE_BUILD_RAISE", "RAYON_NUM_THREADS",
                              "SIMPLETUNER_LCM_DATA_PATH")}
        env.update(RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(WORLD),
                   LOCAL_WORLD_SIZE=str(WORLD if isinstance(run, Path) else 1), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), CONFIG_PATH=str(folder / "config" / "config.json"),
                   OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if rank in faults:
            env["LCM_CACHE_BUILD_RAISE"] = faults[rank]
        env["RANK_WORKER_DELAY_S"] = str((late or {}).get(rank, 0))
        result = folder / f"rank{rank}.json"
        processes.append((subprocess.Popen([sys.executable, str(WORKER), str(model_dir), str(result)], cwd=folder,
                                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                          result))
    deadline = time.monotonic() + SECONDS
    outcomes = []
    for process, result in processes:
        try:
            log, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other, _ in processes:
                other.kill()
            pytest.fail(f"the ranks did not finish within {SECONDS} s")
        assert process.returncode == 0, log[-4000:]
        outcomes.append((json.loads(result.read_text()), log))
    return outcomes


def assert_agreed(outcomes: list[tuple[dict, str]]) -> dict:
    """Both ranks serve the same, and both passed the barrier and gather that follow the data path; returns it."""
    (first, log0), (second, log1) = outcomes
    assert first["served"] == second["served"], log0[-3000:] + log1[-3000:]
    expected = [{"rank": rank, "served": first["served"]} for rank in range(WORLD)]
    assert first["gathered"] == second["gathered"] == expected
    return first["served"]


def test_both_ranks_serve_the_caches_they_built_together(run, tiny_sdxl_dir):
    # Images stamped an hour ahead (a clock-skewed sync): a scan of its own on rank 1 would distrust the memo's rows
    # (racily new) and read all 8 again; only the memo rank 0 shares by its token gives rank 1 its inventory unread.
    for image in (run / "data").iterdir():
        os.utime(image, (time.time() + 3600, time.time() + 3600))
    outcomes = run_ranks(run, tiny_sdxl_dir, {}, late={0: 3.0})
    served = assert_agreed(outcomes)
    assert list(served["datasets"]) == ["toy"] and len(served["datasets"]["toy"]) == 8, served
    assert len(served["texts"]) == 1
    log0 = outcomes[0][1]
    assert "read latents and text embeddings from the memory-mapped caches (4 image(s) encoded here" in log0, log0
    # each rank's Rust pools get its share of the cores (two ranks on this machine)
    assert {result["rayon_threads"] for result, _ in outcomes} == {str(max(1, os.cpu_count() // WORLD))}
    # the machine's first rank scanned the folder (though it came late); the other one waited for it and mapped the
    # memo it wrote (its token), reading nothing
    assert [result["scan_reads"] for result, _ in outcomes] == [{"toy": 8}, {"toy": 0}]
    assert [result["memo_mapped"] for result, _ in outcomes] == [{"toy": False}, {"toy": True}]


@pytest.mark.parametrize(
    ("failing", "spec", "phase"),
    [(0, "checks:1", "the checks of the existing caches"), (1, "encoded:1", "encoding")],
    ids=["rank0-checks", "rank1-encoding"],
)
def test_a_failure_on_one_rank_sends_every_rank_to_simpletuners_path(run, tiny_sdxl_dir, failing, spec, phase):
    outcomes = run_ranks(run, tiny_sdxl_dir, {failing: spec})
    assert assert_agreed(outcomes) == {"datasets": {}, "texts": []}
    error = INJECTED.format(spec=spec, point=spec.partition(":")[0])
    fallback = "simpletuner-lcm data path: rank {rank}: every dataset uses SimpleTuner's own caching: "
    for rank, (_, log) in enumerate(outcomes):
        if rank == failing:
            line = fallback.format(rank=rank) + f"the build failed on this rank ({error})"
        else:
            line = fallback.format(rank=rank) + f"rank {failing} failed during {phase}: {error}"
        assert line in log, log[-4000:]
        assert "read latents and text embeddings from the memory-mapped caches" not in log


def test_machines_with_cache_folders_of_their_own_each_build_and_serve_every_image(run, tmp_path, tiny_sdxl_dir):
    """Two machines (a rank each) whose relative cache folders resolve to folders of their own, as with a local
    `cache_dir_vae` per machine: each machine's stores get every latent and caption and their own manifest, so each
    rank serves all 8 images from its own disk; a restart of both finds everything cached on each."""
    from lcm_plugin.cache import LatentCacheReader
    from lcm_plugin.cache_build.layout import LCM_DIR, MANIFEST, PT_RECORD, TIME_IDS
    from lcm_plugin.cache_build.ranks import MACHINE_MARK

    machines = [run, tmp_path / "second-machine"]
    shutil.copytree(run, machines[1])  # copy2: the images keep their mtimes, part of each key
    stores = [folder / "cache" / "vae" / "toy" / LCM_DIR for folder in machines]
    for start in ("first", "restart"):
        outcomes = run_ranks(machines, tiny_sdxl_dir, {})
        for folder, (result, log) in zip(machines, outcomes):
            served = {Path(path).relative_to(folder).as_posix() for path in result["served"]["datasets"]["toy"]}
            assert served == {f"data/img{i}.jpg" for i in range(8)}, log[-3000:]
            assert len(result["served"]["texts"]) == 1
        log0 = outcomes[0][1]
        counts = "(8 image(s) encoded here, 0 already" if start == "first" else "(0 image(s) encoded here, 8 already"
        assert counts in log0, log0[-3000:]
        if start == "first":
            shards = [sorted(path.name for path in store.iterdir()) for store in stores]
    for store, before in zip(stores, shards):
        latents = [key for key in LatentCacheReader(store).keys() if TIME_IDS not in key and PT_RECORD not in key]
        assert len(latents) == 8 and (store / MANIFEST).is_file()
        assert sorted(path.name for path in store.iterdir()) == before  # the restart wrote nothing
    assert not [path for path in tmp_path.rglob(f"{MACHINE_MARK}*")]
