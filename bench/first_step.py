"""Cold time to the first training step of `simpletuner train` on a dataset in an S3 bucket, in webshart shards or in
a local Hugging Face dataset: SimpleTuner 4.10.1's own path against the plugin's, on the same data (not a test;
issue 19, item 6: "cold time to first step >= 2x faster than stock", each kind).

    .venv/bin/python bench/first_step.py [--kind s3|webshart|huggingface] [--images 2000] [--latency-ms 20]
        [--resolution 256]

`--images 100` is a smoke run.

- Data: `--images` photo-like JPEGs of six sizes (bench/sources.py's), each with a caption object (`.txt`), keys
  `images/<n>.jpg`; the dataset's `aws_data_prefix` is "": upstream SimpleTuner 4.10.1 trains on no other (the
  plugin's patch S1 fixes that), so the stock path runs exactly as upstream's.
- Server: moto in a process of its own (bench/sources.py's), adding the latency to every request. It takes writes,
  which both paths make (SimpleTuner puts a latent object per image and its bucket files, the plugin its bucket files),
  and costs ~3 ms of CPU per request: SimpleTuner's path makes more requests, so the server slows it more.
- `--kind webshart` / `huggingface`: the same JPEGs as tar shards with their webshart index, or as parquet files of
  a Hugging Face dataset (bench/packed_sources.py writes both, 1,000 images per file), captions in the index or a
  `caption` column; no server.
- Runs: a tiny SDXL, LCM-LoRA, CPU, 1 step, batch 1, crop to `--resolution` (pixel_area). Each path gets a bucket of
  its own with the same objects and a fresh run folder; cold (nothing cached), then warm (the same folder and
  bucket again). One uncounted run first: the first trainer start on a machine pays for bytecode and file caches.
- Reported per run: time to the first step (launch to the step in training_metrics.jsonl, polled every 0.25 s) and
  data preparation (the trainer's configure_multi_databackend call, as both paths log it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sources  # noqa: F401 - first: keeps proxies off 127.0.0.1 and puts tests/ on the path
from sources import SIZES, PhotoMaker, ServerProcess
from trainer_run import train_once

CAPTION_WORDS = ("photo", "red", "blue", "street", "tree", "sky", "house", "dog")
TARGET_RATIO = 2.0


def objects(count: int) -> dict[str, bytes]:
    maker = PhotoMaker()
    out = {}
    for index in range(count):
        out[f"images/{index:06d}.jpg"] = maker.jpeg(*SIZES[index % len(SIZES)])
        words = " ".join(CAPTION_WORDS[(index + k) % len(CAPTION_WORDS)] for k in range(3))
        out[f"images/{index:06d}.txt"] = f"{words} {index}".encode()
    return out


def fill_bucket(endpoint: str, bucket: str, data: dict[str, bytes]) -> None:
    from s3_server import make_client

    client = make_client(endpoint, max_pool_connections=16, read_timeout=60)
    client.create_bucket(Bucket=bucket)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=bucket, Key=item[0], Body=item[1]), data.items()))


def s3_entry(endpoint: str, bucket: str) -> dict:
    return {"type": "aws", "aws_bucket_name": bucket, "aws_data_prefix": "", "aws_region_name": "us-east-1",
            "aws_endpoint_url": endpoint, "aws_access_key_id": "test", "aws_secret_access_key": "test",
            "caption_strategy": "textfile", "metadata_backend": "discovery"}


def packed_entry(kind: str, folder: Path, data: dict[str, bytes]) -> dict:
    """The images of `data` written as `kind` under `folder` (captions in the index or a column); the entry's keys."""
    from packed_sources import write_shards, write_table
    from sources import Dataset

    images = {key: body for key, body in data.items() if key.endswith(".jpg")}
    dataset = Dataset(images, {key: (0, 0) for key in images}, {key: {"target_size": (0, 0)} for key in images})
    entry, _ = (write_shards if kind == "webshart" else write_table)(dataset, folder)
    entry.pop("id")
    if kind == "webshart":  # SimpleTuner keeps a webshart dataset's files in cache/webshart/<id> of its working folder
        entry["webshart"] = {"cache_dir": str(folder.parent / "cache" / "webshart")}
    return entry


def write_run(root: Path, model_dir: Path, entry: dict, resolution: int) -> Path:
    (root / "config").mkdir(parents=True)
    backends = [
        {
            "id": "photos", **entry,
            "crop": True, "crop_style": "center", "crop_aspect": "preserve", "resolution": resolution,
            "resolution_type": "pixel_area", "minimum_image_size": resolution // 2, "cache_dir_vae": "cache/vae",
            "repeats": 0,
        },
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(root / "cache" / "text")},
    ]
    (root / "config" / "multidatabackend.json").write_text(json.dumps(backends, indent=2))
    config = {
        "model_type": "lora", "model_family": "sdxl", "output_dir": str(root / "output"),
        "pretrained_model_name_or_path": str(model_dir), "pretrained_vae_model_name_or_path": str(model_dir / "vae"),
        "data_backend_config": str(root / "config" / "multidatabackend.json"),
        "distillation_method": "lcm", "distillation_config": {"lcm": {"num_ddim_timesteps": 50}},
        "resolution": resolution, "resolution_type": "pixel_area", "max_train_steps": 1, "num_train_epochs": 0,
        "train_batch_size": 1, "learning_rate": 1e-4, "lr_scheduler": "constant", "lr_warmup_steps": 0,
        "mixed_precision": "no", "lora_rank": 4, "optimizer": "torch-adamw", "seed": 42, "validation_disable": True,
        "report_to": "simpletuner", "checkpoint_step_interval": 10_000,
    }
    (root / "config" / "config.json").write_text(json.dumps(config, indent=2))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=("s3", "webshart", "huggingface"), default="s3")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args()

    from lcm_plugin.tiny_sdxl import save_tiny_sdxl

    started = time.perf_counter()
    data = objects(args.images)
    server = ServerProcess("moto") if args.kind == "s3" else None
    results = {}

    def dataset(root: Path, name: str, data: dict[str, bytes]) -> dict:
        if server is None:
            return packed_entry(args.kind, root / "data", data)
        server.set_latency(0)
        fill_bucket(server.endpoint, name, data)
        server.set_latency(args.latency_ms)
        return s3_entry(server.endpoint, name)

    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = save_tiny_sdxl(Path(tmp) / "model", seed=0, vocabulary=CAPTION_WORDS)
            warm_up = dataset(Path(tmp) / "warm-up", "warm-up", dict(list(data.items())[:16]))
            train_once(write_run(Path(tmp) / "warm-up", model, warm_up, args.resolution), "simpletuner")
            for path in ("simpletuner", "rust"):
                entry = dataset(Path(tmp) / path, f"first-step-{path}", data)
                run = write_run(Path(tmp) / path, model, entry, args.resolution)
                results[path] = (train_once(run, path), train_once(run, path))
                for phase, result in zip(("cold", "warm"), results[path]):
                    print(f"  {path} {phase}: first step {result.first_step:.1f} s, data preparation "
                          f"{result.data_seconds:.2f} s", flush=True)
    finally:
        if server is not None:
            server.stop()
    where = {"s3": f"in a moto bucket, {args.latency_ms:g} ms added per request", "webshart": "in webshart shards",
             "huggingface": "in a Hugging Face dataset (parquet)"}[args.kind]
    print(f"\n{args.images} JPEGs {where}, tiny SDXL on the CPU, {args.resolution} px; "
          f"load {os.getloadavg()[0]:.1f}; {time.perf_counter() - started:.0f} s in all\n")
    print("| phase | measure | SimpleTuner 4.10.1 | simpletuner-lcm | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for index, phase in enumerate(("cold", "warm")):
        stock, ours = results["simpletuner"][index], results["rust"][index]
        for name, field in (("time to first step", "first_step"), ("data preparation", "data_seconds")):
            theirs, mine = getattr(stock, field), getattr(ours, field)
            print(f"| {phase} | {name} | {theirs:.1f} s | {mine:.1f} s | {theirs / mine:.2f}x |")
    ratio = results["simpletuner"][0].first_step / results["rust"][0].first_step
    print(f"\n{args.kind}: cold time to first step: {ratio:.2f}x (target >= {TARGET_RATIO:g}x) "
          f"{'MET' if ratio >= TARGET_RATIO else 'NOT MET'}")


if __name__ == "__main__":
    main()
