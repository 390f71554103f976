"""A local `type: webshart` dataset (a folder of WebDataset `.tar` shards, each with its webshart JSON index) read
as SimpleTuner 4.10.1 with webshart 0.6.0 reads it, from the index files themselves, without importing either.

What is mirrored, step by step:
- discovery (`webshart.discover_dataset` on a local folder): every regular file named `<name>.tar` below the folder
  (symbolic links are not followed), paired with its index: `<name>.json` beside it, or
  `<metadata>/<relative name>.json` when the entry gives a local `metadata` folder. A tar without an index is left
  out of the dataset; shards are ordered by their name relative to the folder. SimpleTuner turns on webshart's
  metadata cache, which keeps the first copy of each index it loads and never looks at the index again: a cached
  copy, where there is one, is what is read here too.
- samples (`list_samples_in_shard`): the index's members sorted by name; a `.txt` member whose stem (the name
  without its last extension) is also the stem of a member that is neither `.json` nor `.txt`, and a `.json` member
  whose stem is that of any non-`.json` member, are sidecars, not samples. A sample's JSON sidecar (offset, length)
  is the `.json` member of its stem unless the index names one.
- names and order (`WebshartDataBackend.list_files`): `webshart://<shard number>/<sample number>/<member name>`,
  shard by shard, sample by sample, those whose extension is an image's.
- sizes (`WebshartMetadataBackend._entries_for_shard` over `TarDataLoader.list_shard_sample_aspect_buckets`): the
  index's `width` and `height`, as stored: nobody applies EXIF orientation (webshart's extractor reads the stored
  header size). A sample without both, or longer than `max_file_size`, is never bucketed and its image never read.
- captions (`WebshartDataBackend.get_caption` and `PromptHandler.prepare_instance_prompt_from_webshart`):
  - no `webshart.caption_key`: the index entry's `captions` (or `caption`): a string, a list, or a JSON object
    (written as compact JSON), each value stripped and blanks dropped (`PromptHandler._caption_payload_values`).
    Without them, SimpleTuner looks up `<stem>.txt` (the member's base name, folders dropped) among the shard's
    samples and reads it; a `.txt` paired with the image is a sidecar, not a sample, so SimpleTuner never finds
    it. With `caption_strategy: webshart` (the default), an image with no captions in the index and no
    `<stem>.txt` member is left out of the buckets;
  - `webshart.caption_key` (a name or a list): for each name, the first of the JSON sidecar's object (from the
    index's `json_metadata`, else read from the tar), the index entry, and the `captions` objects of those two
    that has the name gives its values; an image with none is left out of the buckets;
  - `caption_strategy: instanceprompt`: the instance prompt for every image; with `prepend_instance_prompt`, the
    instance prompt and a space before each caption.
- image bytes (`WebshartDataBackend.read` -> `TarDataLoader.load_sample`): `length` bytes at `offset` in the tar.

What the mirror does not cover stops with WebshartError naming the entry key (or the index file and member): remote
sources and indexes (Hugging Face, http), `filter_func`, `max_num_samples`, caption coalescing
(`optimize_captions`), a top-level `caption_key` (SimpleTuner reads `webshart.caption_key` only), caption keys that
name an index's own fields, and indexes webshart would refuse or read ambiguously.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from lcm_plugin.cache_build.packed import SourceListing, caption_settings, entry_block, place_stamps

# The still images the cache build decodes; SimpleTuner lists more (video, audio, every Pillow format), which
# `SourceListing.other_samples` reports when the index sizes them.
from lcm_plugin.cache_build.plan import IMAGE_EXTENSIONS
from lcm_plugin.config.problems import pointer

DEFAULT_MAX_FILE_SIZE = 500 * 1024 * 1024  # WebshartBackendBuilder's default
PREFIX = "webshart://"
# webshart's DatasetDiscovery shard pattern, `^(.+?)\.tar$` on a file name.
_SHARD_FILE = re.compile(r"(.+?)\.tar")
# Index fields webshart reads itself; a caption_key naming one would caption images with offsets and sizes.
_INDEX_FIELDS = ("path", "fname", "filename", "offset", "length", "size", "sha256", "width", "height", "aspect",
                 "json_path", "json_offset", "json_length")
_OPTIONAL_FIELDS = ("sha256", "width", "height", "aspect", "json_path", "json_offset", "json_length",
                    "json_metadata")
_ALIASES = frozenset(("fname", "filename", "size", "caption"))
_OPTIMIZE_KEYS = (("webshart_optimize_captions",), ("webshart_optimise_captions",),
                  ("webshart", "optimize_captions"), ("webshart", "optimise_captions"))


class WebshartError(Exception):
    """A webshart dataset or index the mirror does not read; the message names the file and key (or shard)."""


@dataclass
class _Shard:
    name: str  # relative to the source folder, without ".tar"
    tar: str  # absolute
    index: str  # the index file that was read (a metadata-cache copy, or the shard's own index)
    samples: list[str] = field(default_factory=list)  # logical sample names, by sample number
    offsets: np.ndarray | None = None  # by sample number
    lengths: np.ndarray | None = None
    stamp: tuple[int, int, int, int] | None = None  # the tar's (inode, size, mtime_ns, ctime_ns) when listed


def webshart_source(entry: dict, index: int, file: str, root: Path, *, cache_dir: str | None = None,
                    extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> WebshartSource:
    """The dataset of multidatabackend.json entry number `index` (`file`: that file, for messages; `root`: where
    SimpleTuner runs, which relative paths are relative to). `cache_dir`: the run's `cache_dir` setting (SimpleTuner
    defaults it to `<output_dir>/cache`), which places webshart's metadata cache when the entry names no
    `cache_dir`. `extensions`: the image extensions to list (lower case, with the dot)."""
    at, block, dataset_id = entry_block(entry, index, file, "webshart", WebshartError)

    # Where SimpleTuner takes each setting from (ImageBackendConfig.from_dict): source and metadata from the entry's
    # own key first, then the webshart block; cache_dir and max_file_size the other way round; caption_key and the
    # metadata cache folder from the block alone.
    def setting(name: str, block_first: bool = False):
        if block_first and name in block:
            return block[name], at("webshart", name)
        if name in entry:
            return entry[name], at(name)
        return block.get(name), at("webshart", name)

    source, source_at = setting("source")
    if not isinstance(source, str) or not source:
        raise WebshartError(f"{source_at}: a webshart dataset needs its source folder")
    if "://" in source or source.startswith(("http:", "https:", "hf:")):
        raise WebshartError(f"{source_at}: cache build reads local folders of shards, not {source!r}")
    folder = root / source  # SimpleTuner: Path(source), relative to where it runs; no ~ expansion
    if not folder.is_dir():
        raise WebshartError(f"{source_at}: {str(folder)!r} is not a folder (SimpleTuner would look {source!r} up on "
                            "the Hugging Face Hub); cache build reads local folders of shards")
    metadata, metadata_at = setting("metadata")
    metadata_folder = None
    if metadata is not None:
        if not isinstance(metadata, str) or not metadata:
            raise WebshartError(f"{metadata_at}: give a local folder of indexes")
        # webshart's MetadataResolver: a URL, or an `owner/name` that is not a path, is a remote index location.
        looks_like_hub = (not (root / metadata).exists() and not os.path.isabs(metadata)
                          and not metadata.startswith(".") and len([p for p in metadata.split("/") if p]) == 2)
        if metadata.startswith("http") or "://" in metadata or looks_like_hub:
            raise WebshartError(f"{metadata_at}: cache build reads local indexes, not {metadata!r}")
        metadata_folder = root / metadata

    for path in _OPTIMIZE_KEYS:
        value = entry.get(path[0]) if len(path) == 1 else block.get(path[1])
        if value:
            raise WebshartError(f"{at(*path)}: not read by cache build (webshart folds sidecar captions into its "
                                "metadata cache)")
    if entry.get("filter_func") is not None:
        raise WebshartError(f"{at('filter_func')}: not read by cache build (SimpleTuner filters webshart samples "
                            "inside webshart)")
    if entry.get("max_num_samples"):
        raise WebshartError(f"{at('max_num_samples')}: not read by cache build (SimpleTuner keeps the first samples "
                            "in webshart's bucket order)")
    if "caption_key" in entry:
        raise WebshartError(f"{at('caption_key')}: SimpleTuner reads the caption key from webshart.caption_key "
                            "only; move it there")
    strategy, instance_prompt, prepend = caption_settings(entry, at, "webshart", WebshartError)

    caption_key = block.get("caption_key")
    if caption_key is not None:
        keys = [caption_key] if isinstance(caption_key, str) else caption_key
        # SimpleTuner's validate_webshart_caption_key
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
            raise WebshartError(f"{at('webshart', 'caption_key')}: a non-empty string or list of non-empty strings")
        named = [k for k in keys if k in _INDEX_FIELDS]
        if named:
            raise WebshartError(f"{at('webshart', 'caption_key')}: {named[0]!r} is an index field webshart reads "
                                "itself, not a caption")

    max_file_size, size_at = setting("max_file_size", block_first=True)
    if max_file_size is not None and (isinstance(max_file_size, bool) or not isinstance(max_file_size, (int, float))
                                      or max_file_size < 0):
        raise WebshartError(f"{size_at}: a number of bytes")
    max_file_size = int(max_file_size or DEFAULT_MAX_FILE_SIZE)  # WebshartBackendBuilder: `or` its default

    # webshart's metadata cache folder, as WebshartBackendBuilder and WebshartDataBackend place it.
    data_cache, _ = setting("cache_dir", block_first=True)
    if not data_cache:
        base = cache_dir or os.environ.get("SIMPLETUNER_CACHE_DIR")
        data_cache = str(Path(base).expanduser() / "webshart" / dataset_id) if base else os.path.join(
            "cache", "webshart", dataset_id)
    metadata_cache = block.get("metadata_cache_dir") or os.path.join(str(data_cache), "metadata_cache")
    # The factory's instance_data_dir, where SimpleTuner's metadata backend keeps its bucket files
    # (FactoryRegistry._configure_backend_by_type, then _configure_metadata_backend's fallback when that is empty).
    bucket_folder = block.get("cache_dir", entry.get("cache_dir", os.path.join("cache", "webshart", dataset_id)))
    if not bucket_folder:
        bucket_folder = entry.get("instance_data_dir", entry.get("csv_cache_dir", entry.get("aws_data_prefix", "")))
    if not isinstance(bucket_folder, str):
        raise WebshartError(f"{at('webshart', 'cache_dir')}: a folder")
    infix = ""
    if caption_key is not None:
        infix = "_captions_" + hashlib.sha256(json.dumps(caption_key).encode("utf-8")).hexdigest()[:16]
    return WebshartSource(
        name=f"{file}: {pointer(index)} ({source})",
        source=source,
        folder=Path(os.path.abspath(folder)),
        metadata_folder=None if metadata_folder is None else Path(os.path.abspath(metadata_folder)),
        metadata_cache=Path(os.path.abspath(root / metadata_cache / source.replace("/", "_"))),
        max_file_size=max_file_size,
        caption_strategy=strategy,
        caption_key=caption_key,
        instance_prompt=instance_prompt,
        prepend_instance_prompt=prepend,
        extensions=tuple(extension.lower() for extension in extensions),
        bucket_folder=Path(os.path.abspath(root / bucket_folder)),
        bucket_infix=infix,
    )


@dataclass
class WebshartSource:
    name: str  # for messages
    source: str  # the entry's source, as written
    folder: Path  # the shards' folder
    metadata_folder: Path | None  # the entry's local `metadata` folder of indexes
    metadata_cache: Path  # webshart's metadata cache of this dataset (a copy of each index it loaded)
    max_file_size: int
    caption_strategy: str  # webshart or instanceprompt
    caption_key: str | list[str] | None
    instance_prompt: str | list[str] | None
    prepend_instance_prompt: bool
    extensions: tuple[str, ...]
    # SimpleTuner's bucket files: <bucket_folder>/aspect_ratio_bucket_indices<bucket_infix>_<suffix>.json and
    # .../aspect_ratio_bucket_metadata<bucket_infix>_<suffix>.json (the suffix: cache_file_suffix, else the id)
    bucket_folder: Path
    bucket_infix: str
    _shards: list[_Shard] | None = None

    # SimpleTuner sizes a sample by its index's width and height, which webshart's extractor reads from the stored
    # header: the images are bucketed and decoded as stored, as an S3 object is.
    oriented = False

    # -- discovery --------------------------------------------------------------------------------------------

    def _discover(self) -> tuple[list[_Shard], list[str]]:
        """The indexed shards in webshart's order, and the tars it leaves out for want of an index."""
        tars: list[tuple[str, str]] = []  # (relative name, absolute tar path)

        def walk(directory: str, relative: str) -> None:
            try:
                entries = list(os.scandir(directory))
            except OSError as error:
                raise WebshartError(f"{self.name}: cannot list {directory}: {error.strerror}") from None
            for item in entries:
                # webshart's collect_local_tar_paths asks the directory entry, which does not follow links
                if item.is_dir(follow_symlinks=False):
                    walk(item.path, f"{relative}{item.name}/")
                elif item.is_file(follow_symlinks=False):
                    match = _SHARD_FILE.fullmatch(item.name)
                    if match and not _is_utf8(relative + item.name):
                        raise WebshartError(f"{self.name}: {item.path!r}: a shard name that is not UTF-8 (webshart "
                                            "names it differently)")
                    if match:
                        tars.append((relative + match.group(1), item.path))

        walk(str(self.folder), "")
        shards, unindexed = [], []
        for name, tar in sorted(tars):
            index = (os.path.join(self.metadata_folder, f"{name}.json") if self.metadata_folder is not None
                     else os.path.splitext(tar)[0] + ".json")
            if os.path.exists(index):
                shards.append(_Shard(name, tar, index))
            else:
                unindexed.append(tar)
        if not shards:
            raise WebshartError(f"{self.name}: no .tar shard with a webshart index under {self.folder} (SimpleTuner "
                                "stops: webshart finds no shards)")
        return shards, unindexed

    def _read_index(self, shard: _Shard) -> list[dict]:
        """The shard's index files, sorted by name, each a dict of webshart's fields for it; the cached copy of
        webshart's metadata cache when there is a readable one (what SimpleTuner reads)."""
        cached = self.metadata_cache / f"{shard.name}.json"
        if cached.is_file():
            try:
                document = json.loads(cached.read_bytes())
            except (OSError, ValueError):
                document = None  # webshart drops a copy it cannot read and loads the index itself
            if document is not None:
                shard.index = str(cached)
                return _index_files(document, shard.index)
        try:
            document = json.loads(Path(shard.index).read_bytes())
        except OSError as error:
            raise WebshartError(f"{shard.index}: cannot read the index of {shard.tar}: {error.strerror}") from None
        except ValueError as error:
            raise WebshartError(f"{shard.index}: not JSON ({error})") from None
        return _index_files(document, shard.index)

    # -- listing ----------------------------------------------------------------------------------------------

    def listing(self) -> SourceListing:
        """The dataset as SimpleTuner sees it now: each shard's index read once (no image decoded; a `.txt` or
        JSON sidecar read only where SimpleTuner reads one for a caption). WebshartError for what SimpleTuner
        would stop on too (no indexed shard, an index webshart refuses, a caption it fails reading). Stamps are
        (the member's length, the tar's mtime_ns and ctime_ns, its inode mixed with the member's offset); a size
        of None is never bucketed (SimpleTuner never reads a webshart image to size it)."""
        shards, unindexed = self._discover()
        keys: list[str] = []
        stamps: list[tuple[int, int, int, int]] = []
        sizes: list[tuple[int, int] | None] = []
        captions: dict[str, tuple[str, ...]] = {}
        missing: dict[str, str] = {}
        left_out: dict[str, str] = {}
        others: list[str] = []
        max_file_size, extensions = self.max_file_size, self.extensions
        # get_all_captions gives the instanceprompt strategy's prompts as they are, stripped;
        # prepare_instance_prompt_from_webshart puts `instance_prompt + " "` before each caption when prepending.
        prompts = tuple(_instance_prompts(self.instance_prompt)) if self.caption_strategy == "instanceprompt" else None
        prefix = f"{self.instance_prompt} " if self.prepend_instance_prompt and self.instance_prompt else ""
        plain = self.caption_key is None
        for number, shard in enumerate(shards):
            files = self._read_index(shard)
            try:
                stat = os.stat(shard.tar)
            except OSError as error:
                raise WebshartError(f"{self.name}: cannot read {shard.tar}: {error.strerror}") from None
            shard.stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
            samples = _samples(files)
            shard.samples = [entry["path"] for entry in samples]
            shard.offsets = np.array([entry["offset"] for entry in samples], dtype=np.uint64)
            shard.lengths = np.array([entry["length"] for entry in samples], dtype=np.uint64)
            by_name = None  # name -> index entry of every visible member, built when a caption needs it
            sample_numbers = None
            listed = []  # sample numbers of this shard's images
            for sample_number, entry in enumerate(samples):
                name = entry["path"]
                key = f"{PREFIX}{number}/{sample_number}/{name}"
                visible = entry["length"] <= max_file_size
                width, height = entry.get("width"), entry.get("height")
                sized = visible and width is not None and height is not None
                if os.path.splitext(name)[1].lower() not in extensions:  # list_files' test, on our images
                    if sized:
                        others.append(key)
                    continue
                listed.append(sample_number)
                keys.append(key)
                if not sized:
                    sizes.append(None)
                    left_out[key] = ("larger than max_file_size" if not visible
                                     else "no width and height in the index (SimpleTuner buckets by the index)")
                    continue
                sizes.append((width, height))
                if prompts is not None:
                    captions[key] = prompts
                    continue
                text = entry.get("captions") if plain else None
                if type(text) is str and (text := text.strip()):  # the common case: one caption in the index
                    captions[key] = (prefix + text,)
                    continue
                if by_name is None:
                    by_name = {item["path"]: item for item in files if item["length"] <= max_file_size}
                    sample_numbers = {item["path"]: at for at, item in enumerate(samples)}
                found, why = self._captions(shard, entry, by_name, sample_numbers, samples)
                if why is not None:
                    missing[key] = why
                else:
                    captions[key] = tuple(prefix + value for value in found)
            if listed:
                picked = np.array(listed, dtype=np.int64)
                lengths = shard.lengths[picked]
                mixed = place_stamps(stat.st_ino, shard.offsets[picked])
                stamps.extend(zip(lengths.tolist(), [stat.st_mtime_ns] * len(listed), [stat.st_ctime_ns] * len(listed),
                                  mixed.tolist()))
        self._shards = shards
        return SourceListing(keys=keys, stamps=stamps, sizes=sizes, captions=captions, missing_captions=missing,
                             left_out=left_out, other_samples=tuple(others), unindexed=tuple(unindexed))

    def _captions(self, shard: _Shard, entry: dict, by_name: dict, sample_numbers: dict,
                  samples: list[dict]) -> tuple[list[str], str | None]:
        """(captions, None), or ([], why SimpleTuner has none) for a bucketed image's index `entry`."""
        name = entry["path"]
        where = f"{shard.index}: {name!r}"
        if self.caption_key is not None:
            value = self._caption_key_values(shard, entry)
            if not value:
                return [], f"no {self.caption_key!r} in its JSON sidecar or index entry (webshart.caption_key)"
            values = _normalized(value)
            return (values, None) if values else ([], "its captions are blank")
        raw = entry.get("captions")
        if raw:  # an empty string or list falls through to the .txt lookup, as `if caption:` does
            values = _normalized(raw)
            return (values, None) if values else ([], "its captions in the index are blank")
        try:
            member = PurePosixPath(name).with_suffix(".txt").name
        except ValueError:
            raise WebshartError(f"{where}: SimpleTuner cannot name this member's caption file") from None
        if self.caption_strategy == "webshart" and member not in by_name:
            return [], f"no captions in the index and no {member!r} in the shard"
        number = sample_numbers.get(member)
        if number is None:
            # webshart folds a .txt paired with an image into that sample; SimpleTuner looks for it as a sample
            return [], (f"no captions in the index; SimpleTuner looks for {member!r} as a sample of its own and "
                        "webshart holds it as this image's sidecar")
        text_entry = samples[number]
        if text_entry["length"] > self.max_file_size:
            raise WebshartError(f"{shard.index}: {member!r} is larger than max_file_size; SimpleTuner fails reading "
                                f"it as the caption of {name!r}")
        data = _pread(shard.tar, text_entry["offset"], text_entry["length"])
        if isinstance(data, str):
            raise WebshartError(f"{shard.tar}: cannot read {member!r}, the caption of {name!r}: {data}")
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise WebshartError(f"{shard.tar}: {member!r} (the caption of {name!r}) is not UTF-8; SimpleTuner fails "
                                "reading it") from None
        return ([text], None) if text else ([], f"{member!r} is blank")

    def _caption_key_values(self, shard: _Shard, entry: dict) -> list:
        """WebshartDataBackend._select_caption_keys: the caption values of the image's sidecar JSON and index
        entry for webshart.caption_key."""
        json_metadata = entry.get("json_metadata")
        if json_metadata is None and entry.get("json_path"):
            offset, length = entry.get("json_offset"), entry.get("json_length")
            if offset is not None and length is not None and length <= self.max_file_size:
                data = _pread(shard.tar, offset, length)
                if isinstance(data, str):
                    raise WebshartError(f"{shard.tar}: cannot read {entry['json_path']!r}, the JSON of "
                                        f"{entry['path']!r}: {data}")
                try:
                    json_metadata = json.loads(data)
                except ValueError:
                    raise WebshartError(f"{shard.tar}: {entry['json_path']!r} is not JSON; SimpleTuner fails reading "
                                        f"it for {entry['path']!r}") from None
        sources: list = [json_metadata or {}, entry]
        sources += [source.get("captions") for source in list(sources) if isinstance(source, dict)]
        keys = [self.caption_key] if isinstance(self.caption_key, str) else self.caption_key
        found: list = []
        for key in keys:
            for source in sources:
                if isinstance(source, dict) and key in source:
                    found.extend(_payload_values(source[key]))
                    break
        return found

    # -- reading ----------------------------------------------------------------------------------------------

    def read(self, keys: list[str]) -> tuple[list[bytes | None], list[tuple[int, str]]]:
        """The bytes of each key's image, as the last listing located them (listing first if there was none), and
        (position, why) for those that cannot be read: a tar cut short, gone, or changed since the listing (list
        again); never raises for one sample."""
        if self._shards is None:
            self.listing()
        shards = self._shards
        found: list[bytes | None] = [None] * len(keys)
        failed: list[tuple[int, str]] = []
        wanted: dict[int, list[tuple[int, int, int]]] = {}  # shard -> (position, offset, length)
        for position, key in enumerate(keys):
            located = _locate(key, shards)
            if isinstance(located, str):
                failed.append((position, located))
                continue
            number, offset, length = located
            wanted.setdefault(number, []).append((position, offset, length))
        for number, items in wanted.items():
            tar = shards[number].tar
            try:
                handle = os.open(tar, os.O_RDONLY)
            except OSError as error:
                failed.extend((position, f"cannot open {tar}: {error.strerror}") for position, _, _ in items)
                continue
            try:
                stat = os.fstat(handle)
                if (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns) != shards[number].stamp:
                    # The offsets are the listing's: another tar under this name may hold other bytes there.
                    failed.extend((position, f"{tar} changed since it was listed") for position, _, _ in items)
                    continue
                for position, offset, length in sorted(items, key=lambda item: item[1]):
                    data = _pread_fd(handle, offset, length)
                    if isinstance(data, str):
                        failed.append((position, f"{tar}: {data}"))
                    else:
                        found[position] = data
            finally:
                os.close(handle)
        failed.sort()
        return found, failed


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.scandir's surrogate escapes for bytes that are not UTF-8
        return False


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _index_files(document, where: str) -> list[dict]:
    """An index's members as webshart's ShardMetadata holds them (each a dict: `path`, `offset`, `length` and the
    optional fields, `caption` read as `captions`, null optional fields dropped, custom fields kept), sorted by
    name; WebshartError for an index webshart refuses, or one it would read ambiguously. The dicts are the
    document's own, changed in place."""
    if not isinstance(document, dict):
        raise WebshartError(f"{where}: a webshart index is a JSON object")
    files = document.get("files")
    if isinstance(files, dict):
        # The map layout requires an integer filesize (webshart refuses the index without it).
        if not _is_count(document.get("filesize")):
            raise WebshartError(f"{where}: /filesize: an index whose files are a map needs the tar's size (webshart "
                                "refuses it otherwise)")
        items = files.items()
    elif isinstance(files, list):
        items = ((None, item) for item in files)
    else:
        raise WebshartError(f"{where}: /files: a map or a list of the tar's members")
    out = []
    append = out.append
    for key, item in items:
        # The common member (no alias, no null) is checked in place; the rest goes through _canonical.
        if type(item) is not dict or not _ALIASES.isdisjoint(item) or None in item.values():
            item = _canonical(key, item, where)
        elif "path" not in item:
            item["path"] = key
        path, offset, length = item.get("path"), item.get("offset"), item.get("length")
        if type(path) is not str or not path:
            raise WebshartError(f"{where}: /files/{key}: a member needs its name (path)")
        if type(offset) is not int or offset < 0 or type(length) is not int or length < 0:
            raise WebshartError(f"{where}: {path!r}: offset and length are byte counts")
        width, height = item.get("width"), item.get("height")
        if width is not None and (type(width) is not int or width <= 0):
            raise WebshartError(f"{where}: {path!r}: width is a positive integer (got {width!r})")
        if height is not None and (type(height) is not int or height <= 0):
            raise WebshartError(f"{where}: {path!r}: height is a positive integer (got {height!r})")
        captions = item.get("captions")
        if captions is not None and type(captions) is not str and not _caption_value_ok(captions):
            raise WebshartError(f"{where}: {path!r}: captions are a string, a JSON object or a list of them")
        if "json_path" in item or "json_offset" in item or "json_length" in item:
            json_offset, json_length = item.get("json_offset", 0), item.get("json_length", 0)
            if (type(item.get("json_path", "")) is not str or type(json_offset) is not int or json_offset < 0
                    or type(json_length) is not int or json_length < 0):
                raise WebshartError(f"{where}: {path!r}: json_path is a member name, json_offset and json_length "
                                    "byte counts")
        append(item)
    out.sort(key=_by_path)  # str order is the byte order of UTF-8, as webshart sorts
    for before, after in zip(out, out[1:]):
        if before["path"] == after["path"]:
            raise WebshartError(f"{where}: {before['path']!r} is listed twice")
    return out


def _by_path(entry: dict) -> str:
    return entry["path"]


def _canonical(key: str | None, item, where: str) -> dict:
    """A member with aliases (`fname`, `filename`, `size`, `caption`) or null fields, as webshart reads it."""
    at = f"{where}: /files/{key}" if key is not None else f"{where}: /files"
    if not isinstance(item, dict):
        raise WebshartError(f"{at}: each member is an object")
    names = [name for name in ("path", "fname", "filename") if name in item]
    if len(names) > 1:
        raise WebshartError(f"{at}: {names[0]!r} and {names[1]!r} both name the member")
    path = item[names[0]] if names else None
    if path is None:
        path = key  # the map key, when the entry names no path
    lengths = [name for name in ("length", "size") if name in item]
    if len(lengths) != 1:
        raise WebshartError(f"{at}: a member needs one of length (or size)")
    if "caption" in item and "captions" in item:
        raise WebshartError(f"{at}: caption and captions both given (webshart refuses the index)")
    entry = {"path": path, "offset": item.get("offset"), "length": item[lengths[0]]}
    for name, value in item.items():
        if name in ("path", "fname", "filename", "length", "size", "offset", "caption", "captions"):
            continue
        if value is not None or name not in _OPTIONAL_FIELDS:  # webshart drops its own fields when null
            entry[name] = value
    caption = item.get("captions", item.get("caption"))
    if caption is not None:
        entry["captions"] = caption
    return entry


def _caption_value_ok(value) -> bool:
    if isinstance(value, (str, dict)):
        return True
    return isinstance(value, list) and all(isinstance(item, (str, dict)) for item in value)


def _spellings(word: str) -> frozenset[str]:
    """Every ASCII upper/lower-case spelling of `word` (webshart compares extensions with eq_ignore_ascii_case)."""
    spellings = {""}
    for letter in word:
        spellings = {start + case for start in spellings for case in (letter.lower(), letter.upper())}
    return frozenset(spellings)


_JSON, _TXT = _spellings("json"), _spellings("txt")


def _samples(files: list[dict]) -> list[dict]:
    """The logical samples of a shard's sorted index files (ShardMetadata::infer_json_sidecars and
    rebuild_sample_index): a member's stem is its name before the last dot (folders included); a `.txt` whose stem
    is a non-sidecar's and a `.json` whose stem is a non-`.json`'s are sidecars, not samples; each sample gets its
    JSON sidecar's name, offset and length where the index names none (the last `.json` of its stem)."""
    kinds = []
    primary, not_json, json_by_stem = set(), set(), {}
    for entry in files:
        name = entry["path"]
        dot = name.rfind(".")
        if dot < 0:
            stem, kind = name, 0
        else:
            stem, extension = name[:dot], name[dot + 1:]
            kind = 1 if extension in _JSON else 2 if extension in _TXT else 0
        kinds.append((stem, kind))
        if kind == 1:
            json_by_stem[stem] = entry
        else:
            not_json.add(stem)
            if kind == 0:
                primary.add(stem)
    samples = []
    for entry, (stem, kind) in zip(files, kinds):
        if kind == 1:
            if stem not in not_json:
                samples.append(entry)
            continue
        if kind == 2 and stem in primary:
            continue
        sidecar = json_by_stem.get(stem)
        if sidecar is not None:
            if "json_path" not in entry:
                entry["json_path"] = sidecar["path"]
            if "json_offset" not in entry:
                entry["json_offset"] = sidecar["offset"]
            if "json_length" not in entry:
                entry["json_length"] = sidecar["length"]
        samples.append(entry)
    return samples


def _payload_values(caption) -> list:
    """PromptHandler._caption_payload_values: strings stripped, blanks dropped, objects kept, lists flattened."""
    if caption is None:
        return []
    if isinstance(caption, str):
        caption = caption.strip()
        return [caption] if caption else []
    if isinstance(caption, dict):
        return [caption]
    if isinstance(caption, (list, tuple)):
        return [value for item in caption for value in _payload_values(item)]
    caption = str(caption).strip()
    return [caption] if caption else []


def _normalized(caption) -> list[str]:
    """PromptHandler._normalize_caption_payload: the values, a JSON object written as compact JSON."""
    return [json.dumps(value, ensure_ascii=False, separators=(",", ":")) if isinstance(value, dict) else value
            for value in _payload_values(caption)]


def _instance_prompts(prompt) -> list[str]:
    return [prompt.strip()] if isinstance(prompt, str) else [str(value).strip() for value in prompt]


def _locate(key: str, shards: list[_Shard]) -> tuple[int, int, int] | str:
    """(shard number, offset, length) of a sample name from the listing, or why it names none."""
    if not key.startswith(PREFIX):
        return f"{key!r} is not a webshart sample name"
    parts = key[len(PREFIX):].split("/", 2)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return f"{key!r} is not a webshart sample name"
    number, sample = int(parts[0]), int(parts[1])
    if number >= len(shards) or sample >= len(shards[number].samples) or shards[number].samples[sample] != parts[2]:
        return f"{key!r} is not in the dataset as last listed"
    shard = shards[number]
    return number, int(shard.offsets[sample]), int(shard.lengths[sample])


def _pread_fd(handle: int, offset: int, length: int) -> bytes | str:
    """`length` bytes at `offset`, or why not (a tar cut short)."""
    try:
        chunks, done = [], 0
        while done < length:
            chunk = os.pread(handle, length - done, offset + done)
            if not chunk:
                return f"ends before the member's {length} bytes at offset {offset} (the shard is cut short)"
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)
    except OSError as error:
        return f"cannot read {length} bytes at offset {offset}: {error.strerror}"


def _pread(path: str, offset: int, length: int) -> bytes | str:
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError as error:
        return error.strerror or str(error)
    try:
        return _pread_fd(handle, offset, length)
    finally:
        os.close(handle)
