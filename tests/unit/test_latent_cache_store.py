"""Sharded latent cache: round trips, zero-copy views, checksums, crash safety."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from lcm_plugin.cache import (
    CorruptShardError,
    DuplicateKeyError,
    LatentCacheReader,
    LatentCacheWriter,
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
