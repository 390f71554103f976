"""A restart costs what changed: the scan memo re-reads only files whose stamps changed, a file copied or touched
without new bytes keeps its latent (its key carries the content hash), and what changed is encoded exactly once.
Whatever the memo says, the stores end equal to a fresh build of the same files.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cache_snapshot
from cache_snapshot import assert_checks_pass, snapshot
from lcm_plugin.cache_build import BuildOptions, build
from lcm_plugin.cache_build.build import plan_run
from lcm_plugin.cache_build.plan import memo_path

WORDS = ("red", "blue", "circle", "square", "photo", "green", "dog", "cat")
SIZES = ((96, 64), (64, 80), (64, 64))
RACY_WINDOW_S = 2.0  # inventory.rs: RACY_WINDOW_NS; a file changed this close to the memo's writing is read again


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from lcm_plugin.tiny_sdxl import save_tiny_sdxl

    torch.set_num_threads(1)
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"), seed=0, vocabulary=WORDS)


def settle() -> None:
    """Lets the files just written age past the memo's racy window, as files written before an earlier start have
    (their ctime, which the stamp holds, cannot be dated back)."""
    time.sleep(RACY_WINDOW_S + 0.2)


def write_run(root: Path, model_dir: Path) -> Path:
    images = [(f"img{i}", SIZES[i % 3], f"{WORDS[i % 8]} {WORDS[(i + 3) % 8]}") for i in range(8)]
    run = cache_snapshot.write_run(root, model_dir, images, resolution=64, seed=5)
    settle()
    return run


def scanned(run: Path):
    """The run's dataset as the next start plans it (the memo untouched)."""
    _, (dataset,), _ = plan_run(run, None)
    return dataset.inventory


def test_a_restart_reads_and_encodes_only_what_changed(tmp_path, model_dir):
    run = write_run(tmp_path / "run", model_dir)
    options = BuildOptions(run, shard_bytes=4096)
    assert build(options, log=print).encoded == 8
    assert scanned(run).read == 0, "a restart with nothing changed read files again"
    assert build(options, log=print).encoded == 0

    data = run / "data"
    rng = np.random.default_rng(9)
    cache_snapshot.photo(*SIZES[1], rng).save(data / "img1.jpg", quality=90)  # new pixels
    cache_snapshot.photo(*SIZES[0], rng).save(data / "new.jpg", quality=90)  # added
    (data / "new.txt").write_text("green dog")
    (data / "img2.jpg").unlink()  # removed
    (data / "img2.txt").unlink()
    (data / "img3.jpg").rename(data / "img3b.jpg")  # renamed: its key is its path
    (data / "img3.txt").rename(data / "img3b.txt")
    (data / "img4.txt").write_text("cat photo")  # caption edited
    copy = data / "img5.copy"  # copied over itself: new inode and mtime, same bytes
    shutil.copy(data / "img5.jpg", copy)
    os.replace(copy, data / "img5.jpg")
    os.utime(data / "img6.jpg")  # touched
    settle()

    inventory = scanned(run)
    # Read again: img1, new, img3b (new name), img4 (its caption), img5 and img6 (stamps moved); nothing else.
    assert inventory.read == 6 and inventory.removed == 2 and inventory.touched == 2
    lines: list[str] = []
    rebuilt = build(options, log=lines.append)
    assert rebuilt.encoded == 3, lines  # img1, new, img3b
    assert rebuilt.captions == 2, lines  # "green dog", "cat photo"
    assert scanned(run).read == 0

    fresh = tmp_path / "fresh"
    shutil.copytree(run, fresh, ignore=shutil.ignore_patterns("cache", "output", "aspect_ratio_bucket_*.json"))
    assert build(BuildOptions(fresh, shard_bytes=4096), log=print).encoded == 8
    assert_checks_pass(run)
    ours, theirs = snapshot(run), snapshot(fresh)
    assert ours["manifest"] == theirs["manifest"]  # the same keys: no entry from before the change is served
    for part in ("latents", "text"):
        assert set(theirs[part]) <= set(ours[part]), part
        for key, (dtype, shape, data) in theirs[part].items():
            # The VAE's bits depend on the batch an image ran in, and the changes regrouped the batches.
            assert ours[part][key][:2] == (dtype, shape), key
            np.testing.assert_allclose(np.frombuffer(ours[part][key][2], dtype), np.frombuffer(data, dtype),
                                       rtol=1e-4, atol=1e-5, err_msg=key)


def test_a_memo_that_cannot_be_trusted_is_not_used(tmp_path, model_dir):
    run = write_run(tmp_path / "run", model_dir)
    options = BuildOptions(run, shard_bytes=4096)
    assert build(options, log=print).encoded == 8
    _, (dataset,), _ = plan_run(run, None)
    memo = memo_path(dataset)

    # A memo that lies about a file (bytes flipped inside a row) is refused whole: every file is read again.
    damaged = bytearray(memo.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    memo.write_bytes(bytes(damaged))
    inventory = scanned(run)
    assert not inventory.had_memo and inventory.read == 8

    # A same-size rewrite with its mtime put back (an editor or sync tool that keeps times): the ctime tells.
    build(options, log=print)
    assert scanned(run).read == 0
    caption = run / "data" / "img0.txt"
    before = caption.stat()
    assert caption.read_text() == "red square"
    caption.write_text("red circle")
    os.utime(caption, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (caption.stat().st_size, caption.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert scanned(run).read == 1
    assert build(options, log=print).captions == 1
