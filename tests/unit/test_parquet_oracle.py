"""`metadata_backend: parquet`: the plan sizes and captions each image as SimpleTuner 4.10.1 does.

Judges: SimpleTuner's own `LocalDataBackend.list_files` (the images), `configure_parquet_database` (what it refuses),
`ParquetMetadataBackend._process_for_bucket` (the original size each image is bucketed by, or none) and
`PromptHandler.prepare_instance_prompt_from_parquet` over `_extract_captions_to_fast_list` (the captions), on a
folder with nested images, dots, spaces and non-ASCII in names, a stem containing the folder's name, repeated and
blank rows, list captions and an image without a row. The parquet's sizes differ from the files' own, so the sizes
can only come from the table.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_cache_build_plan import TEXT, write_config

from lcm_plugin.cache_build.plan import BuildError, datasets_of, read_run, scan_dataset

from simpletuner.helpers.data_backend.dataset_types import DatasetType  # noqa: E402
from simpletuner.helpers.data_backend.factory import configure_parquet_database  # noqa: E402
from simpletuner.helpers.data_backend.local import LocalDataBackend  # noqa: E402
from simpletuner.helpers.metadata.backends import parquet as simpletuner_parquet  # noqa: E402
from simpletuner.helpers.prompts import PromptHandler  # noqa: E402
from simpletuner.helpers.training import image_file_extensions  # noqa: E402
from simpletuner.helpers.training.state_tracker import StateTracker  # noqa: E402

DATASET = "photos"
# Image files (relative to the data folder) and their real sizes.
FILES = {
    "a.png": (40, 30),
    "sub/b.png": (30, 40),
    "c.d.png": (50, 50),
    "my data shots 1.png": (20, 60),
    "x y é.jpg": (64, 32),
    "e.png": (32, 32),
    "missing.png": (32, 32),
}


def rows(includes_extension: bool) -> list[tuple[str, int, int, object]]:
    """(id, width, height, caption) rows; ids with or without the extension."""
    name = (lambda file: file) if includes_extension else (lambda file: os.path.splitext(file)[0])
    return [
        (name("a.png"), 640, 480, "  a red circle  "),
        (name("b.png"), 64, 128, "b by its file name"),  # sizes look images up by the file name alone...
        (name("sub/b.png"), 999, 999, "first"),  # ...captions by the path below the folder
        (name("sub/b.png"), 999, 999, "second"),  # the last row of an id names its captions
        (name("b.png"), 128, 64, "b again"),  # the first row of an id gives its size
        (name("c.d.png"), 300, 100, ["  one ", "", "two", "   "]),
        (name("my data shots 1.png"), 200, 600, "the folder's name inside a file name"),
        (name("x y é.jpg"), 1024, 512, "spaces and é"),
        (name("e.png"), 256, 256, "kept"),
        (name("e.png"), 512, 512, "   "),  # blank: skipped, the earlier caption stays
    ]


def write_parquet(path: Path, table_rows: list, list_captions: bool) -> None:
    """The rows, captions as strings (list rows left out) or as lists of strings (a string c as [c])."""
    if not list_captions:
        table_rows = [row for row in table_rows if not isinstance(row[3], list)]
    captions = [c if isinstance(c, list) or not list_captions else [c] for *_, c in table_rows]
    pq.write_table(pa.table({
        "file": pa.array([row[0] for row in table_rows], pa.string()),
        "w": pa.array([row[1] for row in table_rows], pa.int64()),
        "h": pa.array([row[2] for row in table_rows], pa.int64()),
        "text": pa.array(captions, pa.list_(pa.string()) if list_captions else pa.string()),
    }), path)


def write_run(tmp_path: Path, *, includes_extension: bool, relative_folder: bool, list_captions: bool = False,
              table_rows: list | None = None, prepend: str | None = None) -> tuple[Path, dict]:
    root = tmp_path / "run"
    root.mkdir()
    folder = "data/" if relative_folder else str(root / "data") + "/"  # SimpleTuner strips one trailing "/"
    table_rows = table_rows if table_rows is not None else rows(includes_extension)
    entry = {
        "id": DATASET, "type": "local", "instance_data_dir": folder, "caption_strategy": "parquet",
        "metadata_backend": "parquet", "resolution": 64, "resolution_type": "pixel", "minimum_image_size": 0,
        "parquet": {"path": str(root / "meta.parquet"), "filename_column": "file", "caption_column": "text",
                    "width_column": "w", "height_column": "h", "identifier_includes_extension": includes_extension},
    }
    if prepend:
        entry |= {"prepend_instance_prompt": True, "instance_prompt": prepend}
    write_config(root, [entry, TEXT])
    for file, size in FILES.items():
        (root / "data" / file).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (200, 30, 30)).save(root / "data" / file)
    write_parquet(root / "meta.parquet", table_rows, list_captions)
    return root, entry


def plan(root: Path):
    settings, entries = read_run(root)
    (dataset,) = datasets_of(settings, entries)
    return scan_dataset(dataset, settings.seed)


def ours(root: Path) -> tuple[dict, dict, set]:
    """path -> original size and path -> captions of the planned images, and the paths left out."""
    dataset = plan(root)
    sizes = {item.path: tuple(item.sample["original_size"]) for item in dataset.images}
    captions = {item.path: list(item.captions) for item in dataset.images}
    left_out = {str(path) for path, _ in dataset.excluded + dataset.skipped}
    return sizes, captions, left_out


class _Geometry:
    """Stands in for TrainingSample: the bucketer's geometry is judged in test_bucketing_oracle; here, the size."""

    def __init__(self, **_):
        pass

    def prepare(self):
        return SimpleNamespace(aspect_ratio=1.0, intermediary_size=(1, 1), crop_coordinates=(0, 0), target_size=(1, 1))


def simpletuners(root: Path, entry: dict, monkeypatch, data_backend=None) -> tuple[dict, dict, dict]:
    """SimpleTuner's sizes (path -> original size, for the images it buckets), captions (path -> captions, for the
    images whose caption it finds) and caption cache (`_extract_captions_to_fast_list`'s dict) of the same run, the
    trainer started in `root`; `data_backend`: SimpleTuner's S3DataBackend of a `type: aws` entry."""
    monkeypatch.chdir(root)
    monkeypatch.setattr(simpletuner_parquet, "TrainingSample", _Geometry)
    if data_backend is None:
        data_backend = LocalDataBackend(accelerator=SimpleNamespace(), id=DATASET)
        folder = entry["instance_data_dir"]
        metadata_folder = folder.strip().rstrip("/")  # FactoryRegistry's local rule
    else:  # FactoryRegistry's aws rule: the key prefix, as it is
        folder = metadata_folder = entry["aws_data_prefix"]
    listing = data_backend.list_files(file_extensions=image_file_extensions, instance_data_dir=folder)
    paths = [path for _, _, files in listing for path in files]
    args = SimpleNamespace(parquet_caption_column=None, parquet_filename_column=None)
    configure_parquet_database(json.loads(json.dumps(entry)), args, data_backend)
    backend = object.__new__(simpletuner_parquet.ParquetMetadataBackend)
    backend.id, backend.data_backend, backend.dataset_type = DATASET, data_backend, DatasetType.IMAGE
    backend.parquet_config, backend.parquet_path = entry["parquet"], entry["parquet"]["path"]
    backend.is_json_lines = backend.is_json_file = False
    backend.num_frames_column = backend.fps_column = None
    backend.delete_unwanted_images = False
    backend.instance_data_dir = metadata_folder
    backend.meets_resolution_requirements = lambda image_metadata: True
    backend.load_parquet_database()
    backend.caption_cache = backend._extract_captions_to_fast_list()
    StateTracker.register_data_backend({"id": DATASET, "metadata_backend": backend})
    StateTracker.set_data_backend_config(  # FactoryRegistry: an aws entry's config takes the prefix
        DATASET, {"instance_data_dir": entry.get("instance_data_dir", entry.get("aws_data_prefix", ""))})
    sizes, captions = {}, {}
    for path in paths:
        metadata: dict = {}
        backend._process_for_bucket(path, {}, metadata_updates=metadata, statistics={})
        if path in metadata:
            sizes[path] = tuple(metadata[path]["original_size"])
        try:
            caption = PromptHandler.prepare_instance_prompt_from_parquet(
                path, use_captions=True, prepend_instance_prompt=bool(entry.get("prepend_instance_prompt")),
                data_backend=data_backend, instance_prompt=entry.get("instance_prompt"), sampler_backend_id=DATASET,
            )
        except Exception:  # CaptionNotFoundError and whatever SimpleTuner raises for an image it cannot caption
            continue
        caption = caption if isinstance(caption, list) else [caption]
        if caption:  # an image whose every caption is blank is not captioned
            captions[path] = caption
    return sizes, captions, backend.caption_cache


@pytest.mark.parametrize("includes_extension", [False, True])
@pytest.mark.parametrize("relative_folder", [False, True])
@pytest.mark.parametrize("list_captions", [False, True])
def test_sizes_and_captions_are_simpletuners(tmp_path, monkeypatch, includes_extension, relative_folder, list_captions):
    root, entry = write_run(tmp_path, includes_extension=includes_extension, relative_folder=relative_folder,
                            list_captions=list_captions)
    expected_sizes, expected_captions, caption_cache = simpletuners(root, entry, monkeypatch)
    sizes, captions, left_out = ours(root)

    # An image is planned when SimpleTuner buckets it and finds its captions; the rest go to SimpleTuner's path.
    both = expected_sizes.keys() & expected_captions.keys()
    assert set(sizes) == both
    assert sizes == {path: expected_sizes[path] for path in both}
    assert captions == {path: expected_captions[path] for path in both}
    assert left_out == {str(root / "data" / file) for file in FILES} - both
    if not relative_folder:  # the case plans something, with sizes from the table, not the files
        assert str(root / "data" / "a.png") in sizes and sizes[str(root / "data" / "a.png")] == (640, 480)
    # What data path D8 hands SimpleTuner instead of its row-by-row pass: the same dict, shapes included
    assert plan(root).parquet_table.captions == caption_cache and caption_cache


def test_the_captions_are_handed_over_once_and_only_for_the_planned_table(tmp_path, monkeypatch):
    from lcm_plugin import trainer_cache

    root, entry = write_run(tmp_path, includes_extension=False, relative_folder=False)
    dataset = plan(root)
    monkeypatch.setattr(trainer_cache, "_coverage", trainer_cache.Coverage(datasets={DATASET: trainer_cache.DatasetCache(
        DATASET, None, {}, parquet_captions=(dataset.parquet, dataset.parquet_table.captions))}))
    for other in ({"caption_column": "w"}, {"identifier_includes_extension": True}, {"path": "other.parquet"}):
        assert trainer_cache.take_parquet_captions(DATASET, entry["parquet"] | other) is None
    assert trainer_cache.take_parquet_captions("another", entry["parquet"]) is None
    assert trainer_cache.take_parquet_captions(DATASET, entry["parquet"]) == dataset.parquet_table.captions
    assert trainer_cache.take_parquet_captions(DATASET, entry["parquet"]) is None  # once


def test_the_instance_prompt_is_prepended_as_simpletuner_does(tmp_path, monkeypatch):
    root, entry = write_run(tmp_path, includes_extension=False, relative_folder=False, prepend="sks")
    _, expected_captions, _ = simpletuners(root, entry, monkeypatch)
    _, captions, _ = ours(root)
    assert captions and captions == {path: expected_captions[path] for path in captions}
    assert all(caption.startswith("sks ") for values in captions.values() for caption in values)


def test_empty_strings_are_refused_as_simpletuner_refuses_them(tmp_path, monkeypatch):
    table_rows = [("a", 640, 480, "a caption"), ("e", 256, 256, "")]
    root, entry = write_run(tmp_path, includes_extension=False, relative_folder=False, table_rows=table_rows)
    with pytest.raises(ValueError, match="empty strings"):
        simpletuners(root, entry, monkeypatch)
    with pytest.raises(BuildError, match=r"meta\.parquet: empty strings in column 'text'"):
        ours(root)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"filename_column": None}, r"/0/parquet/filename_column: give the column of file names"),
        ({"caption_column": ["text", "w"]}, r"/0/parquet/caption_column: cache build reads captions from one column"),
        ({"aspect_ratio_column": "ar"}, r"/0/parquet/aspect_ratio_column: not read by cache build"),
        ({"path": "meta.jsonl"}, r"/0/parquet/path: cache build reads \.parquet files"),
        ({"width_column": "nope"}, r"meta\.parquet: no column 'nope'"),
        ({"width_column": "text"}, r"column 'text' holds string; cache build reads integers"),
        ({"path": "absent.parquet"}, r"/0/parquet/path: cannot read .*absent\.parquet"),
    ],
)
def test_what_the_mirror_does_not_read_names_its_key(tmp_path, change, message):
    root, entry = write_run(tmp_path, includes_extension=False, relative_folder=False)
    entry["parquet"] = {key: value for key, value in (entry["parquet"] | change).items() if value is not None}
    (root / "config" / "multidatabackend.json").write_text(json.dumps([entry, TEXT]))
    with pytest.raises(BuildError, match=message):
        ours(root)


@pytest.fixture(scope="module")
def s3_server():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from s3_server import S3Server

    with S3Server() as server:
        yield server


def s3_run(tmp_path: Path, server, *, prefix: str, includes_extension: bool, list_captions: bool):
    """write_run's files and table as objects of a bucket of their own: the images under `prefix`, the table at
    `meta.parquet`; the entry a `type: aws` one. Returns (root, entry, SimpleTuner's S3DataBackend of it)."""
    from simpletuner.helpers.data_backend.aws import S3DataBackend

    root, entry = write_run(tmp_path, includes_extension=includes_extension, relative_folder=False,
                            list_captions=list_captions)
    bucket = "parquet-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:16]
    client = server.client()
    client.create_bucket(Bucket=bucket)
    for file in FILES:
        client.put_object(Bucket=bucket, Key=prefix + file, Body=(root / "data" / file).read_bytes())
    client.put_object(Bucket=bucket, Key="meta.parquet", Body=(root / "meta.parquet").read_bytes())
    entry = {key: value for key, value in entry.items() if key != "instance_data_dir"} | {
        "type": "aws", "aws_bucket_name": bucket, "aws_data_prefix": prefix, "aws_region_name": "us-east-1",
        "aws_endpoint_url": server.endpoint, "aws_access_key_id": "test", "aws_secret_access_key": "test",
        "cache_dir_vae": "cache/vae", "parquet": entry["parquet"] | {"path": "meta.parquet"}}
    (root / "config" / "multidatabackend.json").write_text(json.dumps([entry, TEXT]))
    data_backend = S3DataBackend(id=DATASET, bucket_name=bucket, accelerator=None, endpoint_url=server.endpoint,
                                 aws_access_key_id="test", aws_secret_access_key="test", read_retry_interval=0,
                                 data_prefix=prefix)
    return root, entry, data_backend


@pytest.mark.parametrize("prefix", ["", "data/"])
@pytest.mark.parametrize("includes_extension", [False, True])
@pytest.mark.parametrize("list_captions", [False, True])
def test_an_s3_datasets_sizes_and_captions_are_simpletuners(tmp_path, monkeypatch, s3_server, prefix,
                                                             includes_extension, list_captions):
    """The table is an object of the bucket, read by column from memory; SimpleTuner's S3 backend, its
    ParquetMetadataBackend and prompt handler on the same bucket are the judges, with the key prefix cut out of ids
    as its factory's aws rules set the folders."""
    root, entry, data_backend = s3_run(tmp_path, s3_server, prefix=prefix, includes_extension=includes_extension,
                                       list_captions=list_captions)
    expected_sizes, expected_captions, caption_cache = simpletuners(root, entry, monkeypatch, data_backend)
    sizes, captions, left_out = ours(root)
    both = expected_sizes.keys() & expected_captions.keys()
    assert both and set(sizes) == both
    assert sizes == {key: expected_sizes[key] for key in both}
    assert captions == {key: expected_captions[key] for key in both}
    assert left_out == {prefix + file for file in FILES} - both
    assert sizes[prefix + "a.png"] == (640, 480)  # the table's size, not the file's
    assert plan(root).parquet_table.captions == caption_cache and caption_cache


def test_an_s3_table_that_is_not_there_is_named(tmp_path, s3_server):
    root, entry, _ = s3_run(tmp_path, s3_server, prefix="", includes_extension=False, list_captions=False)
    entry["parquet"]["path"] = "absent.parquet"
    (root / "config" / "multidatabackend.json").write_text(json.dumps([entry, TEXT]))
    with pytest.raises(BuildError, match=r"/0/parquet/path: cannot read absent\.parquet in S3Bucket\(.*not found"):
        ours(root)
