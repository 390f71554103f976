"""Images/s of read + decode from webshart shards and a Hugging Face dataset on local disk: our path against
SimpleTuner 4.10.1's own backend classes on the same files (not a test; issue 19, item 6, the shard and parquet kinds).
`bench/sources.py --kinds webshart,huggingface` runs it (and `--kinds s3` the S3 rows).

Data: the S3 bench's photo-like JPEGs (`sources.generate`: six sizes from 320x512 to 512x384, quality 90), written
- as webshart shards: tar files of 1,000 images each with their webshart index (offset, length, stored size, caption),
  as `tests/webshart_shards.write_index` writes them;
- as a Hugging Face dataset: parquet files of 1,000 rows each (the `datasets` Image feature and a `caption` column),
  written by `datasets.Dataset.to_parquet`.

Paths, each over every image, grouped by bucket (target size) as both caches do, the same names in the same order:
- SimpleTuner: its backend as its builder makes it for the entry (`WebshartBackendBuilder`,
  `HuggingfaceBackendBuilder`), `read_image_batch` on chunks of its `read_batch_size` (25) names, as its VAECache
  reads them: one sample at a time (webshart's `load_sample`; `datasets` row access, its decode, a PNG re-encode for
  SimpleTuner's `load_image`). No resize or crop: less work than its cache does, so the ratio is conservative.
- ours: per VAE batch of `--vae-batch` images, the source's `read` (bytes at the index's offsets in the tar; the
  image column of the row groups, by pyarrow), then `decode_batch_bytes` (decode, resize and crop to the bucket,
  rayon), one batch after the other, as `cache build` reads them.
Listing (the index, the table's columns) is timed apart, for both.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sources import SIMPLETUNER_READ_BATCH, Dataset, Outcome, batches, decode, simpletuner_path  # noqa: E402

KINDS = ("webshart", "huggingface")
PER_FILE = 1000  # images per tar shard / parquet file
TARGET_RATIO = 3.0  # ours / SimpleTuner, from the issue


def rekeyed(dataset: Dataset, names: list[str]) -> Dataset:
    """`dataset` with its images named `names` (in its keys' order)."""
    old = sorted(dataset.objects)
    return Dataset({new: dataset.objects[key] for new, key in zip(names, old)},
                   {new: dataset.sizes[key] for new, key in zip(names, old)},
                   {new: dataset.geometry[key] for new, key in zip(names, old)})


def write_shards(dataset: Dataset, folder: Path) -> tuple[dict, Dataset]:
    """Tar shards with their webshart indexes; (the multidatabackend.json entry, the dataset named by sample id)."""
    from webshart_shards import Shard, write_index

    keys = sorted(dataset.objects)
    names = []
    for number, start in enumerate(range(0, len(keys), PER_FILE)):
        part = keys[start:start + PER_FILE]
        members = {f"{Path(key).stem}.jpg": dataset.objects[key] for key in part}
        captions = {name: {"captions": f"a photo, number {name[:-4]}"} for name in members}
        write_index(Shard(f"shard-{number:05d}", members, captions), folder)
        # webshart://<shard>/<sample>/<member>: samples numbered in name order within their shard
        names += [f"webshart://{number}/{sample}/{name}" for sample, name in enumerate(sorted(members))]
    entry = {"id": "bench", "type": "webshart", "source": str(folder), "caption_strategy": "webshart",
             "metadata_backend": "webshart"}
    return entry, rekeyed(dataset, names)


def write_table(dataset: Dataset, folder: Path) -> tuple[dict, Dataset]:
    """Parquet files of a local Hugging Face dataset; (the entry, the dataset named by row)."""
    import datasets

    keys = sorted(dataset.objects)
    (folder / "data").mkdir(parents=True)
    files = (len(keys) + PER_FILE - 1) // PER_FILE
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    for number, start in enumerate(range(0, len(keys), PER_FILE)):
        part = keys[start:start + PER_FILE]
        table = datasets.Dataset.from_dict({"image": [{"bytes": dataset.objects[key], "path": None} for key in part],
                                            "caption": [f"a photo, number {start + i}" for i in range(len(part))]},
                                           features=features)
        table.to_parquet(str(folder / "data" / f"train-{number:05d}-of-{files:05d}.parquet"))
    entry = {"id": "bench", "type": "huggingface", "dataset_name": str(folder), "caption_strategy": "huggingface",
             "metadata_backend": "huggingface"}
    return entry, rekeyed(dataset, [f"{row}.jpg" for row in range(len(keys))])


def simpletuners_backend(kind: str, entry: dict, root: Path):
    """SimpleTuner's data backend for `entry`, made by its own builder as its factory makes it (started in `root`)."""
    from simpletuner.helpers.data_backend.config import create_backend_config
    from simpletuner.helpers.training.state_tracker import StateTracker

    os.chdir(root)
    args = SimpleNamespace(cache_dir=str(root / "cache"), output_dir=str(root / "output"))
    StateTracker.set_args(args)
    accelerator = SimpleNamespace(is_local_main_process=True, is_main_process=True, wait_for_everyone=lambda: None)
    config = create_backend_config(json.loads(json.dumps(entry)), vars(args))
    if kind == "webshart":
        from simpletuner.helpers.data_backend.builders.webshart import WebshartBackendBuilder

        return WebshartBackendBuilder(accelerator, args).build(config)
    from simpletuner.helpers.data_backend.builders.huggingface import HuggingfaceBackendBuilder

    return HuggingfaceBackendBuilder(accelerator, args).build(config)


def our_source(kind: str, entry: dict, root: Path):
    if kind == "webshart":
        from lcm_plugin.cache_build.webshart_source import webshart_source

        return webshart_source(entry, 0, "multidatabackend.json", root, cache_dir=str(root / "cache"))
    from lcm_plugin.cache_build.hf_source import hf_source

    return hf_source(entry, 0, "multidatabackend.json", root, cache_dir=str(root / "cache"))


def our_path(source, dataset: Dataset, args, oriented: bool) -> Outcome:
    outcome = Outcome()
    for chunk in batches(dataset, args.vae_batch):
        blobs, _failures = source.read(chunk)
        decode(dataset, chunk, blobs, args.threads, outcome, oriented=oriented)
    return outcome


def timed(what: str, run):
    start, cpu = time.perf_counter(), time.process_time()
    result = run()
    seconds = time.perf_counter() - start
    print(f"  {what:<44} {seconds:8.2f} s   CPU {(time.process_time() - cpu) / seconds:4.2f} cores", flush=True)
    return result, seconds


def run_kind(kind: str, dataset: Dataset, args) -> dict:
    """One kind's rows: listing and read + decode, SimpleTuner's and ours, on the same files."""
    from sources import check_same_images

    root = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-"))
    os.environ["HF_DATASETS_CACHE"] = str(root / "datasets-cache")  # load_dataset's copy of the table: here
    print(f"\n{kind}: writing {len(dataset.keys)} images under {root}", flush=True)
    entry, named = (write_shards if kind == "webshart" else write_table)(dataset, root / "data")
    source = our_source(kind, entry, root)
    listing, ours_listing = timed("ours: listing (index / table columns)", source.listing)
    assert sorted(listing.keys) == sorted(named.keys), "our listing names other samples than the bench wrote"
    backend, theirs_listing = timed("SimpleTuner: its backend + list_files", lambda: (
        lambda b: (b, b.list_files(file_extensions=["jpg"])))(simpletuners_backend(kind, entry, root)))
    backend = backend[0]
    theirs, theirs_seconds = timed(f"SimpleTuner: read_image_batch of {SIMPLETUNER_READ_BATCH}",
                                   lambda: simpletuner_path(backend, named))
    ours, ours_seconds = timed(f"ours: read + decode, VAE batch {args.vae_batch}",
                               lambda: our_path(source, named, args, source.oriented))
    for outcome, who in ((theirs, "SimpleTuner"), (ours, "ours")):
        if outcome.failed:
            raise RuntimeError(f"{kind}, {who}: {len(outcome.failed)} image(s) failed, e.g. {outcome.failed[:3]}")
    check_same_images(named, theirs, ours)
    return {"kind": kind, "images": len(named.keys), "theirs": len(named.keys) / theirs_seconds,
            "ours": len(named.keys) / ours_seconds, "their_listing": theirs_listing, "our_listing": ours_listing}


def report(rows: list[dict], args) -> None:
    print(f"\n## Local shards and tables: read + decode, {rows[0]['images']} images\n")
    print(f"SimpleTuner: read_image_batch of {SIMPLETUNER_READ_BATCH} names (its VAE cache's reads), decode only. "
          f"Ours: VAE batch {args.vae_batch}, read + decode + resize + crop on rayon. Same names, same order, both "
          "decoded all of them (checked, and their sizes).\n")
    print("| kind | images | SimpleTuner images/s | ours images/s | ours ÷ SimpleTuner | listing: SimpleTuner / ours |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ratio = row["ours"] / row["theirs"]
        print(f"| {row['kind']} | {row['images']} | {row['theirs']:.0f} | {row['ours']:.0f} | {ratio:.1f}× | "
              f"{row['their_listing']:.2f} s / {row['our_listing']:.2f} s |")
    for row in rows:
        ratio = row["ours"] / row["theirs"]
        print(f"- target: >= {TARGET_RATIO:g}× SimpleTuner's images/s on {row['kind']}: {ratio:.1f}×, "
              f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}.")
