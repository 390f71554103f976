"""The manifest written entry by entry is the JSON document it describes, and a restart reads back exactly the
entries it asks for (names with quotes, non-ASCII letters and a newline included), never a failed image's."""

from __future__ import annotations

import json

from lcm_plugin.cache_build.fingerprint import latent_recipe
from lcm_plugin.cache_build.layout import LCM_DIR, MANIFEST, MANIFEST_VERSION, text_entry, time_ids
from lcm_plugin.cache_build.manifest import read_manifest_entries, write_manifest
from planned_folder import PRINTS, planned_folder

NAMES = ["a.png", 'say "cheese".png', "café/ü.png", "line\nbreak.png", "z.png"]


def written(tmp_path):
    dataset = planned_folder(tmp_path, dict.fromkeys(NAMES, (64, 64)),
                             {name: f"cap {number}" for number, name in enumerate(NAMES)})
    items = list(dataset.images)
    failed = {items[-1].path: "cannot decode"}
    write_manifest(dataset, items[:-1], PRINTS, failed)
    return dataset, PRINTS


def test_the_manifest_is_one_json_document_with_every_entry(tmp_path):
    dataset, prints = written(tmp_path)
    manifest = json.loads((dataset.vae_cache_dir / LCM_DIR / MANIFEST).read_text())
    assert manifest["format_version"] == MANIFEST_VERSION and manifest["dataset"] == "photos"
    assert manifest["fingerprint"] == {"vae": "v"} and manifest["settings"]["bucket"]["resolution"] == 64
    item = dataset.images[1]
    assert manifest["images"][1] == {
        "image": item.key, "key": item.cache_key, "recipe": latent_recipe("f" * 16, item.sample, item.content),
        "bucket": "1.0", "time_ids": time_ids(item.sample), "captions": [text_entry(f"cap {NAMES.index(item.key)}", "e" * 16)],
    }
    assert sorted(entry["image"] for entry in manifest["images"]) == sorted(NAMES[:-1])
    assert [(entry["image"], entry["reason"]) for entry in manifest["failed"]] == [("z.png", "cannot decode")]


def test_a_restart_reads_back_exactly_the_entries_it_asks_for(tmp_path):
    dataset, _ = written(tmp_path)
    folder = dataset.vae_cache_dir / LCM_DIR
    whole = json.loads((folder / MANIFEST).read_text())
    asked = {'say "cheese".png', "line\nbreak.png", "z.png", "not there.png"}
    head, entries = read_manifest_entries(folder, asked)
    assert head == {key: value for key, value in whole.items() if key not in ("images", "failed")}
    # z.png only failed: it has no entry of an encoded image
    assert entries == {entry["image"]: entry for entry in whole["images"] if entry["image"] in asked}
    assert set(entries) == {'say "cheese".png', "line\nbreak.png"}


def test_an_older_or_damaged_manifest_reads_as_none(tmp_path):
    dataset, _ = written(tmp_path)
    path = dataset.vae_cache_dir / LCM_DIR / MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 2}, indent=1))
    assert read_manifest_entries(path.parent, {"a.png"}) == (None, {})
    path.write_text("")
    assert read_manifest_entries(path.parent, {"a.png"}) == (None, {})
    path.unlink()
    assert read_manifest_entries(path.parent, {"a.png"}) == (None, {})
