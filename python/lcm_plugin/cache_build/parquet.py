"""Image sizes and captions from a dataset's parquet file: SimpleTuner's `metadata_backend: parquet` (and
`caption_strategy: parquet`), read by column instead of row by row.

SimpleTuner 4.10.1 never opens an image of such a dataset to bucket it: `ParquetMetadataBackend._process_for_bucket`
takes its original size from the row of the parquet whose `filename_column` is the image's id, and
`PromptHandler.prepare_instance_prompt_from_parquet` its captions from `_extract_captions_to_fast_list`. The two
name an image differently, and both are mirrored here string operation for string operation:
- sizes: the file name's stem (`identifier_includes_extension` false, the default) or the whole path with the
  dataset folder cut out; the first row of an id wins (`DataFrame.loc` on a repeated index);
- captions: the path with the dataset folder cut out, its extension dropped unless `identifier_includes_extension`;
  the last row of an id wins (a dict filled row by row, a blank cell skipped); a caption cell is a string or a list
  of strings, each value stripped and the blank ones dropped (`PromptHandler._caption_payload_values`).
What the mirror does not cover stops the build with the key that asks for it, and the trainer then leaves the
dataset to SimpleTuner: JSON / JSON-lines files, a list of caption columns, `aspect_ratio_column` and
`bbox_column`, ids that are not strings, sizes that are not integers, empty (null) cells.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lcm_plugin.config.problems import pointer

_UNCOVERED_KEYS = {
    "aspect_ratio_column": "it replaces the bucket SimpleTuner computes from the size",
    "bbox_column": "SimpleTuner adds its boxes to the image metadata",
}


class ParquetError(Exception):
    """A parquet block or file the mirror does not read; the message names the file and key."""


@dataclass(frozen=True)
class ParquetSource:
    """A dataset entry's `parquet` block, with SimpleTuner's defaults."""

    path: str  # absolute; for an S3 dataset, the object's key in `bucket` (SimpleTuner reads it through the backend)
    filename_column: str
    caption_column: str | None  # None: captions come from elsewhere (caption_strategy other than parquet)
    fallback_caption_column: str | None  # with full cells (nulls are refused), only lifts the empty-string check
    width_column: str
    height_column: str
    identifier_includes_extension: bool
    # The dataset folder as SimpleTuner's metadata backend holds it (the entry's string, stripped, no trailing "/"),
    # and as its prompt handler reads it (the entry's string): both cut it out of image paths.
    metadata_folder: str
    caption_folder: str
    entry: str  # "<multidatabackend.json>: /<index>/parquet", for messages
    bucket: object | None = None  # lcm_plugin.cache.S3Bucket of a `type: aws` dataset


@dataclass(frozen=True)
class ParquetTable:
    sizes: dict[str, tuple[int, int]]  # size id -> (width, height)
    # caption id -> its cell as `_extract_captions_to_fast_list` keeps it (a stripped string, or a list of strings):
    # SimpleTuner's own caption cache, handed to it for a dataset the plugin serves (data path D8)
    captions: dict[str, str | list[str]]


def parquet_source(entry: dict, index: int, file: str, root: Path, bucket=None) -> ParquetSource:
    """The `parquet` block of multidatabackend.json entry number `index`; ParquetError naming what it cannot take.
    `bucket`: the S3Bucket of a `type: aws` entry, whose `parquet.path` is then an object key in it."""
    block = entry.get("parquet")
    if not isinstance(block, dict) or not isinstance(block.get("path"), str) or not block["path"]:
        raise ParquetError(f"{file}: {pointer(index, 'parquet', 'path')}: metadata_backend parquet needs the file")
    for key, why in _UNCOVERED_KEYS.items():
        if block.get(key):
            raise ParquetError(f"{file}: {pointer(index, 'parquet', key)}: not read by cache build ({why})")
    path = block["path"]
    if not path.endswith(".parquet") and path.endswith((".json", ".jsonl")):
        raise ParquetError(f"{file}: {pointer(index, 'parquet', 'path')}: cache build reads .parquet files, not "
                           "JSON lines")
    filename_column = block.get("filename_column")
    if not isinstance(filename_column, str) or not filename_column:
        # SimpleTuner's metadata backend indexes the table by it, with no default.
        raise ParquetError(f"{file}: {pointer(index, 'parquet', 'filename_column')}: give the column of file names")
    caption = block.get("caption_column") if entry.get("caption_strategy") == "parquet" else None
    if entry.get("caption_strategy") == "parquet" and (not isinstance(caption, str) or not caption):
        raise ParquetError(f"{file}: {pointer(index, 'parquet', 'caption_column')}: cache build reads captions from "
                           "one column: give its name")
    if bucket is None:  # FactoryRegistry strips a local folder and one trailing "/"
        folder = str(entry.get("instance_data_dir") or entry.get("instance_data_root") or "")
        metadata_folder = folder.strip().rstrip("/")
        # The prompt handler reads the backend config's instance_data_dir, which is the entry's key alone.
        caption_folder = entry.get("instance_data_dir")
        path = os.path.abspath(root / os.path.expanduser(path))
    else:  # FactoryRegistry: an S3 dataset's metadata backend and its config's instance_data_dir are its key prefix
        metadata_folder = str(entry.get("aws_data_prefix") or "")
        caption_folder = entry.get("instance_data_dir", entry.get("aws_data_prefix", ""))
    return ParquetSource(
        path=path,
        filename_column=filename_column,
        caption_column=caption,
        fallback_caption_column=(block.get("fallback_caption_column") or None) if caption else None,
        width_column=block.get("width_column", "width"),
        height_column=block.get("height_column", "height"),
        identifier_includes_extension=bool(block.get("identifier_includes_extension", False)),
        metadata_folder=metadata_folder,
        caption_folder=caption_folder if isinstance(caption_folder, str) else "",
        entry=f"{file}: {pointer(index, 'parquet')}",
        bucket=bucket,
    )


def size_id(path: str, source: ParquetSource) -> str:
    """The id `ParquetMetadataBackend._process_for_bucket` looks image `path` (as SimpleTuner lists it) up by."""
    name = path
    if not source.identifier_includes_extension:
        name = os.path.splitext(os.path.split(path)[-1])[0]
    if source.metadata_folder and source.metadata_folder in name:
        name = name.replace(source.metadata_folder, "")
        name = name.removeprefix("/")
    return name


def caption_id(path: str, source: ParquetSource) -> str:
    """The id `PromptHandler.prepare_instance_prompt_from_parquet` looks image `path`'s captions up by."""
    name = path
    if source.caption_folder and source.caption_folder in name:
        name = name.replace(source.caption_folder, "")
        name = name.removeprefix("/")
    return name if source.identifier_includes_extension else os.path.splitext(name)[0]


def read_table(source: ParquetSource) -> ParquetTable:
    """The sizes and captions of `source`'s file, column by column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = source.path if source.bucket is None else f"{source.path} in {source.bucket!r}"
    opened = lambda: source.path  # noqa: E731
    if source.bucket is not None:
        (data,), errors = source.bucket.get_all([source.path])
        if errors:
            raise ParquetError(f"{source.entry}/path: cannot read {where}: {errors[0][1]}")
        opened = lambda: pa.BufferReader(data)  # noqa: E731 - read from memory, by column, as from a file
    try:
        schema = pq.read_schema(opened())
    except (OSError, pa.ArrowException) as error:
        raise ParquetError(f"{source.entry}/path: cannot read {where}: {error}") from None
    wanted = [source.filename_column, source.width_column, source.height_column, source.caption_column]
    for name in wanted:
        if name is not None and name not in schema.names:
            raise ParquetError(f"{where}: no column {name!r} (named in {source.entry})")
    try:
        table = pq.read_table(opened(), columns=[name for name in dict.fromkeys(wanted) if name in schema.names])
    except (OSError, pa.ArrowException) as error:
        raise ParquetError(f"{where}: {error}") from None

    def column(name: str, kind: str, check) -> list:
        values = table.column(name)
        if not check(values.type):
            raise ParquetError(f"{where}: column {name!r} holds {values.type}; cache build reads {kind}")
        if values.null_count:
            raise ParquetError(f"{where}: column {name!r} has {values.null_count} empty cell(s); cache build reads "
                               "full columns")
        return values.to_pylist()

    is_text = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)
    ids = column(source.filename_column, "strings (file names)", is_text)
    widths = column(source.width_column, "integers", pa.types.is_integer)
    heights = column(source.height_column, "integers", pa.types.is_integer)
    sizes: dict[str, tuple[int, int]] = {}
    for name, width, height in zip(ids, widths, heights):
        if width < 1 or height < 1:
            raise ParquetError(f"{where}: {name!r} is {width}x{height}; sizes are positive integers")
        sizes.setdefault(name, (width, height))  # DataFrame.loc on a repeated id: its first row
    if source.caption_column is None:
        return ParquetTable(sizes, {})
    is_caption = lambda t: is_text(t) or (pa.types.is_list(t) and is_text(t.value_type))
    cells = column(source.caption_column, "strings or lists of strings", is_caption)
    if not source.fallback_caption_column and ("" in ids or "" in cells):
        # configure_parquet_database's check_column_values, without a fallback column
        named = source.filename_column if "" in ids else source.caption_column
        raise ParquetError(f"{where}: empty strings in column {named!r}; SimpleTuner refuses them unless "
                           "parquet.fallback_caption_column is set")
    captions: dict[str, str | list[str]] = {}
    for name, value in zip(ids, cells):
        # _extract_captions_to_fast_list, row by row: later rows of an id replace earlier ones; a blank one does not
        if isinstance(value, str):
            value = value.strip()
        else:
            value = [item for item in value if item is not None]
        if value:
            captions[name if source.identifier_includes_extension else os.path.splitext(name)[0]] = value
    return ParquetTable(sizes, captions)


def caption_values(cell: str | list[str]) -> tuple[str, ...]:
    """PromptHandler._caption_payload_values: the stripped, non-empty strings of a caption cell."""
    if isinstance(cell, str):
        cell = cell.strip()
        return (cell,) if cell else ()
    return tuple(text for item in cell for text in caption_values(item))
