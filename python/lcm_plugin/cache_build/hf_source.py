"""A local `type: huggingface` dataset (a folder `datasets.load_dataset` reads as parquet or Arrow files) read as
SimpleTuner 4.10.1 reads it, by column with pyarrow instead of row by row through `datasets`.

What is mirrored, step by step:
- loading (`HuggingfaceDatasetsBackend._load_dataset`): `load_dataset(dataset_name, name=dataset_config,
  data_files=data_files, split=split)`. Which files a folder loads, in which order, and the columns' features are
  resolved by `datasets.load_dataset_builder` itself (its data-file patterns, README configs, split names); rows
  are those files' rows in that order, row group by row group, as the `parquet` and `arrow` builders write them.
  A folder written by `Dataset.save_to_disk` is refused by `load_dataset`, so here too.
- names and order (`_build_path_mapping`, `list_files`): row i is `<i>.jpg`, rows in order. The metadata backend
  names rows `<i>.<huggingface.file_extension>`; only the default ("jpg") makes the two agree.
- sizes (`HuggingfaceMetadataBackend._get_image_metadata_from_item` on `dataset[i]`): `huggingface.width_column`
  and `height_column` when both are given and exist (`int()` of the cells), else the size of the image `datasets`
  decodes: PIL's, after `ImageOps.exif_transpose` when the image has an EXIF Orientation tag
  (`datasets.Image.decode_example`). Only a column of the `datasets` Image feature is decoded; a plain struct of
  bytes/path or a binary column gives no size, and SimpleTuner then buckets no row of it without the size columns.
  A row with an empty image cell, or (with size columns) an empty size cell, is never bucketed.
- captions (`_extract_caption_from_item`, then `PromptHandler.prepare_instance_prompt_from_huggingface`): the
  `huggingface.caption_column` cell ("caption" by default) if truthy, as `str()` (a list cell becomes its Python
  repr, one caption); else `fallback_caption_column`'s; else, when the dataset has a `description_column`
  ("description") column, its cell as `str()` (an empty cell is the caption "None"); the result stripped, blank ->
  none. A list of caption columns gives one caption per truthy cell. The prompt handler then strips each value,
  drops blanks and puts `instance_prompt + " "` before each with `prepend_instance_prompt`.
- image bytes (`HuggingfaceDatasetsBackend.read`): the stored bytes of the image cell. SimpleTuner hands its decoder
  the PNG of the image `datasets` decoded (EXIF-transposed) for an Image column, the stored bytes themselves for a
  struct or binary column: `HuggingfaceSource.image_kind` says which.

What the mirror does not cover stops with HuggingfaceError naming the entry key: a Hub dataset (a name that is not
a local folder), streaming, `filter_func`, composite images, `max_num_samples`, video/audio datasets, bounding
boxes, frame columns, split slicing, file formats other than parquet/Arrow, nested (dotted) column names and columns
it cannot read as SimpleTuner does. A row that stores a path instead of bytes, or bytes PIL cannot open (where
`datasets` fails too, and with it SimpleTuner's caption pass), is reported by `read()` for that row alone.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lcm_plugin.cache_build.packed import SourceListing, caption_settings, entry_block, place_stamps
from lcm_plugin.config.problems import pointer

# SimpleTuner's list_files name for row i of an image dataset (HuggingfaceDatasetsBackend's default_extension).
EXTENSION = "jpg"
# Builders whose files this reader opens with pyarrow; load_dataset's other packaged builders read other formats.
_READ_BUILDERS = ("parquet", "arrow")
# datasets 5.2's other packaged builders (datasets.packaged_modules): a dataset_name they answer to is no folder.
_OTHER_BUILDERS = ("audiofolder", "conll", "csv", "eval", "fasta", "fastq", "genbank", "harbor", "hdf5", "iceberg",
                   "imagefolder", "json", "lance", "meshfolder", "mmcif", "niftifolder", "pandas", "pdb", "pdffolder",
                   "text", "tsfile", "videofolder", "vortex", "webdataset", "xml")
_UNCOVERED_BLOCK_KEYS = {
    "bbox_column": "SimpleTuner adds its boxes to the image metadata",
    "num_frames_column": "a video dataset's frame counts",
    "fps_column": "a video dataset's frame rates",
}


class HuggingfaceError(Exception):
    """A huggingface entry or dataset the mirror does not read; the message names the file and key."""


@dataclass(frozen=True)
class _File:
    path: str  # absolute
    rows: int
    first_row: int  # the dataset row of its first row
    groups: tuple[int, ...]  # rows per parquet row group / Arrow record batch, in order
    stat: tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode when it was laid out


def hf_source(entry: dict, index: int, file: str, root: Path, *, cache_dir: str | None = None) -> HuggingfaceSource:
    """The dataset of multidatabackend.json entry number `index` (`file`: that file, for messages; `root`: where
    SimpleTuner runs, which relative paths are relative to). `cache_dir`: the run's `cache_dir` setting (SimpleTuner
    defaults it to `<output_dir>/cache`), which places SimpleTuner's bucket files when the entry names no
    cache_dir."""
    at, block, dataset_id = entry_block(entry, index, file, "huggingface", HuggingfaceError)

    # ImageBackendConfig.from_dict: the data backend's settings from the entry's own key first, then the block;
    # streaming and cache_dir the other way round. The metadata backend reads its columns from the block alone.
    def setting(name: str, default=None, block_first: bool = False):
        if block_first and name in block:  # hf_block.get(name, entry.get(name))
            return block[name], at("huggingface", name)
        if name in entry:
            return entry[name], at(name)
        if name in block:
            return block[name], at("huggingface", name)
        return default, at(name)

    streaming, streaming_at = setting("streaming", block_first=True)
    if streaming:
        raise HuggingfaceError(f"{streaming_at}: cache build reads a loaded dataset, not a stream")
    for where_block, key in ((False, "filter_func"), (True, "filter_func")):
        if (block if where_block else entry).get(key) is not None:
            where = at("huggingface", key) if where_block else at(key)
            raise HuggingfaceError(f"{where}: not read by cache build (SimpleTuner filters rows through datasets)")
    composite = block.get("composite_image_config")
    if isinstance(composite, dict) and composite.get("enabled"):
        raise HuggingfaceError(f"{at('huggingface', 'composite_image_config')}: not read by cache build "
                               "(SimpleTuner crops one image out of each row)")
    if entry.get("max_num_samples"):
        raise HuggingfaceError(f"{at('max_num_samples')}: not read by cache build (SimpleTuner keeps a seeded random "
                               "subset of the rows)")
    for key, why in _UNCOVERED_BLOCK_KEYS.items():
        if block.get(key):
            raise HuggingfaceError(f"{at('huggingface', key)}: not read by cache build ({why})")
    strategy, instance_prompt, prepend = caption_settings(entry, at, "huggingface", HuggingfaceError)

    for key in ("caption_column", "fallback_caption_column", "width_column", "height_column", "description_column"):
        if key in entry:  # HuggingfaceMetadataBackend reads these from hf_config (the block) alone
            raise HuggingfaceError(f"{at(key)}: SimpleTuner reads {key} of a huggingface dataset from its "
                                   f"huggingface block only (it ignores this one); move it to huggingface.{key}")

    extension = block.get("file_extension", EXTENSION)
    if extension != EXTENSION:
        raise HuggingfaceError(f"{at('huggingface', 'file_extension')}: SimpleTuner's buckets would name rows "
                               f"<row>.{extension} while its list_files names them <row>.{EXTENSION}; cache build "
                               "reads the default only")

    dataset_name, name_at = setting("dataset_name")
    if not isinstance(dataset_name, str) or not dataset_name:
        raise HuggingfaceError(f"{name_at}: a huggingface dataset needs dataset_name")
    data_files, files_at = setting("data_files")
    folder: Path | None = None
    if dataset_name in _READ_BUILDERS:  # a packaged builder: data_files name the files, relative to where it runs
        if not data_files:
            raise HuggingfaceError(f"{files_at}: dataset_name {dataset_name!r} needs data_files")
        data_files = _rooted(data_files, root, files_at)
    elif dataset_name in _OTHER_BUILDERS:
        raise HuggingfaceError(f"{name_at}: cache build reads parquet and Arrow files, not {dataset_name!r}")
    else:
        if "://" in dataset_name or dataset_name.startswith(("hf:", "buckets/")):
            raise HuggingfaceError(f"{name_at}: cache build reads local folders, not {dataset_name!r}")
        folder = root / dataset_name  # datasets: os.path.isdir(path), relative to where it runs; no ~ expansion
        if not folder.is_dir():
            raise HuggingfaceError(f"{name_at}: {str(folder)!r} is not a folder (SimpleTuner would fetch "
                                   f"{dataset_name!r} from the Hugging Face Hub); cache build reads local folders")
        if (folder / "state.json").exists():
            raise HuggingfaceError(f"{name_at}: {str(folder)!r} was written by Dataset.save_to_disk, which "
                                   "load_dataset (and so SimpleTuner) refuses; write it with to_parquet or "
                                   "push_to_hub's layout")
        folder = Path(os.path.abspath(folder))
    split, split_at = setting("split", "train")
    if not isinstance(split, str) or not split or any(mark in split for mark in "[]+%:"):
        raise HuggingfaceError(f"{split_at}: cache build reads one whole split by name (got {split!r})")
    config_name, config_at = setting("dataset_config")
    if config_name is not None and not isinstance(config_name, str):
        raise HuggingfaceError(f"{config_at}: a config name")
    image_column, image_at = setting("image_column", "image")
    if not isinstance(image_column, str) or not image_column:
        raise HuggingfaceError(f"{image_at}: a column name")

    caption_column = block.get("caption_column", "caption")
    caption_columns = caption_column if isinstance(caption_column, list) else [caption_column]
    if strategy == "huggingface" and (not caption_columns or not all(
            isinstance(c, str) and c for c in caption_columns)):
        raise HuggingfaceError(f"{at('huggingface', 'caption_column')}: a column name or a list of them")
    fallback = block.get("fallback_caption_column") or None
    description = block.get("description_column", "description")
    width_column, height_column = block.get("width_column"), block.get("height_column")
    for key, value in (("fallback_caption_column", fallback), ("description_column", description),
                       ("width_column", width_column), ("height_column", height_column)):
        if value is not None and (not isinstance(value, str) or not value):
            raise HuggingfaceError(f"{at('huggingface', key)}: a column name")
    named = [("caption_column", c) for c in caption_columns] if strategy == "huggingface" else []
    named += [("fallback_caption_column", fallback), ("width_column", width_column), ("height_column", height_column)]
    for key, value in named:
        if isinstance(value, str) and "." in value:
            raise HuggingfaceError(f"{at('huggingface', key)}: SimpleTuner reads {value!r} as a nested field; cache "
                                   "build reads top-level columns")

    # Where SimpleTuner keeps its bucket files (HuggingfaceBackendBuilder's cache_dir, FactoryRegistry's
    # cache_file/metadata_file, HuggingfaceDatasetsBackend.write's rule for a relative name).
    hf_cache, _ = setting("cache_dir", block_first=True)
    if not hf_cache:
        base = cache_dir or os.environ.get("SIMPLETUNER_CACHE_DIR")
        hf_cache = str(Path(base).expanduser() / "huggingface" / dataset_id) if base else os.path.join(
            "cache", "huggingface", dataset_id)
    suffix = entry.get("cache_file_suffix", dataset_id)
    bucket_root = entry.get("instance_data_dir", entry.get("csv_cache_dir", entry.get("aws_data_prefix", ""))) or ""

    def bucket_file(stem: str) -> Path:
        name = os.path.join(str(bucket_root), stem) + ("" if suffix is None else f"_{suffix}") + ".json"
        if os.path.isabs(name) and os.path.isdir(os.path.dirname(name)):
            return Path(name)
        return Path(os.path.abspath(root / hf_cache / "huggingface_metadata" / dataset_id / os.path.basename(name)))

    return HuggingfaceSource(
        name=f"{file}: {pointer(index)} ({dataset_name})",
        entry_at=f"{file}: {pointer(index)}",
        dataset_name=dataset_name,
        folder=folder,
        data_files=data_files,
        dataset_config=config_name,
        split=split,
        split_at=split_at,
        image_column=image_column,
        image_column_at=image_at,
        caption_strategy=strategy,
        caption_columns=caption_columns if isinstance(caption_column, list) else caption_column,
        fallback_caption_column=fallback,
        description_column=description,
        width_column=width_column,
        height_column=height_column,
        instance_prompt=instance_prompt,
        prepend_instance_prompt=prepend,
        bucket_files=(bucket_file("aspect_ratio_bucket_indices"), bucket_file("aspect_ratio_bucket_metadata")),
    )


def _rooted(data_files, root: Path, where: str):
    """data_files with relative names made relative to `root` (where SimpleTuner runs)."""
    if isinstance(data_files, str):
        return str(root / data_files)
    if isinstance(data_files, list) and all(isinstance(name, str) for name in data_files):
        return [str(root / name) for name in data_files]
    if isinstance(data_files, dict):
        return {split: _rooted(names, root, f"{where}/{split}") for split, names in data_files.items()}
    raise HuggingfaceError(f"{where}: a file name, a list of them, or an object of them per split")


@dataclass
class HuggingfaceSource:
    name: str  # for messages
    entry_at: str  # "<multidatabackend.json>: /<index>"
    dataset_name: str
    folder: Path | None  # the dataset folder (None: a packaged builder given data_files)
    data_files: object
    dataset_config: str | None
    split: str
    split_at: str  # where the split was named (or defaulted)
    image_column: str
    image_column_at: str  # "<file>: /<index>/image_column" or ".../huggingface/image_column": where it was named
    caption_strategy: str  # huggingface or instanceprompt
    caption_columns: str | list[str]  # huggingface.caption_column as SimpleTuner holds it
    fallback_caption_column: str | None
    description_column: str | None
    width_column: str | None
    height_column: str | None
    instance_prompt: str | list[str] | None
    prepend_instance_prompt: bool
    # SimpleTuner's bucket files of the dataset (indices, metadata); its caption cache is
    # f"{bucket_files[0]}_captions.json", reused as it is while it exists
    bucket_files: tuple[Path, Path]
    # "datasets-image": SimpleTuner decodes the PNG of the image `datasets` decoded (EXIF orientation applied);
    # "raw-bytes": it decodes the stored bytes as it would a file. Set by the first listing.
    image_kind: str | None = None
    builder: str | None = None  # parquet or arrow
    _files: list[_File] | None = None
    _image_storage: str | None = None  # "struct" (bytes, path) or "binary"
    _columns: tuple[str, ...] = ()  # the split's columns

    @property
    def oriented(self) -> bool:
        """Whether SimpleTuner sees the images after their EXIF orientation (sizes and pixels): an Image column's,
        which `datasets` decodes and transposes; not stored bytes it decodes itself. Known once listed."""
        return self.image_kind == "datasets-image"

    # -- resolution -------------------------------------------------------------------------------------------

    def _resolve(self) -> tuple[str, list[str], dict]:
        """(builder name, the split's files in load order, features by column) as datasets resolves them."""
        try:
            import datasets
        except ImportError:
            raise HuggingfaceError(f"{self.name}: the datasets package is not installed (SimpleTuner needs it "
                                   "for huggingface datasets)") from None
        path = str(self.folder) if self.folder is not None else self.dataset_name
        # The builder's own cache folder is never written by resolving files; a scratch one keeps the user's clean.
        library_log = logging.getLogger("datasets")
        level = library_log.level
        library_log.setLevel(logging.ERROR)  # its "No config specified, defaulting..." notes are SimpleTuner's to log
        with tempfile.TemporaryDirectory(prefix="lcm-hf-") as scratch:
            try:
                builder = datasets.load_dataset_builder(path, name=self.dataset_config, data_files=self.data_files,
                                                        cache_dir=scratch)
            except Exception as error:  # datasets raises many kinds for folders it cannot read
                raise HuggingfaceError(f"{self.name}: datasets cannot load it: {type(error).__name__}: "
                                       f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}") from None
            finally:
                library_log.setLevel(level)
        kind = builder.name
        if kind not in _READ_BUILDERS:
            raise HuggingfaceError(f"{self.name}: datasets reads it with its {kind!r} builder; cache build reads "
                                   "parquet and Arrow files")
        config = builder.config
        for option in ("columns", "filters"):
            if getattr(config, option, None) is not None:
                raise HuggingfaceError(f"{self.name}: its config sets {option!r}, which cache build does not mirror")
        if getattr(config, "on_bad_files", "error") != "error":
            raise HuggingfaceError(f"{self.name}: its config skips bad files, which cache build does not mirror")
        splits = dict(config.data_files or {})
        if self.split not in splits:
            raise HuggingfaceError(f"{self.split_at}: no split {self.split!r} in {self.name} (it has "
                                   f"{sorted(splits)})")
        files = [str(name) for name in splits[self.split]]
        for name in files:
            if not os.path.isfile(name):
                raise HuggingfaceError(f"{self.name}: {name!r} is not a local file; cache build reads local files")
        features = builder.info.features
        if features is None:  # the builders' _split_generators: the first file's schema (and its HF metadata)
            features = datasets.Features.from_arrow_schema(_schema(files[0], kind))
        return kind, files, dict(features)

    def _layout(self) -> list[_File]:
        """Lay the split's files out (rows, row groups, stamps) and check the columns; sets image_kind."""
        import datasets

        kind, names, features = self._resolve()
        self.builder = kind
        column = features.get(self.image_column)
        if column is None:
            raise HuggingfaceError(f"{self.image_column_at}: no column {self.image_column!r} in "
                                   f"{self.name} (it has {sorted(features)})")
        sized = bool(self.width_column and self.height_column)
        if isinstance(column, datasets.Image) and column.decode:
            if column.mode is not None:
                raise HuggingfaceError(f"{self.image_column_at}: the Image feature converts to mode "
                                       f"{column.mode!r}, which cache build does not mirror")
            self.image_kind, self._image_storage = "datasets-image", "struct"
        elif _is_bytes_struct(column, datasets) or isinstance(column, datasets.Image):
            self.image_kind, self._image_storage = "raw-bytes", "struct"
        elif isinstance(column, datasets.Value) and column.dtype in ("binary", "large_binary"):
            self.image_kind, self._image_storage = "raw-bytes", "binary"
        else:
            raise HuggingfaceError(f"{self.image_column_at}: column {self.image_column!r} holds {column}; "
                                   "cache build reads image bytes (the datasets Image feature, a struct of "
                                   "bytes/path, or binary)")
        if self.image_kind == "raw-bytes" and not sized:
            raise HuggingfaceError(f"{self.image_column_at}: column {self.image_column!r} is not a datasets "
                                   "Image feature (no 'huggingface' features in the files' schema), so datasets "
                                   "does not decode it and SimpleTuner buckets no row of it; give "
                                   "huggingface.width_column and height_column")
        # A named column that is not there: SimpleTuner would quietly caption or size every row otherwise (or not
        # at all); the key is named instead.
        wanted = [("width_column", self.width_column), ("height_column", self.height_column)]
        if self.caption_strategy == "huggingface":
            captions = self.caption_columns if isinstance(self.caption_columns, list) else [self.caption_columns]
            wanted += [("caption_column", name) for name in captions]
            wanted.append(("fallback_caption_column", self.fallback_caption_column))
        for key, name in wanted:
            if name is not None and name not in features:
                raise HuggingfaceError(f"{self.entry_at}/huggingface/{key}: no column {name!r} in {self.name} "
                                       f"(it has {sorted(features)})")
        self._columns = tuple(features)
        files: list[_File] = []
        first = 0
        for name in names:
            try:
                stat = os.stat(name)
                groups = _groups(name, kind)
            except (OSError, ValueError) as error:
                raise HuggingfaceError(f"{self.name}: cannot read {name}: {error}") from None
            rows = sum(groups)
            files.append(_File(name, rows, first, groups, (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns,
                                                           stat.st_ino)))
            first += rows
        self._files = files
        return files

    # -- listing ----------------------------------------------------------------------------------------------

    def listing(self) -> SourceListing:
        """The split as SimpleTuner sees it: keys `<row>.jpg` in row order; stamps (the data file's size, mtime_ns,
        ctime_ns, its inode mixed with the row's place in it); sizes from the size columns, None where SimpleTuner
        takes the size of the image `datasets` decodes (EXIF orientation applied) or never buckets the row."""
        files = self._layout()
        total = sum(item.rows for item in files)
        keys = [f"{row}.{EXTENSION}" for row in range(total)]
        stamps: list[tuple[int, int, int, int]] = []
        for item in files:
            size, mtime, ctime, inode = item.stat
            mixed = place_stamps(inode, np.arange(item.rows, dtype=np.uint64)).tolist()
            stamps.extend((size, mtime, ctime, value) for value in mixed)
        sizes: list[tuple[int, int] | None] = [None] * total
        left_out: dict[str, str] = {}
        if self.width_column and self.height_column:
            widths = self._column(files, self.width_column, "width_column", _integer)
            heights = self._column(files, self.height_column, "height_column", _integer)
            for row, (width, height) in enumerate(zip(widths, heights)):
                if width is None or height is None:  # int(None) raises: _process_for_bucket logs and skips it
                    left_out[keys[row]] = f"an empty {self.width_column if width is None else self.height_column} cell"
                elif width < 1 or height < 1:
                    raise HuggingfaceError(f"{self.name}: row {row} is {width}x{height}; sizes are positive "
                                           "integers")
                else:
                    sizes[row] = (width, height)
        nulls = self._image_nulls(files)
        for row in nulls:  # no image at all: `original_size` is never set, so the row is skipped
            if sizes[row] is None:
                left_out.setdefault(keys[row], "an empty image cell")
        captions, missing = self._captions(files, keys)
        return SourceListing(keys=keys, stamps=stamps, sizes=sizes, captions=captions, missing_captions=missing,
                             left_out=left_out)

    def _column(self, files: list[_File], name: str, key: str, check) -> list:
        """One column's cells over the split, read by column from each file, as Python values."""
        import pyarrow as pa

        cells: list = []
        for item in files:
            try:
                values = _read_columns(item.path, self.builder, [name]).column(name)
            except (OSError, pa.ArrowException, KeyError) as error:
                raise HuggingfaceError(f"{item.path}: cannot read column {name!r} ({self.entry_at}/huggingface/"
                                       f"{key}): {error}") from None
            if check is not None and not check(values.type):
                raise HuggingfaceError(f"{item.path}: column {name!r} holds {values.type} ({self.entry_at}/"
                                       f"huggingface/{key}); cache build reads {check.__doc__}")
            cells.extend(values.to_pylist())
        return cells

    def _image_nulls(self, files: list[_File]) -> list[int]:
        """Rows whose image cell is empty (a null struct or binary cell), from the parquet statistics where they
        rule it out, else from the cells' validity: of the small `path` field for a struct column."""
        import pyarrow as pa

        rows: list[int] = []
        column = self.image_column
        for item in files:
            try:
                if self.builder == "parquet":
                    leaf = f"{column}.bytes" if self._image_storage == "struct" else column
                    if _parquet_no_nulls(item.path, leaf):
                        continue
                    import pyarrow.parquet as pq

                    # ParquetFile.read keeps the struct (and its nulls) around a selected leaf; read_table would not
                    wanted = f"{column}.path" if self._image_storage == "struct" else column
                    values = pq.ParquetFile(item.path).read(columns=[wanted]).column(column)
                else:
                    values = _read_columns(item.path, self.builder, [column]).column(column)
            except (OSError, pa.ArrowException, KeyError) as error:
                raise HuggingfaceError(f"{item.path}: cannot read column {column!r}: {error}") from None
            if values.null_count:
                valid = np.asarray(values.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
                rows.extend((item.first_row + np.flatnonzero(~valid)).tolist())
        return rows

    def _captions(self, files: list[_File], keys: list[str]) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
        captions: dict[str, tuple[str, ...]] = {}
        missing: dict[str, str] = {}
        prefix = f"{self.instance_prompt} " if self.prepend_instance_prompt and self.instance_prompt else ""
        if self.caption_strategy == "instanceprompt":
            # get_all_captions: the instance prompt(s), stripped, for every image
            prompts = [self.instance_prompt] if isinstance(self.instance_prompt, str) else self.instance_prompt
            values = tuple(str(prompt).strip() for prompt in prompts)
            return {key: values for key in keys}, {}
        names = self.caption_columns if isinstance(self.caption_columns, list) else [self.caption_columns]
        columns = {name: self._column(files, name, "caption_column", _caption_type) for name in dict.fromkeys(names)}
        fallback = (self._column(files, self.fallback_caption_column, "fallback_caption_column", _caption_type)
                    if self.fallback_caption_column else None)
        description = None
        if self.description_column and self.description_column in self._columns:
            description = self._column(files, self.description_column, "description_column", _description_type)
        for row, key in enumerate(keys):
            caption = _caption(row, names, columns, fallback, description, isinstance(self.caption_columns, list))
            values = _caption_values(caption) if caption is not None else []
            if not values:
                # None: _extract_caption_from_item found nothing (the prompt handler raises CaptionNotFoundError);
                # blank values: it found only blanks (the prompt handler gives no caption and reports none missing)
                missing[key] = ("no caption: its caption, fallback and description cells are empty or blank"
                                if caption is None else "its captions are blank")
                continue
            captions[key] = tuple(prefix + value for value in values)
        return captions, missing

    # -- reading ----------------------------------------------------------------------------------------------

    def read(self, keys: list[str]) -> tuple[list[bytes | None], list[tuple[int, str]]]:
        """The stored bytes of each key's image, read row group by row group (record batch by record batch), and
        (position, why) for those that cannot be read; never raises for one row."""
        files = self._files if self._files is not None else self._layout()
        found: list[bytes | None] = [None] * len(keys)
        failed: list[tuple[int, str]] = []
        total = sum(item.rows for item in files)
        starts = np.array([item.first_row for item in files], dtype=np.int64)
        wanted: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (file, group) -> (position, row in group)
        group_starts = [np.concatenate([[0], np.cumsum(item.groups)]) for item in files]
        for position, key in enumerate(keys):
            row = _row_of(key)
            if row is None or row >= total:
                failed.append((position, f"{key!r} is no row of {self.name} ({total} rows)"))
                continue
            number = int(np.searchsorted(starts, row, side="right") - 1)
            local = row - files[number].first_row
            group = int(np.searchsorted(group_starts[number], local, side="right") - 1)
            wanted.setdefault((number, group), []).append((position, local - int(group_starts[number][group])))
        by_file: dict[int, list[int]] = {}
        for number, group in wanted:
            by_file.setdefault(number, []).append(group)
        for number, groups in by_file.items():
            item = files[number]
            try:
                stat = os.stat(item.path)
                if (stat.st_size, stat.st_mtime_ns, stat.st_ino) != (item.stat[0], item.stat[1], item.stat[3]):
                    raise OSError("changed since it was listed")
                cells = self._group_cells(item, sorted(groups))
            except Exception as error:  # noqa: BLE001 - a file that cannot be read fails its rows, not the call
                why = f"{item.path}: {error}"
                failed.extend((position, why) for group in groups for position, _ in wanted[(number, group)])
                continue
            for group in groups:
                for position, at in wanted[(number, group)]:
                    data, why = cells[group](at)
                    if why is not None:
                        row = sum(item.groups[:group]) + at
                        failed.append((position, f"{keys[position]} (row {row} of {item.path}): {why}"))
                    else:
                        found[position] = data
        failed.sort()
        return found, failed

    def _group_cells(self, item: _File, groups: list[int]) -> dict:
        """group -> a function of the row in the group giving (bytes, None) or (None, why)."""
        import pyarrow as pa

        column = self.image_column
        if self.builder == "parquet":
            import pyarrow.parquet as pq

            handle = pq.ParquetFile(item.path)
            chunks = {group: handle.read_row_group(group, columns=[column]).column(column) for group in groups}
        else:
            wanted = set(groups)
            chunks = {}
            for number, batch in enumerate(_batches(item.path)):
                if number in wanted:
                    chunks[number] = pa.chunked_array([batch.column(batch.schema.get_field_index(column))])
                if len(chunks) == len(wanted):
                    break
        storage = self._image_storage
        return {group: _cell_reader(values.combine_chunks(), storage, column) for group, values in chunks.items()}


# -- helpers ------------------------------------------------------------------------------------------------------


def _is_bytes_struct(feature, datasets) -> bool:
    """A plain {bytes, path} struct (an image column written without its Image feature)."""
    return (isinstance(feature, dict) and set(feature) == {"bytes", "path"}
            and isinstance(feature["bytes"], datasets.Value) and feature["bytes"].dtype in ("binary", "large_binary"))


def _schema(path: str, builder: str):
    import pyarrow.parquet as pq

    if builder == "parquet":
        return pq.read_schema(path)
    return _arrow_reader(path).schema


def _arrow_reader(path: str):
    """The arrow builder's reader: an IPC stream, else an IPC file; memory-mapped so batches are not copied."""
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(source)
    except (OSError, pa.ArrowInvalid):
        return pa.ipc.open_file(pa.memory_map(path))


def _batches(path: str):
    import pyarrow as pa

    reader = _arrow_reader(path)
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        return (reader.get_batch(number) for number in range(reader.num_record_batches))
    return iter(reader)


def _groups(path: str, builder: str) -> tuple[int, ...]:
    """Rows per parquet row group (from the footer) or per Arrow record batch, in order."""
    import pyarrow.parquet as pq

    if builder == "parquet":
        metadata = pq.ParquetFile(path).metadata
        return tuple(metadata.row_group(number).num_rows for number in range(metadata.num_row_groups))
    return tuple(batch.num_rows for batch in _batches(path))


def _read_columns(path: str, builder: str, columns: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if builder == "parquet":
        return pq.read_table(path, columns=columns)
    batches = [batch.select(columns) for batch in _batches(path)]
    if not batches:
        return pa.table({name: pa.array([]) for name in columns})
    return pa.Table.from_batches(batches)


def _parquet_no_nulls(path: str, leaf: str) -> bool:
    """True when the footer's statistics show the leaf column has no null value (a struct's `bytes` leaf is null
    wherever the struct is)."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        chunks = [row_group.column(n) for n in range(row_group.num_columns)
                  if row_group.column(n).path_in_schema == leaf]
        if len(chunks) != 1:
            return False
        statistics = chunks[0].statistics
        if statistics is None or not statistics.has_null_count or statistics.null_count:
            return False
    return True


def _integer(data_type) -> bool:
    """integers"""
    import pyarrow as pa

    return pa.types.is_integer(data_type)


def _caption_type(data_type) -> bool:
    """strings or lists of strings"""
    import pyarrow as pa

    text = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)  # noqa: E731
    return text(data_type) or ((pa.types.is_list(data_type) or pa.types.is_large_list(data_type))
                               and text(data_type.value_type))


def _description_type(data_type) -> bool:
    """strings or structs of strings"""
    import pyarrow as pa

    if pa.types.is_struct(data_type):
        return all(pa.types.is_string(f.type) or pa.types.is_large_string(f.type) for f in data_type)
    return _caption_type(data_type)


def _caption(row: int, names: list[str], columns: dict, fallback: list | None, description: list | None,
             several: bool):
    """HuggingfaceMetadataBackend._extract_caption_from_item on the row's cells, as Python values."""
    caption = None
    if several:  # a list of caption columns: each truthy cell, as str()
        values = [str(columns[name][row]) for name in names if columns[name][row]]
        caption = values or None
    else:
        value = columns[names[0]][row]
        if value:
            caption = str(value)
    if not caption and fallback is not None and fallback[row]:
        caption = str(fallback[row])
    if not caption and description is not None:  # `description_column in item`: the column exists
        value = description[row]
        if isinstance(value, dict):
            parts = [str(value[k]) for k in ("main_subject", "description", "text") if k in value and value[k]]
            if parts:
                caption = " ".join(parts)
        else:
            caption = str(value)  # an empty cell is the caption "None", as SimpleTuner writes it
    if caption:
        if isinstance(caption, list):
            caption = [str(value).strip() for value in caption if value]
        else:
            caption = caption.strip()
    return caption if caption else None


def _caption_values(caption) -> list[str]:
    """PromptHandler._caption_payload_values: the stripped, non-empty strings."""
    if isinstance(caption, str):
        caption = caption.strip()
        return [caption] if caption else []
    return [text for value in caption for text in _caption_values(value)]


def _row_of(key: str) -> int | None:
    stem, dot, extension = key.partition(".")
    if dot and extension == EXTENSION and stem.isdigit() and stem.isascii() and (stem == "0" or stem[0] != "0"):
        return int(stem)
    return None


def _cell_reader(values, storage: str, column: str):
    """A function of a row (in `values`) giving (stored image bytes, None) or (None, why)."""
    if storage == "struct":
        data, paths = values.field("bytes"), values.field("path")
    else:
        data, paths = values, None

    def cell(at: int):
        if not values[at].is_valid:
            return None, f"its {column!r} cell is empty"
        stored = data[at].as_py()
        if stored is None:
            path = paths[at].as_py() if paths is not None else None
            if path:
                return None, f"its image is stored as a path ({path!r}), not bytes; cache build reads stored bytes"
            return None, "its image has neither bytes nor a path"
        if not stored:
            return None, "its image bytes are empty"
        why = _unopenable(stored)
        return (None, why) if why else (stored, None)

    return cell


def _unopenable(data: bytes) -> str | None:
    """Why PIL cannot open the image's header (what datasets' decoding, and so SimpleTuner, trips on), or None."""
    try:
        from PIL import Image
    except ImportError:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.size  # noqa: B018 - the header is parsed by open; nothing is decoded
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds for bad bytes
        return f"not an image PIL opens ({type(error).__name__}: {error})"
    return None
