"""Python face of the Rust data path (`lcm_plugin._latent_cache`): header scan, SimpleTuner-identical aspect
bucketing, batch decode, and the sharded memory-mapped latent cache. See docs/data-path.md.

Tensors are stored with their safetensors dtype names; numpy arrays and torch tensors (bf16 included) go in,
read-only zero-copy numpy views (or torch tensors over them) come out.

Integrity and safety (docs/cache-build.md "Integrity and safety"): `check_cache` (cheap or full check, repair
that deletes only this cache's proven-bad shards, orphan report and removal on request) and `verify` (its
full-check shorthand); a writer name is locked while written (`WriterLockedError`); `get_torch` tensors are
private copy-on-write memory; nothing is served from a shard changed on disk since the reader opened it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lcm_plugin._latent_cache import (
    DEFAULT_MAX_PIXELS,
    FORMAT_VERSION,
    BucketConfigError,
    Bucketer,
    CacheFormatError,
    CacheIOError,
    CacheReader,
    CacheWriter,
    CorruptShardError,
    DuplicateKeyError,
    ImageDecodeError,
    ImageTable,
    Inventory,
    ImageTooLargeError,
    LatentCacheError,
    MissingKeyError,
    RemoteReadError,
    S3Bucket,
    ServedImages,
    WriterLockedError,
    decode_batch,
    decode_batch_bytes,
    inventory_of_memo,
    read_header,
    scan_blobs,
    scan_inventory,
    scan_sizes,
)
from lcm_plugin._latent_cache import check as _check
from lcm_plugin._latent_cache import verify as _verify

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FORMAT_VERSION",
    "BucketConfigError",
    "Bucketer",
    "CacheFormatError",
    "CacheReport",
    "CacheIOError",
    "CorruptShardError",
    "DuplicateKeyError",
    "ImageDecodeError",
    "ImageTable",
    "ImageTooLargeError",
    "Inventory",
    "inventory_of_memo",
    "LatentCacheError",
    "LatentCacheReader",
    "LatentCacheWriter",
    "MissingKeyError",
    "RemoteReadError",
    "S3Bucket",
    "ServedImages",
    "ShardProblem",
    "WriterLockedError",
    "check_cache",
    "decode_batch",
    "decode_batch_bytes",
    "read_header",
    "scan_blobs",
    "scan_inventory",
    "scan_sizes",
    "verify",
]

_NUMPY_TO_SAFETENSORS = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
    np.dtype(np.int16): "I16",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
    np.dtype(np.float16): "F16",
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
}
# BF16 has no numpy dtype: its bits travel as uint16 and become torch.bfloat16 on the way out.
_SAFETENSORS_TO_NUMPY = {v: k for k, v in _NUMPY_TO_SAFETENSORS.items()} | {"BF16": np.dtype(np.uint16)}


def _as_bytes(value: Any) -> tuple[str, list[int], np.ndarray]:
    """(safetensors dtype, shape, flat uint8 view) of a numpy array or torch tensor."""
    if not isinstance(value, np.ndarray):
        import torch

        if not isinstance(value, torch.Tensor):
            raise TypeError(f"expected a numpy array or torch tensor, got {type(value).__name__}")
        tensor = value.detach().to("cpu").contiguous()
        if tensor.dtype == torch.bfloat16:
            return "BF16", list(tensor.shape), tensor.view(torch.int16).numpy().reshape(-1).view(np.uint8)
        value = tensor.numpy()
    array = np.ascontiguousarray(value)
    dtype = _NUMPY_TO_SAFETENSORS.get(array.dtype)
    if dtype is None:
        raise TypeError(f"dtype {array.dtype} cannot be cached; use one of {sorted(map(str, _NUMPY_TO_SAFETENSORS))}")
    return dtype, list(array.shape), array.reshape(-1).view(np.uint8)


def _to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Tensor sharing `array`'s memory, which must be writable (private or owned): torch tensors have no read-only
    mode, so an in-place op on a tensor over the shared read-only map would crash the process."""
    import torch

    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "BF16" else tensor


def _check_out(shape: tuple, dtype: Any, contiguous: bool, want_shape: tuple, want_dtype: Any) -> None:
    """Raises ValueError naming what a gather `out` buffer has and needs."""
    if tuple(shape) != tuple(want_shape) or dtype != want_dtype or not contiguous:
        raise ValueError(
            f"gather: `out` must be a C-contiguous CPU buffer of shape {tuple(want_shape)} and dtype {want_dtype}, "
            f"got shape {tuple(shape)}, dtype {dtype}, contiguous {contiguous}"
        )


class LatentCacheWriter:
    """Appends tensors to a cache directory; shards are sealed atomically every `shard_bytes`.

    Use one `writer` name per process (e.g. `rank{N}`): the name is locked (flock) until `close`, and a second
    writer of the same name on the same directory, in any process, raises `WriterLockedError`. `key in writer`
    tells whether any writer of the directory already committed the key (resumable builds). Leaving the `with`
    block closes (commits, compacts the index journal, releases the lock).
    """

    def __init__(self, directory: str | os.PathLike, writer: str = "rank0", shard_bytes: int = 256 << 20):
        self.directory = Path(directory)
        self._writer = CacheWriter(str(self.directory), writer, shard_bytes)

    def put(self, key: str, value: Any) -> None:
        """Queues `value` ([C, H, W] latent, embedding, ...) under `key`."""
        dtype, shape, data = _as_bytes(value)
        self._writer.put(key, dtype, shape, data)

    def commit(self) -> None:
        """Seals what is pending into a shard (temp file, fsync, rename) and appends it to the index journal."""
        self._writer.commit()

    def close(self) -> None:
        """Commits, compacts the index journal into `index.<writer>.json` and releases the writer lock; idempotent."""
        self._writer.close()

    def __contains__(self, key: str) -> bool:
        return key in self._writer

    @property
    def shard_count(self) -> int:
        return self._writer.shard_count

    def __enter__(self) -> LatentCacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


class LatentCacheReader:
    """Random access by key over every writer's shards, memory-mapped.

    `get` returns a read-only numpy view into the shared map (no copy); `get_torch` a tensor over a private
    copy-on-write map of the key (no copy until written); `gather` copies a batch into one new array. Every call
    first checks that the shard file is the one opened (size, mtime, ctime, inode): a shard truncated, rewritten
    or replaced since raises `CorruptShardError` instead of serving it. With `verify` (default), a shard's
    CRC-32 is also checked on its first use; a failing shard is never served.
    """

    def __init__(self, directory: str | os.PathLike, verify: bool = True):
        self.directory = Path(directory)
        self._reader = CacheReader(str(self.directory), verify)
        self._shards: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._reader)

    @property
    def native(self) -> CacheReader:
        """The Rust reader, for the Rust calls that read the store themselves (`ImageTable.serve`)."""
        return self._reader

    def __contains__(self, key: str) -> bool:
        return key in self._reader

    def keys(self) -> list[str]:
        return self._reader.keys()

    def get(self, key: str) -> np.ndarray:
        """Zero-copy, read-only view of `key` (BF16 comes as uint16 bits; use `get_torch`)."""
        return self._view(key)[0]

    def get_torch(self, key: str) -> torch.Tensor:
        """`key` as a torch tensor over a private copy-on-write mapping of its bytes: zero-copy until written, and
        in-place ops (`t.mul_(s)`) change neither the file nor what any later call returns."""
        data, dtype, shape = self._reader.private_array(key)
        return _to_torch(data.view(_SAFETENSORS_TO_NUMPY[dtype]).reshape(shape), dtype)

    def _view(self, key: str) -> tuple[np.ndarray, str]:
        """(zero-copy view of `key`, its safetensors dtype name), from one lookup."""
        shard, offset, nbytes, dtype, shape = self._reader.locate(key)
        data = self._shards.get(shard)
        if data is None:
            data = self._shards[shard] = self._reader.shard_array(shard)
        return data[offset : offset + nbytes].view(_SAFETENSORS_TO_NUMPY[dtype]).reshape(shape), dtype

    def gather(self, keys: Sequence[str], out: np.ndarray | None = None) -> np.ndarray:
        """One contiguous `[N, *shape]` copy of tensors of one dtype and shape (checked for every key: a mismatch
        raises `ValueError` naming both keys), read in parallel without the GIL.

        `out`: a C-contiguous `[N, *shape]` array of the stored dtype to fill instead of allocating one; a loader
        that reuses its batch buffer skips the page faults of fresh memory. Returns the filled array.
        """
        if not keys:
            raise ValueError("gather needs at least one key")
        _, _, _, dtype, shape = self._reader.locate(keys[0])
        np_dtype = np.dtype(_SAFETENSORS_TO_NUMPY[dtype])
        if out is None:
            return self._reader.gather(list(keys)).view(np_dtype).reshape(len(keys), *shape)
        _check_out(out.shape, out.dtype, out.flags.c_contiguous, (len(keys), *shape), np_dtype)
        self._reader.gather(list(keys), out.reshape(-1).view(np.uint8))
        return out

    def gather_torch(self, keys: Sequence[str], out: torch.Tensor | None = None) -> torch.Tensor:
        """`gather` as a torch tensor (owns its memory); `out` is a contiguous CPU tensor to fill, as in `gather`."""
        if not keys:
            raise ValueError("gather needs at least one key")
        _, _, _, dtype, shape = self._reader.locate(keys[0])
        if out is None:
            return _to_torch(self.gather(keys), dtype)
        import torch

        torch_dtype = _to_torch(np.empty(0, _SAFETENSORS_TO_NUMPY[dtype]), dtype).dtype
        _check_out(tuple(out.shape), out.dtype, out.is_contiguous() and out.device.type == "cpu", (len(keys), *shape), torch_dtype)
        self._reader.gather(list(keys), out.view(-1).view(torch.uint8).numpy())
        return out

    def close(self) -> None:
        """Drops this object's references; views handed out stay valid (they keep the map alive)."""
        self._shards.clear()

    def __enter__(self) -> LatentCacheReader:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


@dataclass(frozen=True)
class ShardProblem:
    """One shard that failed its check. `kind`: "corrupt" (missing, size, CRC, header: proven bad), "unreadable"
    (permission denied, I/O error, ...: may be transient), "foreign" (an index entry naming a file this cache never
    writes: bad name, path outside the folder, symlink, not a regular file). `action`: "reported" (no repair),
    "deleted" (file removed, entry dropped), "dropped" (entry dropped, file not touched), "kept" (unreadable, or
    the writer is held by a running process)."""

    path: Path
    kind: str
    reason: str
    action: str


@dataclass(frozen=True)
class CacheReport:
    """What `check_cache` found. Orphans (shard and temp files no index lists, e.g. after a kill) are not
    problems: they never hide or corrupt an entry."""

    problems: list[ShardProblem] = field(default_factory=list)
    orphans: list[Path] = field(default_factory=list)
    removed_orphans: list[Path] = field(default_factory=list)
    shards: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_cache(
    directory: str | os.PathLike, *, full: bool = True, repair: bool = False, remove_orphans: bool = False
) -> CacheReport:
    """Checks every shard of a cache folder: name (a shard name of its index's writer, so inside the folder),
    regular file, size, safetensors header, CRC-32.

    `full=False` is the cheap resume check: the CRC is read only for shards whose mtime differs from the one
    recorded at commit (a same-size rewrite that restores the mtime is then missed; `full=True` reads every
    byte, streaming, with memory bounded per thread whatever the shard size).
    `repair`: for each writer no running process holds, corrupt shards are deleted and dropped from the index,
    foreign entries dropped (their files never touched), unreadable shards kept; shards that passed with a stale
    mtime get it recorded. `remove_orphans`: orphaned shards and temp files of such writers are deleted.
    """
    problems, orphans, removed, shards = _check(str(directory), full, repair, remove_orphans)
    return CacheReport(
        problems=[ShardProblem(Path(p), kind, reason, action) for p, kind, reason, action in problems],
        orphans=[Path(p) for p in orphans],
        removed_orphans=[Path(p) for p in removed],
        shards=shards,
    )


def verify(directory: str | os.PathLike, repair: bool = False) -> list[tuple[Path, str]]:
    """(shard path, reason) for every shard failing a full `check_cache`; `repair` as there."""
    return [(Path(p), reason) for p, reason in _verify(str(directory), repair)]
