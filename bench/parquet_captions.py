"""A `metadata_backend: parquet` table's captions at every start: SimpleTuner 4.10.1's row-by-row pass
(`ParquetMetadataBackend._extract_captions_to_fast_list`, which data path D8 replaces for a covered dataset) against
the plan's column read of the same file (`lcm_plugin.cache_build.parquet.read_table`: sizes and captions), in the
same run, on a generated table (ids, captions from 997 strings with spaces to strip, sizes).

    .venv/bin/python bench/parquet_captions.py [--rows 100000,1000000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000", help="table sizes, comma-separated")
    args = parser.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lcm_plugin.cache_build.parquet import ParquetSource, read_table

    from simpletuner.helpers.data_backend.dataset_types import DatasetType
    from simpletuner.helpers.metadata.backends.parquet import ParquetMetadataBackend

    print("| rows | SimpleTuner: load + row-by-row captions | simpletuner-lcm: column read (sizes and captions) | "
          "speed-up |")
    print("| --- | --- | --- | --- |")
    for rows in map(int, args.rows.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "meta.parquet"
            pq.write_table(pa.table({"id": [f"img{i:07d}" for i in range(rows)],
                                     "caption": [f" caption {i % 997} " for i in range(rows)],
                                     "width": [512] * rows, "height": [768] * rows}), path)
            backend = object.__new__(ParquetMetadataBackend)
            backend.parquet_config = {"path": str(path), "filename_column": "id", "caption_column": "caption"}
            backend.parquet_path, backend.dataset_type = str(path), DatasetType.IMAGE
            backend.is_json_lines = backend.is_json_file = False
            backend.data_backend = SimpleNamespace(exists=lambda _: True, read=lambda name: Path(name).read_bytes())
            start = time.perf_counter()
            backend.load_parquet_database()
            theirs = backend._extract_captions_to_fast_list()
            theirs_s = time.perf_counter() - start
            source = ParquetSource(path=path, filename_column="id", caption_column="caption",
                                   fallback_caption_column=None, width_column="width", height_column="height",
                                   identifier_includes_extension=False, metadata_folder="", caption_folder="",
                                   entry="bench")
            start = time.perf_counter()
            table = read_table(source)
            ours_s = time.perf_counter() - start
            assert table.captions == theirs, "the captions differ"
            print(f"| {rows:,} | {theirs_s:.2f} s | {ours_s:.2f} s | {theirs_s / ours_s:.1f}× |")


if __name__ == "__main__":
    main()
