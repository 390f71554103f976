"""SimpleTuner's bucket files are where its metadata backend looks for them: `<name>_<suffix>.json`, the suffix the
entry's `cache_file_suffix`, the dataset's id when the key is absent, none when it is null; in the folder, or for an
S3 dataset under its key prefix in the bucket. Judge: SimpleTuner's own `DiscoveryMetadataBackend.__init__`, given
what its factory passes it (`FactoryRegistry`: `cache_file=os.path.join(root, "aspect_ratio_bucket_indices")`,
`cache_file_suffix=backend.get("cache_file_suffix", id)`, root the entry's instance_data_dir or aws_data_prefix)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_cache_build_plan import TEXT, write_config

from lcm_plugin.cache_build.plan import datasets_of, read_run
from lcm_plugin.cache_build.simpletuner_format import bucket_files, bucket_keys

ABSENT = object()


def simpletuners_names(entry: dict, root: str) -> tuple[str, str]:
    from simpletuner.helpers.metadata.backends.discovery import DiscoveryMetadataBackend

    backend = DiscoveryMetadataBackend(
        id=entry["id"], instance_data_dir=root, data_backend=SimpleNamespace(id=entry["id"], exists=lambda _: False),
        accelerator=None, batch_size=1, resolution=64, resolution_type="pixel",
        cache_file=os.path.join(root, "aspect_ratio_bucket_indices"),
        metadata_file=os.path.join(root, "aspect_ratio_bucket_metadata"),
        cache_file_suffix=entry.get("cache_file_suffix", entry["id"]),
    )
    return str(backend.cache_file), str(backend.metadata_file)


@pytest.mark.parametrize("suffix", [ABSENT, None, "custom"], ids=["absent", "null", "custom"])
@pytest.mark.parametrize("kind", ["local", "aws"])
def test_our_bucket_files_are_named_as_simpletuner_looks_for_them(tmp_path, monkeypatch, suffix, kind):
    entry = {"id": "photos", "caption_strategy": "filename", "resolution": 64, "resolution_type": "pixel"}
    if kind == "local":
        entry |= {"type": "local", "instance_data_dir": str(tmp_path / "data")}
    else:
        entry |= {"type": "aws", "aws_bucket_name": "b", "aws_data_prefix": "photos/", "aws_region_name": None,
                  "aws_endpoint_url": "http://127.0.0.1:9", "aws_access_key_id": "k", "aws_secret_access_key": "s"}
    if suffix is not ABSENT:
        entry["cache_file_suffix"] = suffix
    write_config(tmp_path, [entry, TEXT])
    monkeypatch.chdir(tmp_path)
    (dataset,) = datasets_of(*read_run(tmp_path))
    if kind == "local":
        ours = tuple(str(path) for path in bucket_files(dataset))
        assert ours == simpletuners_names(entry, entry["instance_data_dir"])
    else:
        ours = bucket_keys(dataset)
        assert ours == simpletuners_names(entry, entry["aws_data_prefix"])
    assert ours[0].endswith({ABSENT: "_photos.json", None: "indices.json", "custom": "_custom.json"}[suffix])
