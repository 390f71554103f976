"""`type: huggingface` datasets (local folders): the reader lists, sizes, captions and reads each row as SimpleTuner
4.10.1 (with `datasets`) does.

Judges, built from the same multidatabackend.json entry, started in the run folder as the factory starts them:
`create_backend_config` and `HuggingfaceBackendBuilder` (which keys reach the data backend), SimpleTuner's
`HuggingfaceDatasetsBackend` (`list_files`: names and order; `read_image` and `read`: pixels and bytes),
`FactoryRegistry._configure_metadata_backend` building its `HuggingfaceMetadataBackend` (captions; where its bucket
files go) and that backend's `refresh_buckets` (which rows it buckets, by which size), and
`PromptHandler.get_all_captions` (the captions, and the rows it finds none for). The datasets
(tests/hf_datasets.py) are parquet files of several row groups, `Dataset.to_parquet` and Arrow files, with JPEG and
PNG photos of mixed sizes, an EXIF-rotated JPEG, blank, empty, missing and list captions, width/height columns that
disagree with the pixels, an empty image cell and an empty width cell.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_datasets  # noqa: E402

from packed_oracle import Geometry, listed  # noqa: E402

from lcm_plugin.cache_build.hf_source import HuggingfaceError, hf_source  # noqa: E402
from lcm_plugin.cache_build.packed import SourceListing  # noqa: E402

from simpletuner.helpers.data_backend.builders.huggingface import HuggingfaceBackendBuilder  # noqa: E402
from simpletuner.helpers.data_backend.config import create_backend_config  # noqa: E402
from simpletuner.helpers.data_backend.factory import FactoryRegistry, init_backend_config  # noqa: E402
from simpletuner.helpers.data_backend.huggingface import HuggingfaceDatasetsBackend  # noqa: E402
from simpletuner.helpers.metadata.backends import huggingface as simpletuner_huggingface  # noqa: E402
from simpletuner.helpers.prompts import PromptHandler  # noqa: E402
from simpletuner.helpers.training import image_file_extensions  # noqa: E402
from simpletuner.helpers.training.state_tracker import StateTracker  # noqa: E402

DATASET = "photos"
ORIENTATION = hf_datasets.EXIF_ORIENTATION
ROTATED, EMPTY_IMAGE, EMPTY_WIDTH, CORRUPT = 4, 21, 9, 5  # rows of hf_datasets.rows() the cases change


def main_rows() -> list[hf_datasets.Row]:
    table = hf_datasets.rows()
    table[EMPTY_IMAGE] = dataclasses.replace(table[EMPTY_IMAGE], no_image=True)
    return table


def described_rows() -> list[hf_datasets.Row]:
    """Descriptions only SimpleTuner's description fallback reads: a caption-less row's, and none (-> "None")."""
    table = hf_datasets.rows()
    table[11] = dataclasses.replace(table[11], description="  described in words  ")
    return table


@pytest.fixture(scope="module")
def datasets_folder(tmp_path_factory) -> Path:
    """Every layout, written once; each test copies what it uses into its run folder."""
    folder = tmp_path_factory.mktemp("hf")
    hf_datasets.write_parquet(folder / "photos", main_rows())
    sized = main_rows()
    sized[EMPTY_WIDTH] = dataclasses.replace(sized[EMPTY_WIDTH], no_width=True)
    hf_datasets.write_parquet(folder / "sized", sized, sizes=True, files=2, row_group_size=7)
    hf_datasets.write_parquet(folder / "plain", sized, sizes=True, files=1, features_metadata=False)
    hf_datasets.write_to_parquet(folder / "to_parquet", main_rows())
    hf_datasets.write_arrow(folder / "arrow", main_rows())
    hf_datasets.write_parquet(folder / "described", described_rows(), descriptions=True, files=2)
    corrupt = hf_datasets.rows()
    corrupt[CORRUPT] = dataclasses.replace(corrupt[CORRUPT], corrupt=True)
    hf_datasets.write_parquet(folder / "corrupt", corrupt, files=2)
    hf_datasets.write_saved(folder / "saved", hf_datasets.rows()[:6])
    return folder


@pytest.fixture
def root(tmp_path, datasets_folder) -> Path:
    """A run folder holding the datasets under `data/`; SimpleTuner is started in it."""
    shutil.copytree(datasets_folder, tmp_path / "data", ignore=shutil.ignore_patterns("*-saved"))
    return tmp_path


def entry_of(layout: str = "photos", block: dict | None = None, **changes) -> dict:
    entry = {"id": DATASET, "type": "huggingface", "dataset_name": f"data/{layout}", "resolution": 64,
             "resolution_type": "pixel", "minimum_image_size": 0}
    if block is not None:
        entry["huggingface"] = block
    return entry | changes


def ours(root: Path, entry: dict, **options):
    return listed(hf_source, root, entry, **options)


class _Anything:
    """The factory's bucket report: every call accepted, nothing kept."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


ACCELERATOR = SimpleNamespace(main_process_first=contextlib.nullcontext, wait_for_everyone=lambda: None,
                              is_local_main_process=True, is_main_process=True, num_processes=1, device="cpu")


def trainer_args(root: Path, cache_dir: str | None) -> SimpleNamespace:
    return SimpleNamespace(
        cache_dir=cache_dir, output_dir=str(root / "output"), resolution=64, resolution_type="pixel",
        minimum_image_size=0, metadata_update_interval=3600, delete_problematic_images=False,
        delete_unwanted_images=False, train_batch_size=1, model_family="sdxl", caption_strategy="filename",
        compress_disk_cache=False, controlnet=False, vae_cache_disable=False, vae_cache_ondemand=False,
        maximum_image_size=None, target_downsample_size=None, webhook_config=None)


def state(monkeypatch, root: Path, args=None) -> None:
    """A fresh StateTracker for one judgement, SimpleTuner started in `root`."""
    monkeypatch.chdir(root)
    monkeypatch.delenv("SIMPLETUNER_CACHE_DIR", raising=False)
    monkeypatch.setattr(StateTracker, "args", args or SimpleNamespace(output_dir=str(root / "output"), cache_dir=None))
    monkeypatch.setattr(StateTracker, "data_backends", {})
    monkeypatch.setattr(StateTracker, "all_image_files", {})
    monkeypatch.setattr(StateTracker, "webhook_handler", None)
    monkeypatch.setattr(StateTracker, "_save_to_disk", classmethod(lambda cls, name, data: None))


def data_backend_of(entry: dict, args) -> HuggingfaceDatasetsBackend:
    """The data backend the factory builds for `entry` (its defaults, create_backend_config, then the builder)."""
    entry = json.loads(json.dumps(entry))
    init_backend_config(entry, args, ACCELERATOR)
    config = create_backend_config(entry, vars(args))
    return HuggingfaceBackendBuilder(ACCELERATOR, args).build(config)


class Theirs(SimpleNamespace):
    data_backend: HuggingfaceDatasetsBackend
    listed: list  # list_files
    bucketed: dict  # row name -> the original_size its metadata backend recorded
    captions: dict  # row name -> captions get_all_captions gives
    missing: set  # rows get_all_captions finds no caption for
    metadata_backend: object


def simpletuners(root: Path, entry: dict, monkeypatch, cache_dir: str | None = None) -> Theirs:
    """SimpleTuner's backends for `entry`, started in `root` as its factory starts them, and what they decide."""
    args = trainer_args(root, cache_dir)
    state(monkeypatch, root, args)
    monkeypatch.setattr(simpletuner_huggingface, "TrainingSample", Geometry)
    monkeypatch.setattr(simpletuner_huggingface.HuggingfaceMetadataBackend, "meets_resolution_requirements",
                        lambda self, image_metadata: True)
    entry = json.loads(json.dumps(entry))
    # FactoryRegistry._configure_single_data_backend's steps: the entry's defaults (metadata_backend and
    # caption_strategy huggingface), the data backend by its builder, then the metadata backend.
    init = init_backend_config(entry, args, ACCELERATOR) | {"bucket_report": _Anything()}
    StateTracker.set_data_backend_config(init["id"], init["config"])
    factory = SimpleNamespace(args=args, accelerator=ACCELERATOR)
    factory._default_vae_cache_dir = lambda *names: FactoryRegistry._default_vae_cache_dir(factory, *names)
    FactoryRegistry._configure_backend_by_type(factory, entry, init)
    data_backend = init["data_backend"]
    FactoryRegistry._configure_metadata_backend(factory, entry, init)
    metadata_backend = init["metadata_backend"]
    StateTracker.register_data_backend(init)
    metadata_backend.refresh_buckets()  # what _handle_bucket_operations runs on the main process
    bucketed = {path: tuple(metadata["original_size"]) for path, metadata in metadata_backend.image_metadata.items()}
    assert set(bucketed) == {path for paths in metadata_backend.aspect_ratio_bucket_indices.values() for path in paths}
    strategy = entry["caption_strategy"]
    texts, missing, paths = PromptHandler.get_all_captions(
        instance_data_dir="", use_captions=strategy != "instanceprompt",
        prepend_instance_prompt=bool(entry.get("prepend_instance_prompt")), data_backend=data_backend,
        caption_strategy=strategy, instance_prompt=entry.get("instance_prompt"), return_image_paths=True)
    captions: dict[str, list[str]] = {}
    for path, text in zip(paths, texts):
        captions.setdefault(path, []).append(text)
    (_, _, listed), = data_backend.list_files(file_extensions=image_file_extensions, instance_data_dir="")
    return Theirs(data_backend=data_backend, listed=listed, bucketed=bucketed, captions=captions, missing=set(missing),
                  metadata_backend=metadata_backend)


def pixels_of_stored(data: bytes) -> np.ndarray:
    """What `datasets` decodes from stored bytes (EXIF orientation applied when the tag is there), as RGB."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.getexif().get(ORIENTATION) is not None:
        image = ImageOps.exif_transpose(image)
    return np.asarray(image.convert("RGB"))


def assert_agrees(listing: SourceListing, source, theirs: Theirs) -> None:
    """Our listing and bytes against SimpleTuner's decisions, row by row."""
    assert listing.keys == theirs.listed
    assert len(listing.keys) == len(listing.stamps) == len(listing.sizes)
    sizes = dict(zip(listing.keys, listing.sizes))
    # What SimpleTuner buckets is every row we do not leave out; a size we give is the one it records.
    assert set(theirs.bucketed) == set(listing.keys) - set(listing.left_out)
    assert {key: size for key, size in sizes.items() if size is not None} == {
        key: theirs.bucketed[key] for key, size in sizes.items() if size is not None}
    # Captions: ours are its captions; the rows we say have none are those it gives none.
    assert {key: list(values) for key, values in listing.captions.items()} == theirs.captions
    assert set(listing.missing_captions) == set(listing.keys) - set(theirs.captions)
    assert theirs.missing <= set(listing.missing_captions)
    # Bytes: for an Image column, the pixels SimpleTuner decodes (the PNG of the image datasets decoded) are those of
    # our stored bytes decoded as datasets decodes them, and a size left to the image is that image's size; for a
    # plain column, SimpleTuner reads the stored bytes themselves.
    found, failed = source.read(listing.keys)
    unread = {listing.keys[position] for position, _ in failed}
    for key, data in zip(listing.keys, found):
        theirs_image = theirs.data_backend.read_image(key)
        if key in unread:
            assert data is None and theirs_image is None
            continue
        if source.image_kind == "datasets-image":
            ours_pixels = pixels_of_stored(data)
            assert np.array_equal(ours_pixels, np.asarray(theirs_image.convert("RGB")))
            if sizes[key] is None and key not in listing.left_out:
                assert theirs.bucketed[key] == (ours_pixels.shape[1], ours_pixels.shape[0])
        else:
            assert data == theirs.data_backend.read(key)
    assert unread == {key for key in listing.keys if theirs.data_backend.read(key) is None}


@pytest.mark.parametrize(
    ("layout", "changes"),
    [
        ("photos", {}),
        ("photos", {"huggingface": {"caption_column": ["caption", "tags"]}}),
        ("photos", {"huggingface": {"fallback_caption_column": "alt", "cache_dir": "hf-cache"},
                    "prepend_instance_prompt": True, "instance_prompt": "sks"}),
        ("photos", {"huggingface": {"caption_column": "tags"}, "split": "train", "image_column": "image"}),
        ("sized", {"huggingface": {"width_column": "width", "height_column": "height"}}),
        ("plain", {"huggingface": {"width_column": "width", "height_column": "height", "caption_column": "alt"}}),
        ("to_parquet", {"caption_strategy": "instanceprompt", "instance_prompt": "  a photo of sks "}),
        ("arrow", {"metadata_backend": "huggingface", "caption_strategy": "huggingface", "cache_file_suffix": "x"}),
        ("described", {}),
    ],
    ids=["parquet", "caption-columns", "fallback-prepend", "list-cells", "size-columns", "plain-struct",
         "to-parquet-instanceprompt", "arrow", "description-fallback"],
)
def test_the_listing_is_simpletuners(root, monkeypatch, layout, changes):
    entry = entry_of(layout, **changes)
    cache_dir = str(root / "output" / "cache") if layout == "photos" and not changes else None
    theirs = simpletuners(root, entry, monkeypatch, cache_dir=cache_dir)
    source, listing = ours(root, entry, cache_dir=cache_dir)
    assert_agrees(listing, source, theirs)
    # SimpleTuner wrote its bucket files where we say they are.
    assert all(path.is_file() for path in source.bucket_files)
    assert Path(f"{source.bucket_files[0]}_captions.json").is_file()
    assert str(theirs.metadata_backend.cache_file) == source.bucket_files[0].name


def test_the_hostile_rows_were_there_to_be_judged(root, monkeypatch):
    """The cases above are not vacuous: SimpleTuner sizes the rotated JPEG upright, skips the row without an image,
    takes sizes from the columns when asked, and captions as the quirks below say."""
    entry = entry_of()
    theirs = simpletuners(root, entry, monkeypatch)
    source, listing = ours(root, entry)
    stored = hf_datasets.rows()[ROTATED].size
    assert theirs.bucketed[f"{ROTATED}.jpg"] == stored[::-1]
    assert listing.left_out == {f"{EMPTY_IMAGE}.jpg": "an empty image cell"}
    assert source.image_kind == "datasets-image" and listing.sizes == [None] * len(listing.keys)
    # A blank caption does not fall back; an empty one and a missing one do (to nothing here).
    assert {"7.jpg", "11.jpg", "13.jpg"} <= set(listing.missing_captions)
    assert listing.captions["18.jpg"] == ("tabs\tand\nnewlines inside é ü",)

    # Another id: SimpleTuner reuses the bucket and caption files of an id whatever its dataset_name now says.
    sized = entry_of("sized", {"width_column": "width", "height_column": "height"}, id="sized")
    theirs = simpletuners(root, sized, monkeypatch)
    _, listing = ours(root, sized)
    width, height = hf_datasets.rows()[ROTATED].size
    assert theirs.bucketed[f"{ROTATED}.jpg"] == (2 * width, 2 * height)  # the columns, not the pixels
    assert set(listing.left_out) == {f"{EMPTY_WIDTH}.jpg"}  # an empty image is sized by the columns all the same

    tags = entry_of("photos", {"caption_column": "tags"})
    _, listing = ours(root, tags)
    assert listing.captions["0.jpg"] == ("[' tag 0 ', '', 'second tag', '  ']",)  # a list cell is its repr
    described = entry_of("described")
    _, listing = ours(root, described)
    assert listing.captions["11.jpg"] == ("described in words",) and listing.captions["13.jpg"] == ("None",)


def test_a_corrupt_row_is_reported_for_itself(root, monkeypatch):
    """Bytes PIL cannot open: read() reports that row and reads the others; SimpleTuner's read_image gives None for
    it (and its metadata backend cannot even caption the dataset: `datasets` decodes every row on the way)."""
    entry = entry_of("corrupt")
    source, listing = ours(root, entry)
    found, failed = source.read(listing.keys)
    assert [position for position, _ in failed] == [CORRUPT]
    assert "not an image PIL opens" in failed[0][1] and found[CORRUPT] is None
    args = trainer_args(root, None)
    state(monkeypatch, root, args)
    data_backend = data_backend_of(entry, args)
    assert data_backend.read_image(f"{CORRUPT}.jpg") is None
    for key, data in zip(listing.keys, found):
        if data is not None:
            assert np.array_equal(pixels_of_stored(data), np.asarray(data_backend.read_image(key).convert("RGB")))
    with pytest.raises(OSError):
        simpletuners(root, entry, monkeypatch)


def test_a_save_to_disk_folder_is_refused_as_load_dataset_refuses_it(root, monkeypatch):
    entry = entry_of("saved")
    with pytest.raises(HuggingfaceError, match=r"/0/dataset_name: .*save_to_disk"):
        ours(root, entry)
    args = trainer_args(root, None)
    state(monkeypatch, root, args)
    with pytest.raises(ValueError, match="save_to_disk"):
        data_backend_of(entry, args).list_files(file_extensions=image_file_extensions)


def test_a_plain_struct_column_without_size_columns_is_refused_as_simpletuner_buckets_none_of_it(root, monkeypatch):
    entry = entry_of("plain")
    with pytest.raises(HuggingfaceError, match=r"/0/image_column: .*not a datasets Image feature.*width_column"):
        ours(root, entry)
    assert simpletuners(root, entry, monkeypatch).bucketed == {}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dataset_name": "data/absent"}, r"/0/dataset_name: .*absent' is not a folder"),
        ({"dataset_name": "someone/photos"}, r"/0/dataset_name: .*Hugging Face Hub"),
        ({"huggingface": {"caption_column": "nope"}}, r"/0/huggingface/caption_column: no column 'nope'"),
        ({"huggingface": {"caption_column": ["caption", "nope"]}}, r"/0/huggingface/caption_column: no column"),
        ({"huggingface": {"fallback_caption_column": "nope"}}, r"/0/huggingface/fallback_caption_column: no column"),
        ({"image_column": "nope"}, r"/0/image_column: no column 'nope'"),
        ({"huggingface": {"image_column": "caption"}}, r"/0/huggingface/image_column: column 'caption' holds"),
        ({"huggingface": {"width_column": "w", "height_column": "h"}}, r"/0/huggingface/width_column: no column"),
        ({"huggingface": {"width_column": "caption", "height_column": "caption"}},
         r"column 'caption' holds string .*/0/huggingface/width_column"),
        ({"caption_column": "alt"}, r"/0/caption_column: .*huggingface block only"),
        ({"split": "test"}, r"/0/split: no split 'test'"),
        ({"huggingface": {"split": "test"}}, r"/0/huggingface/split: no split 'test'"),
        ({"split": "train[:10]"}, r"/0/split: cache build reads one whole split"),
        ({"huggingface": {"streaming": True}}, r"/0/huggingface/streaming: .*not a stream"),
        ({"streaming": True}, r"/0/streaming: .*not a stream"),
        ({"filter_func": {"quality_thresholds": {"a": 1}}}, r"/0/filter_func: not read"),
        ({"huggingface": {"composite_image_config": {"enabled": True}}}, r"/0/huggingface/composite_image_config"),
        ({"huggingface": {"file_extension": "png"}}, r"/0/huggingface/file_extension"),
        ({"huggingface": {"caption_column": "meta.caption"}}, r"/0/huggingface/caption_column: .*nested"),
        ({"max_num_samples": 5}, r"/0/max_num_samples: not read"),
        ({"dataset_type": "video"}, r"/0/dataset_type: cache build reads image datasets"),
        ({"caption_strategy": "textfile"}, r"/0/caption_strategy: "),
        ({"dataset_name": "imagefolder"}, r"/0/dataset_name: cache build reads parquet and Arrow files"),
    ],
)
def test_what_the_reader_does_not_cover_names_its_key(root, changes, message):
    entry = entry_of(**changes)
    with pytest.raises(HuggingfaceError, match=message):
        ours(root, entry)


def test_a_packaged_builder_reads_the_named_files(root, monkeypatch):
    """`dataset_name: parquet` with data_files relative to where SimpleTuner runs."""
    entry = entry_of("photos", data_files={"train": "data/photos/data/*.parquet"})
    entry["dataset_name"] = "parquet"
    theirs = simpletuners(root, entry, monkeypatch)
    source, listing = ours(root, entry)
    assert_agrees(listing, source, theirs)


def test_stamps_change_with_the_file_and_differ_by_row(root):
    entry = entry_of()
    source, before = ours(root, entry)
    assert len(set(before.stamps)) == len(before.stamps)
    first_file = sorted((root / "data" / "photos" / "data").glob("*.parquet"))[0]
    rows_in_first = sum(1 for stamp in before.stamps if stamp[0] == first_file.stat().st_size)
    hf_datasets.write_parquet(root / "data" / "photos", main_rows()[::-1])  # same files, other bytes
    _, after = ours(root, entry)
    assert all(a != b for a, b in zip(before.stamps, after.stamps))
    assert rows_in_first > 0
    # A read after the files changed under a listing reports the rows rather than reading other bytes.
    _, failed = source.read(before.keys[:3])
    assert [position for position, _ in failed] == [0, 1, 2] and "changed since it was listed" in failed[0][1]


def test_a_listing_of_many_rows_reads_no_image(tmp_path):
    """100 000 rows listed from the columns alone: the image column is never read (its bytes are not even there
    as images: one small blob each), and it takes well under seconds per 100k rows."""
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    count = 100_000
    features = hf_datasets.features(sizes=True)
    table = pa.Table.from_pydict({
        "image": [{"bytes": b"x", "path": None}] * count,
        "caption": [f"caption {row}" for row in range(count)],
        "tags": [["t"]] * count,
        "alt": [None] * count,
        "width": list(range(1, count + 1)),
        "height": [64] * count,
    }, schema=features.arrow_schema)
    (tmp_path / "big").mkdir()
    pq.write_table(table, tmp_path / "big" / "train.parquet", row_group_size=10_000)
    entry = entry_of("big", {"width_column": "width", "height_column": "height"}, dataset_name="big")
    started = time.perf_counter()
    source, listing = ours(tmp_path, entry)
    elapsed = time.perf_counter() - started
    assert len(listing.keys) == count and listing.sizes[-1] == (count, 64)
    assert listing.captions["99999.jpg"] == ("caption 99999",)
    assert elapsed < 10, elapsed
    found, failed = source.read(["5.jpg"])
    assert found == [None] and "not an image PIL opens" in failed[0][1]
