"""`type: webshart` datasets: the reader lists, sizes, captions and reads each sample as SimpleTuner 4.10.1 (with
webshart 0.6.0) does.

Judges, built from the same multidatabackend.json entry: SimpleTuner's `WebshartBackendBuilder` (which keys reach
the backend, and where), its `WebshartDataBackend` (`list_files`: names and order; `read`: bytes), its
`WebshartMetadataBackend.compute_aspect_ratio_bucket_indices` (what it buckets, by which size) and
`PromptHandler.get_all_captions` (the captions, and the images it drops for want of one). The shards
(tests/webshart_shards.py) hold JSON and `.txt` sidecars, index captions of every shape, an EXIF-rotated JPEG, a
member that is no image, a caption reached through a top-level `.txt`, and a tar without an index.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from webshart_shards import photo, photo_shards, write_index, Shard  # noqa: E402

from packed_oracle import FILE, Geometry, listed  # noqa: E402

from lcm_plugin.cache_build.packed import SourceListing  # noqa: E402
from lcm_plugin.cache_build.webshart_source import IMAGE_EXTENSIONS, WebshartError, webshart_source  # noqa: E402

from simpletuner.helpers.data_backend.builders.webshart import WebshartBackendBuilder  # noqa: E402
from simpletuner.helpers.data_backend.config import create_backend_config  # noqa: E402
from simpletuner.helpers.metadata.backends import webshart as simpletuner_webshart  # noqa: E402
from simpletuner.helpers.prompts import PromptHandler  # noqa: E402
from simpletuner.helpers.training import image_file_extensions  # noqa: E402
from simpletuner.helpers.training.state_tracker import StateTracker  # noqa: E402

DATASET = "shards"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The generated dataset, written once; tests that change it work on a copy."""
    folder = tmp_path_factory.mktemp("webshart") / "shards"
    photo_shards(folder)
    return folder


@pytest.fixture
def root(tmp_path, shards) -> Path:
    """A run folder holding a copy of the shards at `data/`, SimpleTuner started in it."""
    shutil.copytree(shards, tmp_path / "data")
    return tmp_path


def entry_of(**changes) -> dict:
    entry = {"id": DATASET, "type": "webshart", "source": "data", "resolution": 64, "resolution_type": "pixel",
             "minimum_image_size": 0, "webshart": {"cache_dir": "cache/st"}}
    for key, value in changes.items():
        if key == "webshart":
            entry["webshart"] = entry["webshart"] | value
        elif value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    return entry


def ours(root: Path, entry: dict, **options):
    return listed(webshart_source, root, entry, **options)


class Theirs(SimpleNamespace):
    data_backend: object
    listed: list  # list_files, every extension SimpleTuner lists
    bucketed: dict  # sample -> original_size SimpleTuner's metadata backend recorded
    captions: dict  # sample -> captions, for the bucketed samples get_all_captions captions
    missing: set  # bucketed samples get_all_captions finds no caption for (the factory removes them)
    metadata_backend: object


def simpletuners(root: Path, entry: dict, monkeypatch, args_cache_dir: str | None = None) -> Theirs:
    """SimpleTuner's backends for `entry`, started in `root` as the factory starts them, and what they decide."""
    monkeypatch.chdir(root)
    monkeypatch.setattr(simpletuner_webshart, "TrainingSample", Geometry)
    monkeypatch.setattr(simpletuner_webshart.WebshartMetadataBackend, "meets_resolution_requirements",
                        lambda self, image_metadata: True)
    monkeypatch.setattr(StateTracker, "args", SimpleNamespace(output_dir=str(root / "output")))
    monkeypatch.setattr(StateTracker, "data_backends", {})
    monkeypatch.setattr(StateTracker, "all_image_files", {})
    accelerator = SimpleNamespace(is_local_main_process=False, is_main_process=True)
    args = SimpleNamespace(cache_dir=args_cache_dir)
    entry = json.loads(json.dumps(entry))
    config = create_backend_config(entry, vars(args))
    data_backend = WebshartBackendBuilder(accelerator, args).build(config)
    strategy = entry.get("caption_strategy") or "webshart"  # the factory's default for webshart entries
    StateTracker.set_data_backend_config(DATASET, {"caption_strategy": strategy})
    # FactoryRegistry: the metadata backend's folder is the block's cache_dir, else the entry's, else its default
    folder = entry.get("webshart", {}).get("cache_dir", entry.get("cache_dir", os.path.join("cache", "webshart",
                                                                                           DATASET)))
    metadata_backend = simpletuner_webshart.WebshartMetadataBackend(
        id=DATASET, instance_data_dir=folder, cache_file=os.path.join(folder, "aspect_ratio_bucket_indices"),
        metadata_file=os.path.join(folder, "aspect_ratio_bucket_metadata"), data_backend=data_backend,
        accelerator=accelerator, batch_size=1, resolution=64, resolution_type="pixel", minimum_image_size=0,
        cache_file_suffix=entry.get("cache_file_suffix", DATASET))
    metadata_backend.compute_aspect_ratio_bucket_indices(ignore_existing_cache=True)
    StateTracker.register_data_backend({"id": DATASET, "data_backend": data_backend,
                                        "metadata_backend": metadata_backend, "config": {"caption_strategy": strategy}})
    bucketed = {path: tuple(metadata_backend.image_metadata[path]["original_size"])
                for path in metadata_backend._bucketed_sample_ids()}
    texts, missing, paths = PromptHandler.get_all_captions(
        instance_data_dir=folder, use_captions=True, prepend_instance_prompt=bool(entry.get("prepend_instance_prompt")),
        data_backend=data_backend, caption_strategy=strategy, instance_prompt=entry.get("instance_prompt"),
        return_image_paths=True)
    captions: dict[str, list[str]] = {}
    for path, text in zip(paths, texts):
        captions.setdefault(path, []).append(text)
    listed = data_backend.list_files(file_extensions=image_file_extensions)[0][2]
    return Theirs(data_backend=data_backend, listed=listed, bucketed=bucketed, captions=captions, missing=set(missing),
                  metadata_backend=metadata_backend)


def images(listed: list[str]) -> list[str]:
    return [key for key in listed if os.path.splitext(key)[1].lower() in IMAGE_EXTENSIONS]


def assert_agrees(listing: SourceListing, source, theirs: Theirs) -> set[str]:
    """Our listing against SimpleTuner's decisions; returns the keys both train."""
    assert listing.keys == images(theirs.listed)
    sizes = dict(zip(listing.keys, listing.sizes))
    # Every image SimpleTuner buckets, we size alike; the images we size and it does not, it left out for want of a
    # caption, which we report too.
    assert {key: sizes[key] for key in theirs.bucketed} == theirs.bucketed
    assert {key for key, size in sizes.items() if size is not None} - theirs.bucketed.keys() <= set(
        listing.missing_captions)
    assert {key for key, size in sizes.items() if size is None} == set(listing.left_out)
    trained = {key for key in theirs.bucketed if key not in theirs.missing and theirs.captions.get(key)}
    assert {key for key, size in sizes.items() if size is not None and key not in listing.missing_captions} == trained
    assert {key: list(listing.captions[key]) for key in trained} == {key: theirs.captions[key] for key in trained}
    # The bytes of every listed image, straight from the tar, are those SimpleTuner's backend reads; webshart does not
    # load a sample larger than max_file_size at all (SimpleTuner never buckets one, so never reads one).
    found, failed = source.read(listing.keys)
    assert failed == []
    for key, data in zip(listing.keys, found):
        try:
            assert data == theirs.data_backend.read(key)
        except AttributeError:
            assert listing.left_out[key] == "larger than max_file_size"
    return trained


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"webshart": {"caption_key": "caption"}},
        {"webshart": {"caption_key": ["caption", "tags"]}},
        {"caption_strategy": "instanceprompt", "instance_prompt": "  a photo of shards "},
        {"prepend_instance_prompt": True, "instance_prompt": "sks"},
        {"webshart": {"max_file_size": 1500}},
        {"max_file_size": 100, "webshart": {"max_file_size": 1650}},  # the block's wins
        {"metadata_backend": "webshart", "caption_strategy": "webshart", "cache_file_suffix": "other"},
    ],
    ids=["index-captions", "caption-key", "caption-keys", "instanceprompt", "prepend", "max-file-size",
         "max-file-size-block-first", "explicit"],
)
def test_the_listing_is_simpletuners(root, monkeypatch, changes):
    entry = entry_of(**changes)
    theirs = simpletuners(root, entry, monkeypatch)
    source, listing = ours(root, entry)
    trained = assert_agrees(listing, source, theirs)
    assert trained  # the case trains something
    # SimpleTuner's bucket files are where the source says, under the names it gives them.
    suffix = entry.get("cache_file_suffix", DATASET)
    assert Path(theirs.metadata_backend.cache_file).resolve() == (
        source.bucket_folder / f"aspect_ratio_bucket_indices{source.bucket_infix}_{suffix}.json")
    assert (source.bucket_folder / f"aspect_ratio_bucket_metadata{source.bucket_infix}_{suffix}.json").is_file()


def test_the_hostile_parts_are_there_to_be_judged(root, monkeypatch):
    """What the shards hold, as SimpleTuner decides it (so the cases above compare something)."""
    theirs = simpletuners(root, entry_of(), monkeypatch)
    _, listing = ours(root, entry_of())
    # The EXIF-rotated JPEG is bucketed by its stored, landscape size.
    assert theirs.bucketed["webshart://0/2/002.jpg"] == (80, 48)
    # A paired .txt is webshart's sidecar, which SimpleTuner never finds: the image is bucketed, then uncaptioned.
    assert "webshart://0/3/003.jpg" in theirs.missing and "webshart://0/3/003.jpg" in listing.missing_captions
    # No caption anywhere, or blank captions: not trained; a member that is no image: never bucketed.
    assert "webshart://0/4/004.jpg" not in theirs.bucketed and "webshart://0/4/004.jpg" in listing.missing_captions
    assert not theirs.captions.get("webshart://2/3/203.jpg") and "webshart://2/3/203.jpg" in listing.missing_captions
    assert "webshart://0/5/005.png" not in theirs.bucketed and "webshart://0/5/005.png" in listing.left_out
    # sub/sky.jpg takes the top-level sky.txt; a JSON object caption is written as compact JSON.
    assert theirs.captions["webshart://0/8/sub/sky.jpg"] == ["a wide evening sky"]
    assert theirs.captions["webshart://2/2/202.jpg"] == ['{"subject":"a kettle","style":["photo","café"]}']
    keyed = simpletuners(root, entry_of(webshart={"caption_key": "caption"}), monkeypatch)
    assert keyed.captions["webshart://2/8/208.jpg"] == ["an upper-case JSON sidecar"]
    # Names sort by their bytes; an upper-case .JSON is a sidecar too (its caption, under caption_key, below).
    assert [key.rsplit("/", 1)[1] for key in theirs.listed if key.startswith("webshart://2/")][-3:] == [
        "Zebra.png", "apple.jpg", "\u00e9t\u00e9.jpg"]
    assert listing.unindexed == (str(root / "data" / "shard-003.tar"),)
    assert not any(key.startswith("webshart://3/") for key in theirs.listed)


@pytest.mark.parametrize("form", ["relative", "trailing slash", "absolute"])
def test_a_stale_metadata_cache_is_read_as_simpletuner_reads_it(root, monkeypatch, form):
    """webshart keeps the first copy of each index it loads (in a folder named after the source as written) and
    never reloads it: after SimpleTuner has run once, a changed index is not what it reads, and not what the reader
    reads either."""
    entry = entry_of(source={"relative": "data", "trailing slash": "data/", "absolute": str(root / "data")}[form])
    simpletuners(root, entry, monkeypatch)
    index = root / "data" / "shard-002.json"
    document = json.loads(index.read_text())
    for item in document["files"]:
        if item["path"] == "200.jpg":
            item["captions"] = "a caption written later"
    index.write_text(json.dumps(document))
    theirs = simpletuners(root, entry, monkeypatch)
    source, listing = ours(root, entry)
    assert_agrees(listing, source, theirs)
    assert listing.captions["webshart://2/0/200.jpg"] == ("padded caption",)
    # A fresh cache reads the index as it is now.
    fresh = entry | {"webshart": {"cache_dir": "cache/fresh"}}
    theirs = simpletuners(root, fresh, monkeypatch)
    source, listing = ours(root, fresh)
    assert_agrees(listing, source, theirs)
    assert listing.captions["webshart://2/0/200.jpg"] == ("a caption written later",)


def test_the_cache_folder_comes_from_the_runs_cache_dir_when_the_entry_names_none(root, monkeypatch):
    entry = entry_of()
    del entry["webshart"]
    theirs = simpletuners(root, entry, monkeypatch, args_cache_dir=str(root / "output" / "cache"))
    source, listing = ours(root, entry, cache_dir=str(root / "output" / "cache"))
    assert Path(theirs.data_backend.metadata_cache_dir).resolve() == source.metadata_cache.parent
    assert source.metadata_cache.is_dir()  # webshart's copies, where the source looks for them
    assert_agrees(listing, source, theirs)


def test_a_truncated_shard_is_reported_sample_by_sample(root, monkeypatch):
    entry = entry_of(caption_strategy="instanceprompt", instance_prompt="x")
    tar = root / "data" / "shard-001.tar"
    theirs = simpletuners(root, entry, monkeypatch)
    source, listing = ours(root, entry)
    with open(tar, "r+b") as file:
        file.truncate(tar.stat().st_size // 2)
    # Offsets located before the tar changed are not trusted...
    found, failed = source.read(listing.keys)
    assert {listing.keys[position] for position, _ in failed} == {
        key for key in listing.keys if key.startswith("webshart://1/")}
    assert all(why.endswith("shard-001.tar changed since it was listed") for _, why in failed)
    # ...and once listed again (the index is unchanged), the members past the cut are reported, one by one.
    assert source.listing().keys == listing.keys
    found, failed = source.read(listing.keys)
    assert failed and all("cut short" in why for _, why in failed)
    unreadable = set()
    for position, key in enumerate(listing.keys):
        try:
            expected = theirs.data_backend.read(key)
        except Exception:  # noqa: BLE001 - whatever webshart raises for a short read
            unreadable.add(key)
            continue
        assert found[position] == expected
    assert {listing.keys[position] for position, _ in failed} == unreadable
    assert all(found[position] is None for position, _ in failed)


def test_a_missing_index_leaves_its_shard_out_as_discovery_does(root, monkeypatch):
    (root / "data" / "shard-001.json").unlink()
    entry = entry_of()
    theirs = simpletuners(root, entry, monkeypatch)
    source, listing = ours(root, entry)
    assert_agrees(listing, source, theirs)
    assert "webshart://1/0/200.jpg" in listing.keys  # shard-002 is now shard number 1
    assert set(listing.unindexed) == {str(root / "data" / "shard-001.tar"), str(root / "data" / "shard-003.tar")}


def test_links_are_not_followed_as_discovery_does(root, monkeypatch):
    """webshart's discovery asks each directory entry, which does not follow links: a linked tar or folder is not a
    shard, though its index is there."""
    data, elsewhere = root / "data", root / "elsewhere"
    elsewhere.mkdir()
    (data / "shard-001.tar").rename(elsewhere / "shard-001.tar")
    (data / "shard-001.tar").symlink_to(elsewhere / "shard-001.tar")
    shutil.copy(data / "shard-002.tar", elsewhere / "shard-004.tar")
    shutil.copy(data / "shard-002.json", elsewhere / "shard-004.json")
    (data / "linked").symlink_to(elsewhere)
    entry = entry_of()
    theirs = simpletuners(root, entry, monkeypatch)
    source, listing = ours(root, entry)
    assert_agrees(listing, source, theirs)
    assert not any(key.startswith("webshart://2/") for key in listing.keys)  # shards 000 and 002 only


def test_no_index_at_all_stops_both(root, monkeypatch):
    for index in (root / "data").glob("*.json"):
        index.unlink()
    with pytest.raises(Exception):  # noqa: B017 - webshart's own "no shards" error
        simpletuners(root, entry_of(), monkeypatch)
    with pytest.raises(WebshartError, match=r"no \.tar shard with a webshart index"):
        ours(root, entry_of())


def test_an_index_webshart_refuses_is_refused_by_name(root, monkeypatch):
    index = root / "data" / "shard-002.json"
    document = json.loads(index.read_text())
    document["files"][0]["width"] = 64.0
    index.write_text(json.dumps(document))
    with pytest.raises(Exception):  # noqa: B017 - webshart's JSON parsing error
        simpletuners(root, entry_of(), monkeypatch)
    with pytest.raises(WebshartError, match=r"shard-002\.json: '200\.jpg': width is a positive integer"):
        ours(root, entry_of())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"source": "someone/dataset"}, r"/0/source: .* is not a folder .*Hugging Face"),
        ({"source": "https://example.com/shards"}, r"/0/source: cache build reads local folders"),
        ({"source": None, "webshart": {"source": "hf://datasets/x/y"}}, r"/0/webshart/source: cache build reads local"),
        ({"metadata": "someone/indexes"}, r"/0/metadata: cache build reads local indexes"),
        ({"filter_func": {"path_include": ["1"]}}, r"/0/filter_func: not read by cache build"),
        ({"max_num_samples": 5}, r"/0/max_num_samples: not read by cache build"),
        ({"webshart": {"optimize_captions": True}}, r"/0/webshart/optimize_captions: not read by cache build"),
        ({"webshart_optimise_captions": True}, r"/0/webshart_optimise_captions: not read by cache build"),
        ({"caption_key": "caption"}, r"/0/caption_key: SimpleTuner reads the caption key from webshart\.caption_key"),
        ({"webshart": {"caption_key": "width"}}, r"/0/webshart/caption_key: 'width' is an index field"),
        ({"webshart": {"caption_key": []}}, r"/0/webshart/caption_key: a non-empty string"),
        ({"caption_strategy": "textfile"}, r"/0/caption_strategy: .*webshart or instanceprompt"),
        ({"metadata_backend": "discovery"}, r"/0/metadata_backend: a webshart dataset's metadata_backend"),
        ({"dataset_type": "video"}, r"/0/dataset_type: cache build reads image datasets"),
        ({"caption_strategy": "instanceprompt"}, r"/0/instance_prompt: caption_strategy instanceprompt needs"),
        ({"webshart": {"max_file_size": -1}}, r"/0/webshart/max_file_size: a number of bytes"),
    ],
)
def test_what_the_reader_does_not_cover_names_its_key(root, changes, message):
    with pytest.raises(WebshartError, match=f"^{FILE}: " + message):
        ours(root, entry_of(**changes))


def test_a_separate_local_index_folder_is_read(tmp_path, monkeypatch):
    """`metadata`: the indexes in a folder of their own, named by the shard's path below the source."""
    data, indexes = tmp_path / "data", tmp_path / "indexes"
    for number in range(2):
        shard = Shard(f"part/{number}", {f"{number}{k}.jpg": photo((64, 48 + 8 * k), k) for k in range(3)},
                      {f"{number}{k}.jpg": {"captions": f"caption {number}{k}"} for k in range(3)})
        index = write_index(shard, data)
        (indexes / "part").mkdir(parents=True, exist_ok=True)
        index.rename(indexes / "part" / index.name)
    entry = entry_of(metadata="indexes")
    theirs = simpletuners(tmp_path, entry, monkeypatch)
    source, listing = ours(tmp_path, entry)
    assert len(assert_agrees(listing, source, theirs)) == 6


def test_stamps_change_with_the_tar_and_differ_by_member(root):
    source, listing = ours(root, entry_of())
    assert len(set(listing.stamps)) == len(listing.stamps)
    assert all(length == len(data) for (length, *_), data in zip(listing.stamps, source.read(listing.keys)[0]))
    again = source.listing()
    assert again.stamps == listing.stamps
    tar = root / "data" / "shard-001.tar"
    later = time.time() + 5
    os.utime(tar, (later, later))
    changed = source.listing()
    moved = [key for key, before, after in zip(listing.keys, listing.stamps, changed.stamps) if before != after]
    assert moved and all(key.startswith("webshart://1/") for key in moved)
    assert len(moved) == sum(key.startswith("webshart://1/") for key in listing.keys)
