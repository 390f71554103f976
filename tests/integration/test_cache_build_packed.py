"""`simpletuner-lcm cache build` on datasets whose images lie inside other files: a local Hugging Face dataset
(parquet files of the `datasets` Image feature). The sizes, names and captions come from the source's reader (judged
by SimpleTuner's own classes in tests/unit/test_hf_oracle.py); here the build is judged by a local folder of the same
image files: its store holds the same latents, bit for bit, under SimpleTuner's names of the rows. A rerun reads no
row; a table file rewritten with one image changed re-encodes that image alone."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_datasets  # noqa: E402

from lcm_plugin.cache import LatentCacheReader  # noqa: E402
from lcm_plugin.cache_build import BuildOptions, build  # noqa: E402
from lcm_plugin.cache_build.layout import LCM_DIR  # noqa: E402
from lcm_plugin.cache_build.plan import BuildError  # noqa: E402

# Ten rows of the generator's kinds: JPEG and PNG, several aspect ratios, an EXIF-rotated JPEG (row 4).
ROWS = hf_datasets.rows()[:10]


def write_run(root: Path, model_dir: Path, entry: dict) -> Path:
    (root / "config").mkdir(parents=True)
    backends = [
        # Centre crops: a random crop's draws follow the images' order, which a skipped row changes.
        {"id": "toy", "crop": True, "crop_style": "center", "crop_aspect": "preserve", "resolution": 64, "resolution_type": "pixel", "minimum_image_size": 0,
         "cache_dir_vae": "cache/vae/toy"} | entry,
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    (root / "config" / "multidatabackend.json").write_text(json.dumps(backends))
    config = {"model_type": "lora", "model_family": "sdxl", "output_dir": "output",
              "pretrained_model_name_or_path": str(model_dir), "pretrained_vae_model_name_or_path": str(model_dir / "vae"),
              "data_backend_config": "config/multidatabackend.json", "resolution": 64, "resolution_type": "pixel",
              "optimizer": "torch-adamw", "mixed_precision": "no", "vae_batch_size": 2, "max_train_steps": 1,
              "num_train_epochs": 0, "seed": 3}
    (root / "config" / "config.json").write_text(json.dumps(config))
    return root


def hf_entry(**changes) -> dict:
    return {"type": "huggingface", "dataset_name": "hf", "caption_strategy": "huggingface",
            "metadata_backend": "huggingface"} | changes


def stores(run: Path) -> dict[str, np.ndarray]:
    reader = LatentCacheReader(run / "cache" / "vae" / "toy" / LCM_DIR)
    return {key: np.array(reader.get(key)) for key in reader.keys()}


@pytest.fixture
def runs(tmp_path, tiny_sdxl_dir):
    """(the Hugging Face dataset's run, a local folder's run of the same files and captions). Each file is named as
    SimpleTuner names its row (`<row>.jpg`, PNG bytes included): a latent's posterior noise is seeded by its name."""
    table = write_run(tmp_path / "hf-run", tiny_sdxl_dir, hf_entry())
    hf_datasets.write_parquet(table / "hf", ROWS, files=2, row_group_size=3)
    folder = write_run(tmp_path / "folder-run", tiny_sdxl_dir,
                       {"type": "local", "instance_data_dir": "data", "caption_strategy": "textfile"})
    (folder / "data").mkdir()
    for number, row in enumerate(ROWS):
        if row.caption and row.caption.strip():  # a row without a caption is not trained (nor its file)
            (folder / "data" / f"{number}.jpg").write_bytes(hf_datasets.encode(row, number))
            (folder / "data" / f"{number}.txt").write_text(row.caption.strip())
    return table, folder


def test_a_tables_rows_build_the_store_a_folder_of_the_same_files_builds(runs, capsys):
    table, folder = runs
    # Row 7 has a blank caption: SimpleTuner trains no caption for it, and neither run holds it.
    report = build(BuildOptions(table), log=print)
    build(BuildOptions(folder), log=print)
    assert report.encoded == len(ROWS) - 1, capsys.readouterr().out
    ours, theirs = stores(table), stores(folder)
    assert set(ours) == set(theirs) and len(ours) == 2 * (len(ROWS) - 1)  # a latent and time_ids per image
    for key, value in ours.items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)

    rerun = build(BuildOptions(table), log=print)
    assert (rerun.encoded, rerun.reused) == (0, len(ROWS) - 1)


def test_a_rerun_reads_no_row_and_a_rewritten_table_re_encodes_only_its_changed_image(runs, monkeypatch):
    from lcm_plugin.cache_build.hf_source import HuggingfaceSource

    table, _ = runs
    time.sleep(2.1)  # a memo never trusts a file changed within 2 s of it (git's "racily clean" rule)
    build(BuildOptions(table), log=print)
    asked: list[list[str]] = []
    original = HuggingfaceSource.read
    monkeypatch.setattr(HuggingfaceSource, "read", lambda self, keys: asked.append(list(keys)) or original(self, keys))
    assert build(BuildOptions(table), log=print).encoded == 0
    assert asked == []  # the scan memo held every row's stamp, the store every latent

    changed = list(ROWS)
    changed[2] = replace(changed[2], size=(changed[2].size[0] + 16, changed[2].size[1]))
    for path in (table / "hf" / "data").glob("*.parquet"):
        path.unlink()
    hf_datasets.write_parquet(table / "hf", changed, files=2, row_group_size=3)
    report = build(BuildOptions(table), log=print)
    assert (report.encoded, report.reused) == (1, len(ROWS) - 2)
    # The scan read every row again (the files' stamps changed) to find the one whose bytes did, in one chunk; the
    # encode read the VAE batch (vae_batch_size 2) that holds it.
    scanned, *encoded = asked
    assert sorted(scanned) == sorted(f"{row}.jpg" for row in range(len(ROWS)))
    assert len(encoded) == 1 and len(encoded[0]) == 2 and "2.jpg" in encoded[0], encoded


@pytest.mark.parametrize(("change", "expected"), [
    ({"dataset_name": "missing"}, r"/0/dataset_name"),
    ({"caption_strategy": "textfile"}, r"/0/caption_strategy: .*'huggingface' or 'instanceprompt'"),
    ({"metadata_backend": "discovery"}, r"/0/metadata_backend: .*'huggingface'"),
    ({"image_column": "photo"}, r"/0/image_column"),
])
def test_what_a_huggingface_entry_cannot_be_is_named_by_its_key(runs, change, expected):
    table, _ = runs
    backends_file = table / "config" / "multidatabackend.json"
    backends = json.loads(backends_file.read_text())
    backends[0] |= change
    backends_file.write_text(json.dumps(backends))
    with pytest.raises(BuildError, match=expected):
        build(BuildOptions(table), log=print)


def test_the_simpletuner_format_is_refused_for_a_table(runs):
    table, _ = runs
    with pytest.raises(BuildError, match="is in huggingface files: --format simpletuner"):
        build(BuildOptions(table, simpletuner_format=True), log=print)
