"""D7's listing (the scan's inventory in LocalDataBackend.list_files' shape) against SimpleTuner 4.10.1's own
`LocalDataBackend.list_files` on the same hostile folder: hidden and skipped folders, links to folders (twice to
one folder, and a loop), a broken link, a folder named like an image, upper-case, video, audio and unread
extensions, spaces and non-ASCII names, and the folder named as given (relative, trailing slash, `..`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from lcm_plugin.cache_build.plan import IMAGE_EXTENSIONS
from lcm_plugin.cache import scan_inventory
from lcm_plugin.trainer_cache import listed_as, simpletuner_listing

FILES = (
    "a.png", "B.PNG", "c.JpEg", "sub/d.webp", "sub/inner/e.jpg", "café ü/f g.png", ".hidden/h.png",
    ".Trashes/i.png", ".ipynb_checkpoints/j.png", "sub/.zfs/k.png", "dir.png/l.png",
    "clip.mp4", "sub/sound.WAV", "scan.tiff", "notes.txt", "noext", "m.gif",
)


@pytest.fixture(scope="module")
def simpletuner():
    from simpletuner.helpers.data_backend.local import LocalDataBackend
    from simpletuner.helpers.training import image_file_extensions

    return LocalDataBackend(accelerator=None, id="listing"), image_file_extensions


def hostile_folder(root: Path) -> Path:
    data = root / "data"
    for name in FILES:
        path = data / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in IMAGE_EXTENSIONS or path.suffix.lower() == ".tiff":
            Image.new("RGB", (8, 6), (200, 30, 90)).save(path)
        else:
            path.write_bytes(b"not an image")
    (data / "link").symlink_to(data / "sub")  # a second name for sub: the first one visited is listed
    (data / "sub" / "loop").symlink_to(data)  # back to the top
    (data / "dead.png").symlink_to(data / "nowhere.png")
    return data


def listed(listing: list[tuple]) -> dict[str, list[str]]:
    """root -> sorted files (SimpleTuner's order is the folder's, which the answer need not repeat)."""
    assert all(middle == [] for _, middle, _ in listing)
    merged: dict[str, list[str]] = {}
    for root, _, files in listing:
        merged.setdefault(root, []).extend(files)
    return {root: sorted(files) for root, files in merged.items()}


def ours(data: Path, instance_data_dir: str, extensions) -> list[tuple]:
    inventory = scan_inventory(data, list(IMAGE_EXTENSIONS), None, None,
                               other_extensions=sorted(listed_as(extensions) - set(IMAGE_EXTENSIONS)))
    return simpletuner_listing(inventory, instance_data_dir)


@pytest.mark.parametrize("form", ["absolute", "trailing slash", "relative", "dot-dot"])
def test_the_listing_is_simpletuners(tmp_path, monkeypatch, simpletuner, form):
    backend, extensions = simpletuner
    data = hostile_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    given = {"absolute": str(data), "trailing slash": f"{data}/", "relative": "data",
             "dot-dot": os.path.join("data", "sub", "..")}[form]
    theirs = listed(backend.list_files(file_extensions=extensions, instance_data_dir=given))
    assert listed(ours(data, given, extensions)) == theirs
    # The hostile parts were there to be judged: SimpleTuner lists the hidden folder, the folder named like an image,
    # video, audio and TIFF files and the broken link, and skips its own list of folders and the loop.
    files = {os.path.relpath(file, data) for group in theirs.values() for file in group}
    assert {".hidden/h.png", "dir.png/l.png", "clip.mp4", "scan.tiff", "dead.png"} <= files
    names = [os.path.basename(file) for file in files]
    assert not {"i.png", "j.png", "k.png", "notes.txt", "noext"} & set(names)
    # sub and link are one folder, listed once (under the name visited first); the loop adds nothing.
    assert sorted(name for name in names if name in ("sound.WAV", "e.jpg", "d.webp")) == ["d.webp", "e.jpg",
                                                                                           "sound.WAV"]


def test_a_listing_asked_for_other_extensions_is_not_the_scans(simpletuner, tmp_path):
    """A different extension list (e.g. the VAE cache's ["pt"]) is SimpleTuner's to answer."""
    from lcm_plugin import trainer_cache

    backend, extensions = simpletuner
    data = hostile_folder(tmp_path)
    inventory = scan_inventory(data, list(IMAGE_EXTENSIONS), None, None)
    trainer_cache.reset()
    try:
        trainer_cache.coverage().datasets["listing"] = trainer_cache.DatasetCache(
            "listing", reader=None, served={}, listed=(str(data), listed_as(extensions), inventory))
        assert trainer_cache.take_listing("listing", str(data), ["pt"]) is None
        assert trainer_cache.take_listing("listing", str(data / "sub"), extensions) is None
        assert trainer_cache.take_listing("other", str(data), extensions) is None
        assert trainer_cache.take_listing("listing", str(data), extensions) is not None
        assert trainer_cache.take_listing("listing", str(data), extensions) is None  # once
    finally:
        trainer_cache.reset()
