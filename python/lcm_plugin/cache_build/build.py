"""`simpletuner-lcm cache build`: fill a run's latent and text caches, resumably, on one or many processes.

Order of work (every rank derives the same plan; rank r takes batches r, r + N, ...):
1. read and validate config.json + multidatabackend.json; header-scan and bucket every image;
2. rank 0 verifies existing caches and drops failing shards (their keys are rebuilt); all ranks wait;
3. VAE batches: decode/resize/crop in Rust, encode in torch, put latents + SDXL time_ids in the mmap cache;
4. captions: encode with both CLIP encoders, put prompt_embeds + pooled_prompt_embeds;
5. ranks exchange the images that failed to decode; rank 0 writes each dataset's manifest (and, with
   --format simpletuner, SimpleTuner's bucket metadata).

Resumable: a shard is committed atomically, and a batch with any key missing is re-encoded whole (the same
images, so the same latents) while only its missing keys are written. A kill at any point loses at most the
uncommitted tail.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lcm_plugin.cache_build.plan import (
    Batch,
    BuildError,
    Dataset,
    RunSettings,
    datasets_of,
    read_run,
    scan_dataset,
    unique_captions,
    vae_batches,
)

LCM_DIR = "lcm"  # the mmap cache lives in <cache_dir_vae>/lcm and <text cache_dir>/lcm
MANIFEST = "manifest.json"
TIME_IDS = "#time_ids"  # latent key + this suffix: SDXL add_time_ids of the image
PROMPT_EMBEDS = "/prompt_embeds"
POOLED_PROMPT_EMBEDS = "/pooled_prompt_embeds"
TEXT_BATCH = 32  # captions per text-encoder call


@dataclass(frozen=True)
class BuildOptions:
    config_dir: Path
    simpletuner_format: bool = False
    shard_bytes: int = 256 << 20
    threads: int | None = None


@dataclass
class BuildReport:
    encoded: int = 0  # images VAE-encoded by this rank in this run
    reused: int = 0  # images of this rank found already cached
    captions: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    seconds: float = 0.0  # the whole build, model loading included
    encode_seconds: float = 0.0  # decode + VAE encode + write of the images


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the process count, from the variables `accelerate launch` / torchrun set."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def text_key(caption: str) -> str:
    """Cache key of a caption: its md5, as SimpleTuner names its text cache files."""
    return hashlib.md5(caption.encode()).hexdigest()


def time_ids(sample: dict) -> list[int]:
    """SDXL add_time_ids: original (H, W), crop (top, left), target (H, W) (sample sizes are (W, H))."""
    (ow, oh), (top, left), (tw, th) = sample["original_size"], sample["crop_coordinates"], sample["target_size"]
    return [oh, ow, top, left, th, tw]


class _Group:
    """torch.distributed over gloo when several processes run; no-ops for one."""

    def __init__(self, world: int):
        self.world = world
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: list) -> list:
        """Concatenation of every rank's `value`."""
        if self.world == 1:
            return list(value)
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, value)
        return [x for part in parts for x in part]

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def build(options: BuildOptions, log=print) -> BuildReport:
    """Run the whole build on this rank. Raises BuildError for bad input (config, model, unwritable cache)."""
    import time

    start = time.perf_counter()
    rank, world = rank_and_world()
    settings, entries = read_run(options.config_dir)
    datasets = [scan_dataset(d, settings.seed, options.threads) for d in datasets_of(settings, entries)]
    report = BuildReport()
    for dataset in datasets if rank == 0 else []:  # every rank scans; one reports
        report.failed += [(str(path), reason) for path, reason in dataset.skipped if "minimum" not in reason]
    group = _Group(world)
    try:
        if rank == 0:
            _repair(datasets, log)
        group.barrier()
        batches = vae_batches(datasets, settings.vae_batch_size)
        _encode_images(batches[rank::world], datasets, settings, options, rank, report)
        _encode_captions(datasets, settings, options, rank, world, report)
        failed = {path for path, _ in group.gather(report.failed)}
        if rank == 0:
            for dataset in datasets:
                encoded = [item for item in dataset.images if str(item.path) not in failed]
                _write_manifest(dataset, encoded)
                if options.simpletuner_format:
                    from lcm_plugin.cache_build.simpletuner_format import write_bucket_metadata

                    write_bucket_metadata(dataset, encoded)
        group.barrier()
    finally:
        group.close()
    report.seconds = time.perf_counter() - start
    return report


def _repair(datasets: list[Dataset], log) -> None:
    """Drop shards that fail their checks (bad CRC, missing, truncated) so that their keys are encoded again."""
    from lcm_plugin.cache import verify

    folders = {d.vae_cache_dir / LCM_DIR for d in datasets} | {d.text_cache_dir / LCM_DIR for d in datasets}
    for folder in sorted(folders):
        if folder.is_dir():
            for shard, reason in verify(folder, repair=True):
                log(f"cache build: {shard}: {reason}; dropped, its entries are encoded again")


def _open_writer(folder: Path, rank: int, shard_bytes: int):
    from lcm_plugin.cache import LatentCacheError, LatentCacheWriter

    try:
        return LatentCacheWriter(folder, writer=f"rank{rank}", shard_bytes=shard_bytes)
    except (OSError, LatentCacheError) as error:
        raise BuildError(f"{folder}: cannot open the cache for writing: {error}") from None


def _encode_images(
    batches: list[Batch], datasets: list[Dataset], settings: RunSettings, options: BuildOptions, rank: int, report
) -> None:
    import time

    import torch
    from tqdm import tqdm

    from lcm_plugin.cache import decode_batch
    from lcm_plugin.cache_build.encode import encode_latents, load_vae
    from lcm_plugin.cache_build.simpletuner_format import save_torch, vae_cache_path

    by_id = {d.id: d for d in datasets}
    writers = {d.id: _open_writer(d.vae_cache_dir / LCM_DIR, rank, options.shard_bytes) for d in datasets}

    def cached(dataset: Dataset, item) -> bool:
        done = item.key in writers[dataset.id] and item.key + TIME_IDS in writers[dataset.id]
        return done and (not options.simpletuner_format or vae_cache_path(dataset, item).is_file())

    todo = [b for b in batches if not all(cached(by_id[b.dataset], item) for item in b.items)]
    report.reused += sum(len(b.items) for b in batches) - sum(len(b.items) for b in todo)
    if not todo:
        return
    vae = _load(load_vae, settings.vae_path, settings.vae_dtype, what="VAE")
    bar = tqdm(total=sum(len(b.items) for b in todo), unit="img", desc=f"latents (rank {rank})", disable=rank != 0)
    start = time.perf_counter()
    for batch in todo:
        dataset, writer = by_id[batch.dataset], writers[batch.dataset]
        target = batch.items[0].sample["target_size"]
        pixels, ok, errors = decode_batch(
            [str(item.path) for item in batch.items],
            [item.sample["resize_size"] for item in batch.items],
            [item.sample["crop_coordinates"] for item in batch.items],
            target,
            threads=options.threads,
        )
        report.failed += [(str(batch.items[i].path), message) for i, message in errors]
        for i, message in errors:
            bar.write(f"cache build: skipped {batch.items[i].path}: {message}")
        if ok:
            items = [batch.items[i] for i in ok]
            latents = encode_latents(vae, pixels, [item.key for item in items], settings.seed)
            for item, latent in zip(items, latents):
                if options.simpletuner_format and not vae_cache_path(dataset, item).is_file():
                    save_torch(vae_cache_path(dataset, item), latent.clone(), dataset.compress_vae)
                if item.key not in writer:
                    writer.put(item.key, latent)
                    report.encoded += 1
                if item.key + TIME_IDS not in writer:
                    writer.put(item.key + TIME_IDS, torch.tensor(time_ids(item.sample), dtype=torch.int64))
        bar.update(len(batch.items))
    bar.close()
    for writer in writers.values():
        writer.commit()
    report.encode_seconds = time.perf_counter() - start


def _encode_captions(
    datasets: list[Dataset], settings: RunSettings, options: BuildOptions, rank: int, world: int, report
) -> None:
    from tqdm import tqdm

    from lcm_plugin.cache_build.encode import encode_prompts, load_text_encoders
    from lcm_plugin.cache_build.simpletuner_format import save_torch, text_cache_path

    compress = {d.text_cache_dir: d.compress_text for d in datasets}
    work = []  # (folder, writer, captions of this rank still to encode)
    for folder, captions in unique_captions(datasets).items():
        writer = _open_writer(folder / LCM_DIR, rank, options.shard_bytes)

        def cached(caption: str) -> bool:
            key = text_key(caption)
            done = key + PROMPT_EMBEDS in writer and key + POOLED_PROMPT_EMBEDS in writer
            return done and (not options.simpletuner_format or text_cache_path(folder, caption).is_file())

        mine = captions[rank::world]
        work.append((folder, writer, [c for c in mine if not cached(c)]))
    if not any(todo for _, _, todo in work):
        return
    tokenizers, encoders = _load(load_text_encoders, settings.model_path, settings.text_dtype, what="text encoders")
    bar = tqdm(total=sum(len(t) for _, _, t in work), unit="caption", desc=f"text (rank {rank})", disable=rank != 0)
    for folder, writer, todo in work:
        for start in range(0, len(todo), TEXT_BATCH):
            chunk = todo[start : start + TEXT_BATCH]
            prompt_embeds, pooled = encode_prompts(tokenizers, encoders, chunk)
            for caption, embeds, pooled_embeds in zip(chunk, prompt_embeds, pooled):
                if options.simpletuner_format:
                    value = {"prompt_embeds": embeds[None].clone(), "pooled_prompt_embeds": pooled_embeds.clone()}
                    save_torch(text_cache_path(folder, caption), value, compress[folder])
                key = text_key(caption)
                if key + PROMPT_EMBEDS not in writer:
                    writer.put(key + PROMPT_EMBEDS, embeds)
                if key + POOLED_PROMPT_EMBEDS not in writer:
                    writer.put(key + POOLED_PROMPT_EMBEDS, pooled_embeds)
                report.captions += 1
            bar.update(len(chunk))
        writer.commit()
    bar.close()


def _load(loader, path: str, dtype: str, what: str):
    try:
        return loader(path, dtype)
    except (OSError, ValueError, EnvironmentError) as error:
        raise BuildError(f"cannot load the {what} from {path!r}: {str(error).splitlines()[0]}") from None


def _write_manifest(dataset: Dataset, items: list) -> None:
    """<cache_dir_vae>/lcm/manifest.json: per image its latent key, bucket, time_ids and caption keys."""
    from lcm_plugin.cache_build.simpletuner_format import write_atomic

    manifest = {
        "format": "simpletuner-lcm-manifest",
        "format_version": 1,
        "dataset": dataset.id,
        "instance_data_dir": str(dataset.data_dir),
        "text_cache": str(dataset.text_cache_dir / LCM_DIR),
        "images": [
            {
                "key": item.key,
                "bucket": item.sample["bucket"],
                "time_ids": time_ids(item.sample),
                "captions": [text_key(caption) for caption in item.captions],
            }
            for item in items
        ],
    }
    write_atomic(dataset.vae_cache_dir / LCM_DIR / MANIFEST, json.dumps(manifest, indent=1).encode())


def print_report(report: BuildReport, rank: int, file=sys.stderr) -> None:
    rate = report.encoded / report.encode_seconds if report.encode_seconds else 0.0
    print(
        f"cache build (rank {rank}): {report.encoded} image(s) encoded ({rate:.1f} images/s), {report.reused} "
        f"already cached, {report.captions} caption(s) encoded, {len(report.failed)} file(s) skipped; "
        f"{report.seconds:.1f} s in all",
        file=file,
    )
