"""Two accelerate "machines" build one run's caches (`accelerate launch --multi_gpu --num_machines 2 --machine_rank R`,
gloo on 127.0.0.1); machine 1 is SIGKILLed mid-build, as a lost machine. Machine 0 must end by itself, soon, with an
error naming what broke (its next gather finds the peer gone), and a rerun of both machines must leave the caches
complete: every planned image exactly once in the store, nothing stale (bit-equal to a one-process build of the same
run), `simpletuner-lcm cache verify RUN` passing, and the shards committed before the kill left as they were.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

import cache_snapshot
from cache_snapshot import assert_checks_pass, committed_shards, snapshot
from lcm_plugin.cache import LatentCacheReader
from lcm_plugin.cache_build import BuildOptions, build
from lcm_plugin.cache_build.layout import LCM_DIR, PT_RECORD, TIME_IDS
from test_cache_build import BIN, cli_env, free_port

IMAGES = 48  # 64-px JPEGs in two buckets: 24 VAE batches of 2, 12 per machine
SHARD_BYTES = 700  # about one 4x8x8 bf16 latent (512 bytes) per shard: a commit per image, kills land between
KILL_AFTER = 3  # shards machine 1 has committed (journal lines) when it is killed, of about 24 it would write
START_SECONDS = 240  # both machines started and through the first commit (accelerate, torch and the models' start)
END_SECONDS = 120  # machine 0 ends within this once machine 1 is gone, or the test fails (a hang)
WORDS = (("red", "blue"), ("circle", "square"))
# What machine 0 says when its next collective finds the peer gone (gloo's message names the closed connection).
LOST_PEER = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|Connection refused")


def write_run(root: Path, model_dir: Path) -> Path:
    images = [(f"img{i:02d}", ((64, 64), (80, 64))[i % 2], f"{WORDS[0][i % 2]} {WORDS[1][i // 2 % 2]}")
              for i in range(IMAGES)]
    return cache_snapshot.write_run(root, model_dir, images, resolution=64, seed=9)


def launch(run: Path, rank: int, port: int, log: Path) -> subprocess.Popen:
    """Machine `rank` of two: its own accelerate launcher (torchrun agent + one worker), in a session of its own."""
    command = [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
        "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "lcm_plugin.cli", "cache", "build", str(run), "--format", "simpletuner",
        "--shard-mb", str(SHARD_BYTES / (1 << 20)), "--threads", "1",
    ]
    with log.open("w") as out:
        return subprocess.Popen(command, env=cli_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_machine(launcher: subprocess.Popen) -> None:
    """SIGKILL to every process of the machine at once: the launcher's process group and the group of each process
    under it (torchrun starts its workers in sessions of their own, out of reach of the launcher's group)."""
    try:
        tree = [launcher.pid] + [child.pid for child in psutil.Process(launcher.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = [launcher.pid]
    groups = []
    for pid in tree:
        try:
            groups.append(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for group in dict.fromkeys(reversed(groups)):  # the worker first: it is the one writing
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait()
    _, alive = psutil.wait_procs([p for p in map(_process, tree) if p is not None], timeout=10)
    assert not alive, f"processes of the killed machine still run: {alive}"


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def wait_or_fail(machines: list[subprocess.Popen], logs: list[Path], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    for machine in machines:
        try:
            machine.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in machines:
                kill_machine(other)
            pytest.fail(f"{what} did not end within {seconds} s\n" + "\n".join(tail(log) for log in logs))


def tail(log: Path, chars: int = 4000) -> str:
    return f"--- {log.name}:\n{log.read_text(errors='replace')[-chars:]}"


def stamps(folder: Path, files) -> dict[str, tuple[int, int]]:
    return {name: ((folder / name).stat().st_ino, (folder / name).stat().st_mtime_ns) for name in files}


def is_latent(key: str) -> bool:
    return TIME_IDS not in key and PT_RECORD not in key


def test_a_machine_killed_mid_build_is_repaired_by_a_rerun(tmp_path, tiny_sdxl_dir):
    torch.set_num_threads(1)
    template = write_run(tmp_path / "template", tiny_sdxl_dir)
    reference, run = tmp_path / "reference", tmp_path / "run"
    shutil.copytree(template, reference)  # copy2: the images keep their mtimes, part of each key
    shutil.copytree(template, run)
    build(BuildOptions(reference, simpletuner_format=True, shard_bytes=SHARD_BYTES, threads=1), log=lambda line: None)
    planned = sorted(LatentCacheReader(reference / "cache/vae/toy" / LCM_DIR).keys())
    planned_latents = [key for key in planned if is_latent(key)]
    assert len(planned_latents) == IMAGES
    latents_dir, text_dir = run / "cache/vae/toy" / LCM_DIR, run / "cache/text" / LCM_DIR

    # 1. Both machines build; machine 1 is killed once it has committed a few shards.
    start = time.monotonic()
    port = free_port()
    logs = [tmp_path / f"machine{rank}.log" for rank in range(2)]
    machines = [launch(run, rank, port, logs[rank]) for rank in range(2)]
    journal = latents_dir / "index.rank1.journal"
    while not journal.exists() or journal.read_bytes().count(b"\n") < KILL_AFTER:
        if any(machine.poll() is not None for machine in machines) or time.monotonic() - start > START_SECONDS:
            for machine in machines:
                kill_machine(machine)
            pytest.fail(f"machine 1 did not commit {KILL_AFTER} shards\n" + "\n".join(tail(log) for log in logs))
        time.sleep(0.002)
    kill_machine(machines[1])
    killed = time.monotonic()
    wait_or_fail(machines[:1], logs, END_SECONDS, "machine 0, after machine 1 was killed,")
    ended = time.monotonic() - killed
    log0 = logs[0].read_text(errors="replace")
    assert machines[0].returncode != 0, tail(logs[0])
    assert LOST_PEER.search(log0), "machine 0 did not name the lost connection\n" + tail(logs[0])
    # One line of the build's own, naming the phase, rather than a bare traceback from the collective.
    assert re.search(r"simpletuner-lcm cache build: lost contact with the other ranks during \w", log0), tail(logs[0])

    shards = {folder: committed_shards(folder) for folder in (latents_dir, text_dir)}
    before = {folder: stamps(folder, files) for folder, files in shards.items()}
    kept = {key for keys in shards[latents_dir].values() for key in keys if is_latent(key)}
    by_rank1 = {key for name, keys in shards[latents_dir].items() if name.startswith("rank1-") for key in keys
                if is_latent(key)}
    assert len(by_rank1) >= KILL_AFTER - 1, f"machine 1 had committed only {len(by_rank1)} latent(s) when killed"
    assert len(kept) < IMAGES, "the kill did not land mid-build: every latent was committed"
    print(f"\nkilled machine 1 after {killed - start:.1f} s with {len(by_rank1)} of its latents committed "
          f"({len(kept)} of {IMAGES} in all); machine 0 ended {ended:.1f} s later with exit code "
          f"{machines[0].returncode}")

    # 2. The rerun of both machines completes.
    port = free_port()
    logs = [tmp_path / f"rerun{rank}.log" for rank in range(2)]
    machines = [launch(run, rank, port, logs[rank]) for rank in range(2)]
    wait_or_fail(machines, logs, START_SECONDS, "the rerun")
    assert [machine.returncode for machine in machines] == [0, 0], "\n".join(tail(log) for log in logs)
    encoded = [int(n) for log in logs
               for n in re.findall(r"cache build \(rank \d\): (\d+) image\(s\) encoded \(", log.read_text())]
    assert len(encoded) == 2 and sum(encoded) == IMAGES - len(kept), encoded  # only what no shard held

    # 3. Nothing lost: the shards committed before the kill are as they were.
    for folder, files in before.items():
        assert stamps(folder, files) == files, f"{folder}: a shard committed before the kill was rewritten"
    # Nothing duplicated: one entry per planned key over both writers' indexes, and every planned key there.
    listed = [key for keys in committed_shards(latents_dir).values() for key in keys if PT_RECORD not in key]
    assert len(listed) == len(set(listed)), "a key is stored twice"
    assert sorted(listed) == [key for key in planned if PT_RECORD not in key]
    # Nothing stale: latents, time_ids, text embeddings, manifest and SimpleTuner files bit-equal to the
    # one-process build of the same run.
    ours, theirs = LatentCacheReader(latents_dir), LatentCacheReader(reference / "cache/vae/toy" / LCM_DIR)
    for key in planned_latents:
        assert torch.equal(ours.get_torch(key), theirs.get_torch(key)), key
        assert ours.get(key + TIME_IDS).tolist() == theirs.get(key + TIME_IDS).tolist(), key
    got, expected = snapshot(run), snapshot(reference)
    for part in expected:
        assert got[part] == expected[part], f"{part} differs from the one-process build"
    assert_checks_pass(run)
    check = subprocess.run([str(BIN / "simpletuner-lcm"), "cache", "verify", str(run)], env=cli_env(),
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    print(f"test wall time {time.monotonic() - start:.1f} s after the reference build")
