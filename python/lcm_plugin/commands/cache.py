"""`simpletuner-lcm cache build CONFIG_DIR [--format simpletuner]` and `simpletuner-lcm cache verify DIR`."""

from __future__ import annotations

import sys
from pathlib import Path

MAX_SHARD_MB = 1 << 20  # 1 TiB: far past any useful shard, and inside the store's 64-bit sizes
HELP = "build a run's latent and text-embedding caches before training (resumable, multi-process), or verify one"


def add_arguments(parser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="encode every image and caption of the run's datasets into the memory-mapped cache",
        description="Reads config.json and multidatabackend.json, buckets every image as SimpleTuner does, "
        "VAE-encodes per bucket batch and caches text embeddings. Safe to kill and rerun; under "
        "`accelerate launch --num_processes N -m lcm_plugin.cli cache build ...` the ranks share the work.",
    )
    build.add_argument("config_dir", type=Path, metavar="CONFIG_DIR", help="a run folder (config.json in it or in config/) or a config.json")
    build.add_argument(
        "--format",
        choices=("lcm", "simpletuner"),
        default="lcm",
        help="simpletuner: also write SimpleTuner's own per-image cache files and bucket metadata, so the stock "
        "trainer skips its caching (default: lcm, the memory-mapped cache only)",
    )
    build.add_argument(
        "--shard-mb", type=float, default=256.0, help="seal a cache shard every this many MB (default 256)"
    )
    build.add_argument("--threads", type=int, default=None, help="decode threads (default: all cores)")
    build.add_argument(
        "--prune",
        action="store_true",
        help="after the build, rewrite each store without the entries the current config no longer refers to "
        "(earlier settings, removed images); one process only, and not while training reads the cache",
    )
    verify = actions.add_parser(
        "verify",
        help="check every shard of a cache (size, CRC-32, header) and count entries; for a run, also that the "
        "caches hold what its current config produces",
    )
    verify.add_argument(
        "path", type=Path, metavar="DIR", help="a cache folder (holding index.*.json) or a run folder / config.json"
    )


def run(args) -> int:
    return _build(args) if args.action == "build" else _verify(args)


def _build(args) -> int:
    from lcm_plugin.cache import LatentCacheError
    from lcm_plugin.cache_build import BuildError, BuildOptions, build
    from lcm_plugin.cache_build.build import print_report, rank_and_world

    if not (0 < args.shard_mb <= MAX_SHARD_MB):  # also false for nan
        print(f"simpletuner-lcm cache build: --shard-mb {args.shard_mb}: give a size in MB above 0 and at most "
              f"{MAX_SHARD_MB} (default 256)", file=sys.stderr)
        return 1
    if args.threads is not None and args.threads < 1:
        print(f"simpletuner-lcm cache build: --threads {args.threads}: give 1 or more (leave it out to use every "
              "core)", file=sys.stderr)
        return 1
    options = BuildOptions(
        config_dir=args.config_dir,
        simpletuner_format=args.format == "simpletuner",
        shard_bytes=max(1, int(args.shard_mb * (1 << 20))),
        threads=args.threads,
        prune=args.prune,
    )
    rank, _ = rank_and_world()
    try:
        report = build(options, log=lambda line: print(line, file=sys.stderr))
    except (BuildError, LatentCacheError, OSError) as error:
        print(f"simpletuner-lcm cache build: {error}", file=sys.stderr)
        return 1
    for path, reason in report.failed:
        print(f"simpletuner-lcm cache build: skipped {path}: {reason}", file=sys.stderr)
    print_report(report, rank)
    return 0


def is_cache_folder(path: Path) -> bool:
    return path.is_dir() and any(path.glob("index.*.json"))


def cache_folders(path: Path) -> list[Path]:
    """`path` itself when it holds a cache index, else the lcm caches of the run whose config `path` names."""
    from lcm_plugin.cache_build.layout import LCM_DIR
    from lcm_plugin.cache_build.plan import datasets_of, read_run

    if is_cache_folder(path):
        return [path]
    settings, entries = read_run(path)
    datasets = datasets_of(settings, entries)
    return sorted({d.vae_cache_dir / LCM_DIR for d in datasets} | {d.text_cache_dir / LCM_DIR for d in datasets})


def _verify(args) -> int:
    from lcm_plugin.cache import LatentCacheError, LatentCacheReader, verify
    from lcm_plugin.cache_build import BuildError

    try:
        folders = cache_folders(args.path)
    except BuildError as error:
        print(f"simpletuner-lcm cache verify: {error}", file=sys.stderr)
        return 1
    bad = 0
    for folder in folders:
        if not folder.is_dir():
            print(f"{folder}: missing (run simpletuner-lcm cache build)")
            bad += 1
            continue
        try:
            problems = verify(folder)
            entries = len(LatentCacheReader(folder, verify=False))
        except (LatentCacheError, OSError) as error:
            print(f"{folder}: {error}")
            bad += 1
            continue
        for shard, reason in problems:
            print(f"{shard}: {reason}")
        bad += len(problems)
        print(f"{folder}: {'FAILED' if problems else 'OK'}: {entries} entries, {len(problems)} bad shard(s)")
    if not is_cache_folder(args.path):
        from lcm_plugin.cache_build.build import check_run

        try:
            stale = check_run(args.path)
        except (BuildError, LatentCacheError, OSError) as error:
            print(f"simpletuner-lcm cache verify: {error}", file=sys.stderr)
            return 1
        for line in stale:
            print(line)
        print(f"{args.path}: {'STALE' if stale else 'OK'}: the caches {'do not match' if stale else 'match'} the "
              "current config" + ("; run simpletuner-lcm cache build" if stale else ""))
        bad += len(stale)
    return 1 if bad else 0
