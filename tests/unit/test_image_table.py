"""The plan's columns (Rust `ImageTable`): store keys are the recipe digests Python's fingerprint functions give,
the plan digest moves with every input of a latent or caption, the served-images mapping finds images by path
in the scan's component order (names that sort differently bytewise included), and rows come back only where
asked."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lcm_plugin.cache import LatentCacheReader, LatentCacheWriter
from lcm_plugin.cache_build.fingerprint import digest, latent_recipe
from lcm_plugin.cache_build.layout import TIME_IDS
from lcm_plugin.cache_build.plan import scan_dataset
from lcm_plugin.cache_build.ranks import plan_summary
from planned_folder import PRINTS, planned_folder

# "a.b/..." sorts before "a/..." bytewise ('.' < '/'), after it component by component: a binary search in the
# wrong order misses one of them.
NAMES = {"a.b/1.png": (64, 64), "a/2.png": (96, 64), "a-c.png": (64, 96), "a/b/3.png": (64, 64),
         "ü/ñ 4.png": (64, 64), 'q"uote.png': (96, 64), "z.png": (64, 64)}


def test_store_keys_are_the_digest_of_pythons_latent_recipe(tmp_path):
    dataset = planned_folder(tmp_path, NAMES)
    items = list(dataset.images)
    assert sorted(item.key for item in items) == sorted(NAMES)
    for item in items:
        recipe = latent_recipe(PRINTS.latent_digest, item.sample, item.content)
        assert item.cache_key == f"{item.key}@{digest(recipe)}"
        assert item.path == os.path.join(str(dataset.data_dir), item.key)
        assert tuple(item.sample["original_size"]) == NAMES[item.key]
        assert item.captions == (os.path.splitext(os.path.basename(item.key))[0].replace("_", " ").strip(),)


def test_store_keys_of_random_sizes_and_random_crops_are_pythons_digests(tmp_path):
    import random

    rng = random.Random(0)
    sizes = {f"{n}.png": (rng.randint(16, 400), rng.randint(16, 400)) for n in range(60)}
    dataset = planned_folder(tmp_path, sizes, crop=True, crop_style="random", crop_aspect="random",
                             crop_aspect_buckets=[0.5, 1.0, 1.5])
    items = list(dataset.images)
    assert len(items) == len(sizes) and len({tuple(item.sample["crop_coordinates"]) for item in items}) > 10
    for item in items:
        assert item.cache_key == f"{item.key}@{digest(latent_recipe(PRINTS.latent_digest, item.sample, item.content))}"


def test_the_served_mapping_finds_every_image_by_path_in_component_order(tmp_path):
    dataset = planned_folder(tmp_path, NAMES)
    items = list(dataset.images)
    writer = LatentCacheWriter(tmp_path / "store")
    for item in items[1:]:
        writer.put(item.cache_key, np.zeros((4, 8, 8), np.float32))
    writer.close()
    failed = dataset.images.positions_of([items[-1].path, str(tmp_path / "not planned.png")])
    served = dataset.images.table.serve(LatentCacheReader(tmp_path / "store").native, failed)
    expected = {item.path: item.cache_key for item in items[1:-1]}
    assert len(served) == len(expected) and sorted(served) == sorted(expected)
    for item in items:
        assert (item.path in served) == (item.path in expected)
        assert served.get(item.path) == expected.get(item.path)
    held = dataset.images.table.held(LatentCacheReader(tmp_path / "store").native, "")
    assert held.tolist() == [item.cache_key in {i.cache_key for i in items[1:]} for item in items]
    assert not dataset.images.table.held(LatentCacheReader(tmp_path / "store").native, TIME_IDS).any()
    strangers = [str(tmp_path / "data" / "a"), str(tmp_path / "data"), "relative/a/2.png", 7, None,
                 str(tmp_path / "data" / "a/2.png") + "x"]
    for stranger in strangers:
        assert stranger not in served and served.get(stranger) is None
    # the bulk form of `in`, over any iterable, keeps the order and the objects given
    asked = [item.path for item in reversed(items)] + strangers + [items[1].path]
    assert served.missing_from(iter(asked)) == [path for path in asked if path not in expected]


def test_rows_come_back_only_where_asked_and_positions_are_checked(tmp_path):
    dataset = planned_folder(tmp_path, NAMES)
    table = dataset.images.table
    assert len(dataset.images.at([2, 0])) == 2 and dataset.images[-1].key == "ü/ñ 4.png"  # scan order: by component, bytewise
    assert [item.key for item in dataset.images[1:3]] == [item.key for item in list(dataset.images)[1:3]]
    with pytest.raises(ValueError, match="not planned"):
        table.rows([len(NAMES)])
    with pytest.raises(ValueError, match="named already"):
        table.name("0" * 16)


def test_the_plan_digest_moves_with_an_image_a_caption_and_the_caption_rule(tmp_path):
    captions = {name: f"caption of {name}" for name in NAMES}
    dataset = planned_folder(tmp_path, NAMES, captions)
    before = plan_summary([dataset], PRINTS)
    assert before == plan_summary([dataset], PRINTS)

    def replanned(**change):
        scan_dataset(dataset, 0)  # the run's seed; the memo is not written: every file is read again
        for name, value in change.items():
            setattr(dataset, name, value)
        from lcm_plugin.cache_build.fingerprint import name_entries

        name_entries([dataset], PRINTS)
        return plan_summary([dataset], PRINTS)

    dataset.images = None
    assert replanned()[0] == before[0]
    (tmp_path / "data" / "z.txt").write_text("another caption")
    assert replanned()[0] != before[0]
    (tmp_path / "data" / "z.txt").write_text(captions["z.png"])
    assert replanned()[0] == before[0]
    assert replanned(prepend_instance_prompt=True, instance_prompt="sks")[0] != before[0]
