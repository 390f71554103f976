"""Sharded latent cache: round trips, zero-copy views, checksums, crash safety, integrity under change and hostile
indexes (issue 8: each repro runs in a subprocess where the old behaviour was a crash)."""

import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from lcm_plugin.cache import (
    CorruptShardError,
    DuplicateKeyError,
    LatentCacheReader,
    LatentCacheWriter,
    WriterLockedError,
    check_cache,
    verify,
)


def test_round_trip_of_numpy_and_torch_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    values = {
        "f16": rng.standard_normal((4, 16, 16)).astype(np.float16),
        "f32": rng.standard_normal((77, 32)).astype(np.float32),
        "u8": rng.integers(0, 255, (3, 5), dtype=np.uint8),
        "i64": np.arange(7, dtype=np.int64),
    }
    bf16 = torch.randn(4, 8, 8, dtype=torch.bfloat16)
    with LatentCacheWriter(tmp_path, shard_bytes=4096) as writer:
        for key, value in values.items():
            writer.put(key, value)
        writer.put("bf16", bf16)
        writer.put("t16", torch.from_numpy(values["f16"]))
    assert writer.shard_count >= 2
    with LatentCacheReader(tmp_path) as reader:
        assert sorted(reader.keys()) == sorted([*values, "bf16", "t16"])
        for key, value in values.items():
            got = reader.get(key)
            assert got.dtype == value.dtype and np.array_equal(got, value)
        assert torch.equal(reader.get_torch("bf16"), bf16)
        assert np.array_equal(reader.get("t16"), values["f16"])


def test_views_are_zero_copy_read_only_and_outlive_the_reader(tmp_path):
    with LatentCacheWriter(tmp_path) as writer:
        writer.put("a", np.arange(64, dtype=np.float32))
    reader = LatentCacheReader(tmp_path)
    view = reader.get("a")
    assert not view.flags.writeable
    shard = reader._reader.shard_array(0)
    assert np.shares_memory(view, shard)
    with pytest.raises(ValueError):
        view[0] = 1.0
    del reader, shard
    import gc

    gc.collect()
    assert np.array_equal(view, np.arange(64, dtype=np.float32))


def test_gather_stacks_in_key_order(tmp_path):
    arrays = [np.full((4, 8, 8), i, np.float16) for i in range(10)]
    with LatentCacheWriter(tmp_path, shard_bytes=1000) as writer:
        for i, a in enumerate(arrays):
            writer.put(f"k{i}", a)
    reader = LatentCacheReader(tmp_path)
    keys = ["k7", "k2", "k9"]
    assert np.array_equal(reader.gather(keys), np.stack([arrays[7], arrays[2], arrays[9]]))
    assert reader.gather_torch(keys).dtype == torch.float16


def test_gather_into_a_reused_buffer(tmp_path):
    arrays = [np.full((2, 3), i, np.float32) for i in range(5)]
    tensors = [torch.full((4,), i + 0.5, dtype=torch.bfloat16) for i in range(5)]
    with LatentCacheWriter(tmp_path) as writer:
        for i in range(5):
            writer.put(f"a{i}", arrays[i])
            writer.put(f"t{i}", tensors[i])
    reader = LatentCacheReader(tmp_path)
    out = np.full((2, 2, 3), -1, np.float32)
    for keys in (["a4", "a1"], ["a0", "a3"]):
        assert reader.gather(keys, out=out) is out
        assert np.array_equal(out, np.stack([arrays[int(k[1])] for k in keys]))
    out_t = torch.zeros(2, 4, dtype=torch.bfloat16)
    assert reader.gather_torch(["t3", "t2"], out=out_t) is out_t
    assert torch.equal(out_t, torch.stack([tensors[3], tensors[2]]))
    for bad in (np.empty((3, 2, 3), np.float32), np.empty((2, 2, 3), np.float64), np.empty((2, 3, 2), np.float32).transpose(0, 2, 1)):
        with pytest.raises(ValueError, match="`out` must be a C-contiguous CPU buffer of shape \\(2, 2, 3\\)"):
            reader.gather(["a0", "a1"], out=bad)


def test_corrupt_shard_is_reported_never_served_and_rebuilt(tmp_path):
    with LatentCacheWriter(tmp_path, writer="rank0", shard_bytes=1) as writer:
        writer.put("x", np.ones(16, np.float32))
        writer.put("y", np.full(16, 2, np.float32))
    shard = tmp_path / "rank0-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x55
    shard.write_bytes(bytes(data))

    reader = LatentCacheReader(tmp_path)
    with pytest.raises(CorruptShardError, match=r"corrupt cache shard `.*rank0-00000\.safetensors`: crc32"):
        reader.get("x")
    assert reader.get("y")[0] == 2
    failures = verify(tmp_path)
    assert [p.name for p, _ in failures] == ["rank0-00000.safetensors"]

    assert [p.name for p, _ in verify(tmp_path, repair=True)] == ["rank0-00000.safetensors"]
    assert verify(tmp_path) == []
    with LatentCacheWriter(tmp_path, writer="rank0") as writer:
        assert "x" not in writer and "y" in writer
        writer.put("x", np.ones(16, np.float32))
    assert LatentCacheReader(tmp_path).get("x")[0] == 1


def test_duplicate_key_is_refused(tmp_path):
    with LatentCacheWriter(tmp_path) as writer:
        writer.put("a", np.zeros(2, np.float32))
        with pytest.raises(DuplicateKeyError, match="key `a` was already written"):
            writer.put("a", np.zeros(2, np.float32))


def test_writers_of_several_ranks_share_a_directory(tmp_path):
    for rank in range(2):
        with LatentCacheWriter(tmp_path, writer=f"rank{rank}") as writer:
            writer.put(f"r{rank}", np.full(4, rank, np.int32))
    reader = LatentCacheReader(tmp_path)
    assert reader.keys() == ["r0", "r1"] and reader.get("r1")[0] == 1


def test_kill_9_leaves_only_committed_shards_and_a_rerun_finishes(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, numpy as np
        from lcm_plugin.cache import LatentCacheWriter
        writer = LatentCacheWriter({str(tmp_path)!r}, shard_bytes=10_000)
        for i in range(100):
            writer.put(f"k{{i}}", np.full(1000, i, np.float32))  # 4 kB: a shard every 3 keys
            if i == 50:
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert verify(tmp_path) == []
    reader = LatentCacheReader(tmp_path)
    committed = set(reader.keys())
    assert committed == {f"k{i}" for i in range(51)}  # 17 shards of 3 keys sealed before the kill
    with LatentCacheWriter(tmp_path, shard_bytes=10_000) as writer:
        for i in range(100):
            if f"k{i}" not in writer:
                writer.put(f"k{i}", np.full(1000, i, np.float32))
    reader = LatentCacheReader(tmp_path)
    assert len(reader) == 100 and all(reader.get(f"k{i}")[0] == i for i in range(100))


def run_python(code: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter (a crash there is a return code, not a dead test run)."""
    command = [*prefix, sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def one_shard(folder, **arrays) -> Path:
    with LatentCacheWriter(folder, writer="w") as writer:
        for key, value in arrays.items():
            writer.put(key, value)
    return Path(folder) / "w-00000.safetensors"


def test_in_place_op_on_a_get_torch_tensor_is_private(tmp_path):
    """Was: SIGSEGV (a writable tensor over a read-only map)."""
    shard = one_shard(tmp_path, x=np.arange(4096, dtype=np.float32), b=torch.ones(8, dtype=torch.bfloat16))
    before = shard.read_bytes()
    proc = run_python(
        f"""
        import numpy as np, torch, warnings
        warnings.simplefilter("error")  # no "not writable" warning either
        from lcm_plugin.cache import LatentCacheReader
        reader = LatentCacheReader({str(tmp_path)!r})
        t = reader.get_torch("x")
        t.mul_(2)
        assert torch.equal(t, torch.arange(4096, dtype=torch.float32) * 2)
        assert torch.equal(reader.get_torch("x"), torch.arange(4096, dtype=torch.float32))
        assert reader.get("x")[5] == 5
        b = reader.get_torch("b")
        b.add_(1)
        assert b.dtype == torch.bfloat16 and b[0] == 2 and reader.get_torch("b")[0] == 1
        print("ok")
        """
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "ok"), proc.stderr
    assert shard.read_bytes() == before


def test_a_shard_truncated_while_mapped_raises_instead_of_sigbus(tmp_path):
    """Was: SIGBUS when the mapped pages past the new end were read."""
    shard = one_shard(tmp_path, x=np.ones(65536, np.float32), y=np.full(65536, 2, np.float32))
    proc = run_python(
        f"""
        import os
        from lcm_plugin.cache import CorruptShardError, LatentCacheReader
        reader = LatentCacheReader({str(tmp_path)!r})
        assert float(reader.get("x").sum()) == 65536
        os.truncate({str(shard)!r}, 1000)
        for read in (lambda: reader.get("y").sum(), lambda: reader.get_torch("y").sum(), lambda: reader.gather(["y"]).sum()):
            try:
                read()
            except CorruptShardError as error:
                assert "changed on disk since the cache was opened" in str(error), error
            else:
                raise SystemExit("served a truncated shard")
        print("ok")
        """
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "ok"), proc.stderr


def test_a_same_size_overwrite_after_the_first_check_is_not_served(tmp_path):
    """Was: served unchecked (the CRC is read once per shard)."""
    shard = one_shard(tmp_path, x=np.ones(1024, np.float32))
    reader = LatentCacheReader(tmp_path)
    assert reader.get("x")[0] == 1
    stamp = os.stat(shard)
    data = bytearray(shard.read_bytes())
    data[-4:] = np.float32(7).tobytes()
    # Rewrite in place until the filesystem's timestamps move (their clock can be coarser than one write).
    while (os.stat(shard).st_mtime_ns, os.stat(shard).st_ctime_ns) == (stamp.st_mtime_ns, stamp.st_ctime_ns):
        with open(shard, "r+b") as f:
            f.write(data)
    assert os.stat(shard).st_size == stamp.st_size
    for read in (reader.get, reader.get_torch, lambda k: reader.gather([k])):
        with pytest.raises(CorruptShardError, match="changed on disk since the cache was opened"):
            read("x")
    assert LatentCacheReader(tmp_path, verify=False).get("x")[-1] == 7  # a fresh reader sees the new file


def test_gather_checks_dtype_and_shape_of_every_key(tmp_path):
    """Was: (4,2,3) and (4,3,2), or f32 and i32 of one size, stacked without an error."""
    with LatentCacheWriter(tmp_path) as writer:
        writer.put("a", np.zeros((4, 2, 3), np.float32))
        writer.put("b", np.zeros((4, 3, 2), np.float32))
        writer.put("c", np.zeros((4, 2, 3), np.int32))
    reader = LatentCacheReader(tmp_path)
    with pytest.raises(ValueError, match=r"gather: key `b` is F32 \[4, 3, 2\], but key `a` is F32 \[4, 2, 3\]"):
        reader.gather(["a", "b"])
    with pytest.raises(ValueError, match=r"gather: key `c` is I32 \[4, 2, 3\], but key `a` is F32"):
        reader.gather_torch(["a", "c"])
    with pytest.raises(ValueError, match="key `c` is I32"):
        reader.gather(["a", "c"], out=np.empty((2, 4, 2, 3), np.float32))


def craft_index(folder: Path, records: list[dict]) -> None:
    index = {"format": "lcm-latent-cache", "format_version": 2, "writer": "w", "shards": records}
    (folder / "index.w.json").write_text(json.dumps(index))


def test_repair_never_deletes_outside_the_cache(tmp_path):
    """Was: `verify(repair=True)` deleted `../victim`, absolute paths and symlink targets named by an index."""
    cache = tmp_path / "cache"
    cache.mkdir()
    victims = []
    for name in ("traversal", "absolute", "linked"):
        victim = tmp_path / f"{name}.txt"
        victim.write_bytes(b"precious")
        victims.append(victim)
    (cache / "w-00001.safetensors").symlink_to(victims[2])
    bad = {"bytes": 3, "crc32": 0, "keys": []}  # wrong size and CRC: a repair would delete a real shard
    craft_index(
        cache,
        [
            {"file": "../traversal.txt", **bad, "keys": ["a"]},
            {"file": str(victims[1]), **bad, "keys": ["b"]},
            {"file": "w-00001.safetensors", **bad, "keys": ["c"]},
        ],
    )
    report = check_cache(cache)
    assert [(p.kind, p.action) for p in report.problems] == [("foreign", "reported")] * 3
    assert "not a shard name of writer `w`" in report.problems[0].reason
    assert "symbolic link" in report.problems[2].reason
    assert len(verify(cache, repair=True)) == 3
    assert check_cache(cache, repair=True, remove_orphans=True).problems == []
    assert all(v.read_bytes() == b"precious" for v in victims)
    assert (cache / "w-00001.safetensors").is_symlink()
    assert json.loads((cache / "index.w.json").read_text())["shards"] == []


def test_unreadable_shards_are_reported_and_kept(tmp_path):
    """Was: a permission error (or EIO, a network hiccup) got the shard deleted by the repair."""
    folder = tmp_path / "cache"
    shard = one_shard(folder, x=np.ones(16, np.float32))
    shard.chmod(0)
    code = f"""
        from lcm_plugin.cache import check_cache, verify
        [(_, reason)] = verify({str(folder)!r}, repair=True)
        print([(p.kind, p.action, "Permission denied" in reason) for p in check_cache({str(folder)!r}, repair=True).problems])
        """
    # Root reads any file: without the capabilities that bypass permissions it gets a real EACCES.
    no_bypass = ("setpriv", *(f"--{s}=-dac_override,-dac_read_search" for s in ("inh-caps", "bounding-set")))
    proc = run_python(code, no_bypass if os.getuid() == 0 else ())
    assert proc.stdout.strip() == "[('unreadable', 'kept', True)]", proc.stderr
    assert shard.exists()
    shard.chmod(0o644)
    assert LatentCacheReader(folder).get("x")[0] == 1


def test_orphans_are_reported_and_removed_only_on_request(tmp_path):
    one_shard(tmp_path, x=np.ones(4, np.float32))
    for name in ("w-00005.safetensors", "w-00006.safetensors.tmp", "notes.txt"):
        (tmp_path / name).write_bytes(b"partial")
    report = check_cache(tmp_path, full=False)
    assert report.ok and report.shards == 1
    assert sorted(p.name for p in report.orphans) == ["w-00005.safetensors", "w-00006.safetensors.tmp"]
    assert (tmp_path / "w-00005.safetensors").exists()
    report = check_cache(tmp_path, full=False, remove_orphans=True)
    assert sorted(p.name for p in report.removed_orphans) == ["w-00005.safetensors", "w-00006.safetensors.tmp"]
    assert not (tmp_path / "w-00005.safetensors").exists() and (tmp_path / "notes.txt").exists()


def test_a_writer_name_is_locked_across_processes(tmp_path):
    """Was: two processes writing as `rank0` overwrote each other's index."""
    code = f"""
        from lcm_plugin.cache import LatentCacheWriter, WriterLockedError
        try:
            LatentCacheWriter({str(tmp_path)!r}, writer="rank0")
        except WriterLockedError as error:
            print(error)
        else:
            print("opened")
        """
    writer = LatentCacheWriter(tmp_path, writer="rank0")
    writer.put("a", np.zeros(2, np.float32))
    proc = run_python(code)
    assert f"cache `{tmp_path}` is already being written as writer `rank0`" in proc.stdout, proc.stderr
    assert "give each process its own writer name" in proc.stdout
    with pytest.raises(WriterLockedError):
        LatentCacheWriter(tmp_path, writer="rank0")  # a second writer in this process too
    writer.close()
    assert run_python(code).stdout.strip() == "opened"
    assert LatentCacheReader(tmp_path).keys() == ["a"]


def test_shards_are_plain_safetensors_with_the_index_crc(tmp_path):
    from safetensors.numpy import load_file

    shard = one_shard(tmp_path, lat=np.arange(24, dtype=np.float16).reshape(2, 3, 4), ids=np.arange(6, dtype=np.int64))
    loaded = load_file(str(shard))
    assert np.array_equal(loaded["lat"], np.arange(24, dtype=np.float16).reshape(2, 3, 4))
    assert np.array_equal(loaded["ids"], np.arange(6))
    record = json.loads((tmp_path / "index.w.json").read_text())["shards"][0]
    assert record["crc32"] == zlib.crc32(shard.read_bytes()) and record["bytes"] == shard.stat().st_size


def test_cheap_check_reads_only_shards_whose_mtime_moved(tmp_path):
    shard = one_shard(tmp_path, x=np.ones(1024, np.float32))
    stat = os.stat(shard)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert check_cache(tmp_path, full=False).ok  # size and mtime as committed: trusted
    assert [p.kind for p in check_cache(tmp_path).problems] == ["corrupt"]
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert [p.kind for p in check_cache(tmp_path, full=False).problems] == ["corrupt"]
