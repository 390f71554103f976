"""SimpleTuner 4.10's own cache files, written so that the stock trainer finds everything cached.

- VAE cache (VAECache.generate_vae_cache_filename, hash_filenames always on): one `torch.save` file per image,
  `<cache_dir_vae>/<subfolders>/<sha256(file stem)>.pt`, the subfolders being the image's folder below
  instance_data_dir; a single tensor [4, H/8, W/8] in the VAE dtype.
- Text cache (TextEmbeddingCache.create_hash for SDXL: keyed by caption, no namespace or context):
  `<cache_dir>/<md5(caption)>-sdxl.pt` = {"prompt_embeds": [1, 77, D], "pooled_prompt_embeds": [P]}.
- Both gzip-compressed when the dataset's compress_cache (else config.json's compress_disk_cache) is on, as
  LocalDataBackend.torch_save does.
- Bucket metadata (DiscoveryMetadataBackend.save_cache / save_image_metadata), in instance_data_dir (for an S3
  dataset, in its bucket under aws_data_prefix):
  `aspect_ratio_bucket_indices_<suffix>.json` (the suffix: cache_file_suffix, else the id) = {"config": {},
  "aspect_ratio_bucket_indices": {bucket: [paths]}}
  and `aspect_ratio_bucket_metadata_<suffix>.json` = {path: {original_size, crop_coordinates, target_size,
  intermediary_size, aspect_ratio}}. An empty "config" skips SimpleTuner's comparison with a previous dataset
  config; the trainer writes its own on its next save.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lcm_plugin.cache_build.layout import text_key
from lcm_plugin.cache_build.plan import Dataset


def vae_cache_path(dataset: Dataset, image: Path) -> Path:
    """Where SimpleTuner's VAECache looks for the latent of the image file `image` (inside the dataset folder)."""
    name = hashlib.sha256(image.stem.encode()).hexdigest() + ".pt"
    return dataset.vae_cache_dir / image.parent.relative_to(dataset.data_dir) / name


def text_cache_path(folder: Path, caption: str) -> Path:
    """Where SimpleTuner's TextEmbeddingCache looks for the SDXL embeddings of `caption`."""
    return folder / f"{text_key(caption)}-sdxl.pt"


def save_torch(path: Path, value, compress: bool) -> None:
    """`torch.save` (gzipped when `compress`) to a temp file, fsync, rename: a kill never leaves half a file."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    data = gzip.compress(buffer.getvalue(), mtime=0) if compress else buffer.getvalue()  # no time in the header
    write_atomic(path, data)


def write_atomic(path: Path, data: bytes) -> None:
    write_atomic_parts(path, (data,))


def write_atomic_parts(path: Path, parts) -> None:
    """`parts` (bytes, or str written as UTF-8) one after the other to a temp file, fsync, rename: a kill never
    leaves half a file, and the whole never needs to be in memory at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "wb") as file:
        for part in parts:
            file.write(part.encode() if isinstance(part, str) else part)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


BUCKET_FILE_NAMES = ("aspect_ratio_bucket_indices", "aspect_ratio_bucket_metadata")


def _file_names(dataset: Dataset) -> list[str]:
    suffix = "" if dataset.bucket_file_suffix is None else f"_{dataset.bucket_file_suffix}"
    return [f"{name}{suffix}.json" for name in BUCKET_FILE_NAMES]


def bucket_files(dataset: Dataset) -> tuple[Path, Path]:
    """(bucket index, image metadata) file paths of a local `dataset`, in its instance_data_dir."""
    return tuple(dataset.data_dir / name for name in _file_names(dataset))


def bucket_keys(dataset: Dataset) -> tuple[str, str]:
    """(bucket index, image metadata) object keys of an S3 `dataset`, in its bucket: SimpleTuner's factory names them
    `Path(os.path.join(aws_data_prefix, name) + "_<suffix>.json")` and its S3 backend takes `str()` of that."""
    return tuple(str(Path(os.path.join(dataset.remote.prefix, name))) for name in _file_names(dataset))


def bucket_metadata(dataset: Dataset) -> dict[str, dict]:
    """SimpleTuner's discovery metadata of every planned image of `dataset`: image path -> metadata."""
    return dataset.images.table.bucket_files([])[2]


@dataclass
class WrittenIndex:
    """SimpleTuner's bucket index file of a local dataset as `write_bucket_metadata` wrote it: its absolute path, its
    stamp as written and how many images each of its buckets holds."""

    name: str
    stamp: tuple
    sizes: dict[str, int]

    def is_loaded_in(self, asked, buckets) -> bool:
        """Whether `asked` (SimpleTuner's `cache_file`) names this file, nobody rewrote it since, and `buckets` (its
        `aspect_ratio_bucket_indices`) have this file's buckets and sizes: what SimpleTuner read from it."""
        return (isinstance(buckets, dict) and os.path.abspath(asked) == self.name
                and file_stamp(self.name) == self.stamp
                and {str(bucket): len(paths) for bucket, paths in buckets.items()} == self.sizes)


@dataclass
class WrittenMetadata:
    """SimpleTuner's bucket metadata file as `write_bucket_metadata` wrote it: its absolute path (or, for an S3
    dataset, its key in `bucket`), its stamp as written and what it holds, as `json.loads` would give it back; for a
    local dataset, the bucket index file written with it."""

    name: str
    stamp: tuple
    metadata: dict
    bucket: object | None = None  # lcm_plugin.cache.S3Bucket
    index: WrittenIndex | None = None

    def is_unchanged(self, asked) -> bool:
        """Whether `asked` (SimpleTuner's `metadata_file`) names this file and nobody rewrote it since."""
        if self.bucket is None:
            return os.path.abspath(asked) == self.name and file_stamp(self.name) == self.stamp
        from lcm_plugin.cache import LatentCacheError

        try:
            return str(asked) == self.name and self.bucket.head(self.name) == self.stamp
        except LatentCacheError:  # unreachable now: SimpleTuner reads the object itself, and reports
            return False


def write_bucket_metadata(dataset: Dataset, failed: list[int]) -> WrittenMetadata:
    """SimpleTuner's bucket files for the planned images of `dataset` but the `failed` positions (made in Rust,
    as `json.dumps` writes them), in its folder, or in its bucket for an S3 dataset (where SimpleTuner keeps them)."""
    from lcm_plugin.cache_build.faults import fault_point

    indices, metadata_text, metadata = dataset.images.table.bucket_files(failed)
    if dataset.remote is not None:
        bucket = dataset.remote.bucket
        index_key, metadata_key = bucket_keys(dataset)
        bucket.put(index_key, indices)
        fault_point("buckets")
        e_tag = bucket.put(metadata_key, metadata_text)
        return WrittenMetadata(metadata_key, (len(metadata_text), e_tag), metadata, bucket)
    index_file, metadata_file = bucket_files(dataset)
    write_atomic(index_file, indices)
    index = WrittenIndex(os.path.abspath(index_file), file_stamp(index_file), bucket_sizes(dataset, failed))
    fault_point("buckets")
    write_atomic(metadata_file, metadata_text)
    return WrittenMetadata(os.path.abspath(metadata_file), file_stamp(metadata_file), metadata, index=index)


def bucket_sizes(dataset: Dataset, failed: list[int]) -> dict[str, int]:
    """How many images each bucket of `dataset`'s bucket index file holds (its planned images but the `failed`
    positions)."""
    import numpy as np

    table = dataset.images.table
    sizes: dict[str, int] = {}
    for bucket, positions in table.batches(max(1, len(table))):
        sizes[bucket] = sizes.get(bucket, 0) + len(positions) - int(np.isin(positions, failed).sum())
    return {bucket: size for bucket, size in sizes.items() if size}


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(size, mtime_ns, inode) of `path`, None when it is gone."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns, stat.st_ino
