"""Python face of the Rust data path (`lcm_plugin._latent_cache`): header scan, SimpleTuner-identical aspect
bucketing, batch decode, and the sharded memory-mapped latent cache. See docs/data-path.md.

Tensors are stored with their safetensors dtype names; numpy arrays and torch tensors (bf16 included) go in,
read-only zero-copy numpy views (or torch tensors over them) come out.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
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
    ImageTooLargeError,
    LatentCacheError,
    MissingKeyError,
    decode_batch,
    decode_batch_bytes,
    read_header,
    scan_sizes,
)
from lcm_plugin._latent_cache import verify as _verify

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FORMAT_VERSION",
    "BucketConfigError",
    "Bucketer",
    "CacheFormatError",
    "CacheIOError",
    "CorruptShardError",
    "DuplicateKeyError",
    "ImageDecodeError",
    "ImageTooLargeError",
    "LatentCacheError",
    "LatentCacheReader",
    "LatentCacheWriter",
    "MissingKeyError",
    "decode_batch",
    "decode_batch_bytes",
    "read_header",
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
    import torch

    with warnings.catch_warnings():
        # Views over the read-only memory map: torch warns that writing to them is undefined, which we never do.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
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

    Use one `writer` name per process (e.g. `rank{N}`); `key in writer` tells whether any writer of the
    directory already committed the key (resumable builds). Leaving the `with` block commits.
    """

    def __init__(self, directory: str | os.PathLike, writer: str = "rank0", shard_bytes: int = 256 << 20):
        self.directory = Path(directory)
        self._writer = CacheWriter(str(self.directory), writer, shard_bytes)

    def put(self, key: str, value: Any) -> None:
        """Queues `value` ([C, H, W] latent, embedding, ...) under `key`."""
        dtype, shape, data = _as_bytes(value)
        self._writer.put(key, dtype, shape, data)

    def commit(self) -> None:
        """Seals what is pending into a shard (temp file, fsync, rename) and commits the index."""
        self._writer.commit()

    def __contains__(self, key: str) -> bool:
        return key in self._writer

    @property
    def shard_count(self) -> int:
        return self._writer.shard_count

    def __enter__(self) -> LatentCacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.commit()


class LatentCacheReader:
    """Random access by key over every writer's shards, memory-mapped.

    `get` returns a read-only numpy view into the map (no copy); `gather` copies a batch into one new array.
    With `verify` (default), a shard's size and CRC-32 are checked on its first use; a failing shard raises
    `CorruptShardError` and is never served.
    """

    def __init__(self, directory: str | os.PathLike, verify: bool = True):
        self.directory = Path(directory)
        self._reader = CacheReader(str(self.directory), verify)
        self._shards: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._reader)

    def __contains__(self, key: str) -> bool:
        return key in self._reader

    def keys(self) -> list[str]:
        return self._reader.keys()

    def get(self, key: str) -> np.ndarray:
        """Zero-copy, read-only view of `key` (BF16 comes as uint16 bits; use `get_torch`)."""
        return self._view(key)[0]

    def get_torch(self, key: str) -> torch.Tensor:
        """`get` as a torch tensor sharing the mapped memory (read-only by contract)."""
        return _to_torch(*self._view(key))

    def _view(self, key: str) -> tuple[np.ndarray, str]:
        """(zero-copy view of `key`, its safetensors dtype name), from one lookup."""
        shard, offset, nbytes, dtype, shape = self._reader.locate(key)
        data = self._shards.get(shard)
        if data is None:
            data = self._shards[shard] = self._reader.shard_array(shard)
        return data[offset : offset + nbytes].view(_SAFETENSORS_TO_NUMPY[dtype]).reshape(shape), dtype

    def gather(self, keys: Sequence[str], out: np.ndarray | None = None) -> np.ndarray:
        """One contiguous `[N, *shape]` copy of same-shaped tensors, copied in parallel without the GIL.

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


def verify(directory: str | os.PathLike, repair: bool = False) -> list[tuple[Path, str]]:
    """(shard path, reason) for every shard failing its presence/size/CRC/header check. `repair` deletes them and
    drops them from their index, so a rebuild re-encodes their keys."""
    return [(Path(p), reason) for p, reason in _verify(str(directory), repair)]
