"""How the data path's costs grow with the dataset: 10k, 100k and 1M tiny images (not a test; issue 18, item 6).

    OMP_NUM_THREADS=1 .venv/bin/python bench/scale.py [--sizes 10000,100000,1000000] [--quick] [--work DIR]
        [--stock-max 100000] [--real-encode-max 10000] [--stock-cold-max 10000] [--threads CORES] [--scan-repeats 3]

Data (bench/scale_data.py): N PNGs of 96x64 ... 144x64 (seven sizes, buckets 1.0, 2.0 and 0.5 at `resolution: 64`),
every file's bytes different, textfile captions drawn from 1,000 strings, in subfolders of 10,000 files, generated
once per N into `--work` and reused. Each path works on its own hard-linked copy of that folder (SimpleTuner writes
its bucket metadata into the image folder); a changed file is written anew and renamed, never edited in place.
Runs are `simpletuner train` LCM-LoRA jobs of 1 step (tiny SDXL, CPU; bench/data_path.py's `write_run`):
plugin = SIMPLETUNER_LCM_DATA_PATH unset, stock = SIMPLETUNER_LCM_DATA_PATH=simpletuner.

One markdown row per N, phase and path:
- `generate`: writing the master folder (only when it was not there yet).
- `scan cold` / `scan warm`: `plan.scan_dataset` (header scan, caption reads, bucketing, in this process, `--threads`
  threads) with no scan memo (`<cache_dir_vae>/lcm-inventory.<id>.memo` deleted first), then again with the memo it
  wrote; best of `--scan-repeats` of each. Files are in the page cache either way (dropping it needs root).
- `cold build`: the plugin's `simpletuner-lcm cache build` on the plugin's copy (memo deleted: a cold scan too), and
  `cache build --format simpletuner` on the stock copy (the same store plus SimpleTuner's own `.pt` and bucket files,
  which the stock runs then start from). Real VAE and text encoders up to `--real-encode-max` images; above it the
  same build in this process with `encode.encode_latents` / `encode_prompts` replaced by random tensors of the real
  shapes and dtypes ("SYNTHETIC" in the row): decode, bucketing, writes and everything else are real.
- `stock cold`: for reference, SimpleTuner's own caching from nothing (stock `simpletuner train` on a third copy),
  up to `--stock-cold-max` images.
- `first start`: the first `simpletuner train` after the build (uncounted: SimpleTuner records its own config in
  the bucket files then); `warm restart`: the next one, nothing changed. Seconds = data preparation as both paths log
  it (`simpletuner-lcm: data preparation took X s`: the trainer's whole `configure_multi_databackend` call); the
  detail gives the run's wall time and the peak RSS of the training process tree's largest process (wait4 rusage).
- `1% restart`: after 1% of the images were rewritten (new pixels, same size), added or removed, about a third each,
  in both copies alike: how many images the run encoded (plugin: its `(N image(s) encoded here, M already cached)`
  line; stock: its own `Bucket B caching results: {... 'cached': N}` lines, with its `VAECache has N unprocessed
  files` line and the `.pt` files written during the run) against the number needing it (rewritten + added). Stock
  names latents by file name, so it does not notice rewritten pixels.
- `disk`: files and bytes of each path's caches (plugin: `<cache>/lcm` stores and the scan memo; stock: its `.pt`
  files), with the space the file system allocated for them.
Stock rows run only up to `--stock-max` images. Then the wall time of each phase of the bench, a cost-growth table
(microseconds per image against N, stock ÷ plugin), peak RSS against N, and the issue's targets.
"""

from __future__ import annotations

import os

# Before bench/data_path.py's defaults (it pins RAYON_NUM_THREADS to 1): the scan and both trainers get every core.
os.environ.setdefault("RAYON_NUM_THREADS", str(os.cpu_count() or 1))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import contextlib
import ctypes
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from data_path import CAPTION_WORDS, load_average, write_run
from scale_data import change_images, ensure_master, link_copy, plan_changes
from trainer_run import EXIT_GRACE_S

RESOLUTION = 64
SWITCH = "SIMPLETUNER_LCM_DATA_PATH"
VENV_BIN = Path(sys.executable).parent
# Targets from the issue.
TARGET_WARM_RATIO = 5.0  # stock / plugin warm data preparation, from TARGET_WARM_FROM images up
TARGET_WARM_FROM = 50_000
TARGET_SCAN_RATE = 100_000  # images/s at 1M, scan + bucketing, all cores
TARGET_SCAN_AT = 1_000_000
TARGET_RSS_BYTES_PER_IMAGE = 150  # plugin peak RSS above stock's, per image


class RunFailed(Exception):
    """A measured command failed; the message names its log."""


@dataclass
class Row:
    n: int
    phase: str
    path: str
    seconds: float | None = None  # None: not run / not a time
    detail: str = ""
    per_image: bool = True  # print seconds / N as microseconds per image

    def markdown(self) -> str:
        seconds = "" if self.seconds is None else f"{self.seconds:.2f}"
        micro = f"{self.seconds / self.n * 1e6:.1f}" if self.seconds is not None and self.per_image else ""
        return f"| {self.n:,} | {self.phase} | {self.path} | {seconds} | {micro} | {self.detail} |"


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    values: dict = field(default_factory=dict)  # (n, key) -> number, for the cost-growth table and targets

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(row.markdown(), flush=True)
        return row


TABLE_HEADER = "| N | phase | path | seconds | µs / image | detail |\n|---|---|---|---|---|---|"


# ---------------------------------------------------------------- processes


def become_subreaper() -> None:
    """Orphaned descendants (a launcher killed before its child) are reparented to this process, so that `spawn`
    reaps them and sees their rusage."""
    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@dataclass
class Spawned:
    returncode: int
    wall: float  # up to its exit, or up to `done` when it was stopped after it
    peak_rss: int  # bytes: the largest maxrss of the process and every descendant reaped
    stopped: bool  # stopped `grace` seconds after `done()` became true
    log: Path


def spawn(command: list[str], cwd: Path, env: dict, log: Path, done=None, grace: float = EXIT_GRACE_S) -> Spawned:
    """Run `command` in its own session with output to `log`; when `done()` turns true and the process has not
    exited `grace` seconds later, kill its process group (SimpleTuner can hang at exit). Peak RSS from wait4."""
    started = time.perf_counter()
    done_at = None
    peak = 0
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.5)
            if done is not None and done_at is None and done():
                done_at = time.perf_counter()
            elif done_at is not None and time.perf_counter() - done_at > grace:
                os.killpg(process.pid, signal.SIGKILL)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    peak = usage.ru_maxrss
    stopped = process.returncode == -signal.SIGKILL and done_at is not None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # what a stopped run left behind
    deadline = time.perf_counter() + 10
    while time.perf_counter() < deadline:  # orphans reparented to us (become_subreaper)
        try:
            pid, _, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            peak = max(peak, usage.ru_maxrss)
        elif not stopped:
            break
        else:
            time.sleep(0.2)
    wall = (done_at if stopped else time.perf_counter()) - started
    return Spawned(process.returncode, wall, peak * 1024, stopped, log)


def run_env(mode: str | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MIXED_PRECISION="no")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop(SWITCH, None)
    if mode == "stock":
        env[SWITCH] = "simpletuner"
    return env


@dataclass
class Train:
    data_seconds: float
    wall: float
    peak_rss: int
    stopped: bool
    log: str
    started_ns: int


def train(run: Path, mode: str, label: str) -> Train:
    """One 1-step `simpletuner train` in `run`: plugin (SIMPLETUNER_LCM_DATA_PATH unset) or stock."""
    metrics = run / "output" / "training_metrics.jsonl"
    metrics.unlink(missing_ok=True)

    def stepped() -> bool:  # SimpleTuner can exit 0 after a failed run: judge it by the step it logged
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        return any(json.loads(line).get("step") for line in lines if line.endswith("}"))

    log = run / f"train-{mode}-{label}.log"
    started_ns = time.time_ns()
    result = spawn([str(VENV_BIN / "simpletuner"), "train"], run, run_env(mode), log, done=stepped)
    output = log.read_text(errors="replace")
    prepared = re.findall(r"data preparation took ([0-9.]+) s", output)
    if not stepped() or len(prepared) != 1 or (result.returncode != 0 and not result.stopped):
        raise RunFailed(f"simpletuner train ({mode}, {label}) failed (exit {result.returncode}); log: {log}")
    return Train(float(prepared[0]), result.wall, result.peak_rss, result.stopped, output, started_ns)


# ---------------------------------------------------------------- folders


def make_model(work: Path) -> Path:
    """The tiny SDXL (bench/data_path.py's vocabulary), written once into the work folder."""
    from lcm_plugin.tiny_sdxl import save_tiny_sdxl

    model = work / "model"
    if not (model / "model_index.json").is_file():
        shutil.rmtree(model, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            save_tiny_sdxl(Path(tmp) / "model", seed=0, vocabulary=CAPTION_WORDS)
            os.replace(Path(tmp) / "model", model)
    return model


def make_run(root: Path, model: Path, master: Path) -> Path:
    """A run folder (write_run's config, resolution 64) whose `data` is a hard-linked copy of `master`."""
    shutil.rmtree(root, ignore_errors=True)
    write_run(root, model, [], RESOLUTION, "PNG")
    (root / "data").rmdir()
    link_copy(master, root / "data")
    return root


def files_below(folder: Path, skip: tuple[str, ...] = ()):
    """os.DirEntry of every regular file below `folder`, leaving out subfolders named in `skip`."""
    stack = [folder]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in skip:
                    stack.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                yield entry


def usage(folder: Path, skip: tuple[str, ...] = ()) -> tuple[int, int, int]:
    """(files, bytes, allocated bytes) below `folder`, leaving out subfolders named in `skip`."""
    stats = [entry.stat(follow_symlinks=False) for entry in files_below(folder, skip)]
    return len(stats), sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats)


def new_files(folder: Path, since_ns: int, suffix: str, skip: tuple[str, ...] = ("lcm",)) -> int:
    """Files ending in `suffix` below `folder` written at or after `since_ns` (mtime)."""
    return sum(1 for entry in files_below(folder, skip)
               if entry.name.endswith(suffix) and entry.stat(follow_symlinks=False).st_mtime_ns >= since_ns)


def the_dataset(run: Path):
    from lcm_plugin.cache_build.plan import datasets_of, read_run

    settings, entries = read_run(run)
    (dataset,) = datasets_of(settings, entries)
    return settings, dataset


def delete_memo(run: Path) -> None:
    from lcm_plugin.cache_build.plan import memo_path

    _, dataset = the_dataset(run)
    memo_path(dataset).unlink(missing_ok=True)


# ---------------------------------------------------------------- measurements


def measure_scan(results: Results, n: int, run: Path, threads: int, repeats: int) -> None:
    """Header scan + caption reads + bucketing of the whole dataset, without and then with the scan memo; best of
    `repeats` of each (interleaved: the memo is deleted before every cold scan)."""
    from lcm_plugin.cache_build.plan import scan_dataset

    best = {"scan cold (no memo)": float("inf"), "scan warm (memo)": float("inf")}
    for _ in range(repeats):
        delete_memo(run)
        for phase in best:
            settings, dataset = the_dataset(run)
            start = time.perf_counter()
            scan_dataset(dataset, settings.seed, threads, remember=True)
            best[phase] = min(best[phase], time.perf_counter() - start)
            files = len(dataset.images) + len(dataset.skipped) + len(dataset.excluded)
            buckets = sorted({bucket for bucket, _ in dataset.images.table.batches(max(1, len(dataset.images)))})
            skipped = len(dataset.skipped)
            del dataset
    for phase, seconds in best.items():
        rate = files / seconds
        results.values[(n, phase.split(" (")[0])] = rate
        results.add(Row(n, phase, "plugin", seconds, f"{rate:,.0f} images/s on {threads} thread(s), best of {repeats};"
                        f" {files:,} images, buckets {', '.join(buckets)}; {skipped} skipped"))


@contextlib.contextmanager
def synthetic_encoders(settings):
    """`encode_latents` and `encode_prompts` return random tensors of the real shapes and dtypes, instantly."""
    import torch

    from lcm_plugin.cache_build import encode
    from lcm_plugin.cache_build.fingerprint import latent_geometry

    channels, factor, stored = latent_geometry(settings.vae_path, settings.vae_dtype)
    dtype = {"F32": torch.float32, "BF16": torch.bfloat16}[stored]
    real_prompts = encode.encode_prompts
    probes: dict = {}

    def encode_latents(vae, images, keys, seed):
        count, height, width, _ = images.shape
        return torch.randn(count, channels, height // factor, width // factor).to(dtype)

    def encode_prompts(tokenizers, encoders, prompts, family):
        if family not in probes:  # the real encoders' shapes and dtypes, once
            probes[family] = real_prompts(tokenizers, encoders, [""], family)
        embeds, pooled = probes[family]
        count = len(prompts)
        return (torch.randn(count, *embeds.shape[1:]).to(embeds.dtype),
                None if pooled is None else torch.randn(count, *pooled.shape[1:]).to(pooled.dtype))

    patched = {"encode_latents": encode_latents, "encode_prompts": encode_prompts}
    saved = []
    for name, value in patched.items():  # fill.py imports them from `encode` inside its functions
        saved.append((encode, name, getattr(encode, name)))
        setattr(encode, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@contextlib.contextmanager
def quiet_progress():
    """No tqdm bars from an in-process build (tqdm reads TQDM_DISABLE)."""
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = before


def cold_build(results: Results, n: int, run: Path, path: str, simpletuner_format: bool, real: bool,
               threads: int) -> None:
    """The cache build from nothing: the CLI with the real encoders, or in this process with synthetic ones."""
    delete_memo(run)
    command = "cache build" + (" --format simpletuner" if simpletuner_format else "")
    if real:
        log = run / f"build{'-simpletuner' if simpletuner_format else ''}.log"
        argv = [str(VENV_BIN / "simpletuner-lcm"), "cache", "build", str(run), "--threads", str(threads)]
        result = spawn(argv + (["--format", "simpletuner"] if simpletuner_format else []), run, run_env(), log)
        report = re.search(r"cache build \(rank 0\): (\d+) image\(s\) encoded \(([0-9.]+) images/s\), (\d+) already "
                           r"cached, (\d+) caption\(s\) encoded, (\d+) file\(s\) skipped", log.read_text())
        if result.returncode != 0 or report is None:
            raise RunFailed(f"{command} failed (exit {result.returncode}); log: {log}")
        encoded, rate, _, captions, skipped = report.groups()
        detail = (f"`{command}` (CLI, real VAE + text encoders): {int(encoded):,} images encoded at {float(rate):.1f}"
                  f" images/s, {captions} captions, {skipped} skipped; peak RSS {result.peak_rss / 1e6:.0f} MB")
        seconds = result.wall
    else:
        from lcm_plugin.cache_build.build import BuildOptions, build

        settings, _ = the_dataset(run)
        lines = []
        with synthetic_encoders(settings), quiet_progress():
            report = build(BuildOptions(config_dir=run, simpletuner_format=simpletuner_format, threads=threads),
                           log=lines.append)
        seconds = report.seconds
        rate = report.encoded / report.encode_seconds if report.encode_seconds else 0.0
        detail = (f"`{command}` in process, SYNTHETIC latents and text embeddings (encoders patched; decode, "
                  f"bucketing and writes real): {report.encoded:,} images at {rate:,.0f} images/s, {report.captions} "
                  f"captions, {len(report.failed)} skipped")
    results.values[(n, f"cold build {path}")] = seconds
    results.add(Row(n, f"cold build{'' if real else ' (SYNTHETIC)'}", path, seconds, detail))


def measure_stock_cold(results: Results, n: int, run: Path) -> None:
    """SimpleTuner's own caching from nothing, for reference (its folder is deleted afterwards)."""
    result = train(run, "stock", "cold")
    results.values[(n, "stock cold")] = result.data_seconds
    stopped = " (stopped after its step)" if result.stopped else ""
    written = new_files(run / "cache" / "vae", result.started_ns, ".pt")
    results.add(Row(n, "stock cold (its own caching)", "stock", result.data_seconds,
                    f"run {result.wall:.1f} s wall{stopped}; peak RSS {result.peak_rss / 1e6:.0f} MB; {written:,} .pt "
                    "latents written"))
    files, size, allocated = (sum(v) for v in zip(*(usage(run / "cache" / sub) for sub in ("vae", "text"))))
    results.add(Row(n, "disk", "stock (its own caching)", None, f"per-image / per-caption .pt files: {files:,} files, "
                    f"{size / 1e6:,.1f} MB ({allocated / 1e6:,.1f} MB allocated, {allocated / n:,.0f} B per image)",
                    per_image=False))


def plugin_encoded(result: Train) -> tuple[int, str]:
    """(images the plugin's data path encoded in the run, a note) from its log line."""
    found = re.findall(r"\((\d+) image\(s\) encoded here, (\d+) already cached\)", result.log)
    encoded, cached = (int(v) for v in found[-1]) if found else (-1, -1)
    return encoded, f"{cached:,} already cached"


def stock_encoded(run: Path, result: Train) -> tuple[int, str]:
    """(images SimpleTuner's VAE cache encoded in the run, a note) from its own lines, "VAECache has N unprocessed
    files" and "Bucket B caching results: {... 'cached': N, ...}", with the .pt files the run wrote."""
    unprocessed = sum(map(int, re.findall(r"VAECache has (\d+) unprocessed files", result.log)))
    encoded = sum(map(int, re.findall(r"caching results: \{[^}]*'cached': (\d+)", result.log)))
    latents = new_files(run / "cache" / "vae", result.started_ns, ".pt")
    texts = new_files(run / "cache" / "text", result.started_ns, ".pt")
    return encoded, f"its log: {unprocessed:,} unprocessed file(s); {latents:,} latent .pt and {texts} text .pt written"


def measure_restart(results: Results, n: int, runs: dict[str, Path], phase: str, label: str,
                    expected: dict | None = None) -> None:
    """One `simpletuner train` per path, in turn; with `expected` (plan_changes' answer), the encode counts."""
    for path, run in runs.items():
        try:
            result = train(run, path, label)
        except RunFailed as error:
            results.add(Row(n, phase, path, None, f"FAILED: {error}"))
            continue
        stopped = " (stopped after its step)" if result.stopped else ""
        detail = f"run {result.wall:.1f} s wall{stopped}; peak RSS {result.peak_rss / 1e6:.0f} MB"
        if expected is not None:
            changed, added, removed = (len(expected[k]) for k in ("changed", "added", "removed"))
            need = changed + added
            if path == "plugin":
                encoded, note = plugin_encoded(result)
                verdict = ": MET" if encoded == need else ": NOT MET"
            else:
                encoded, note = stock_encoded(run, result)
                verdict = ("" if encoded == need or encoded != added else
                           " (it names latents by file name: the rewritten images keep their old latents)")
            detail += (f"; encoded {encoded:,}, needed {need:,} ({changed} rewritten + {added} added; {removed} "
                       f"removed), {note}{verdict}")
            results.values[(n, f"{phase} encoded {path}")] = (encoded, need)
        results.values[(n, f"{phase} {path}")] = result.data_seconds
        results.values[(n, f"{phase} rss {path}")] = result.peak_rss
        results.add(Row(n, phase, path, result.data_seconds, detail))


def measure_disk(results: Results, n: int, runs: dict[str, Path]) -> None:
    folders = {
        "plugin": [(runs["plugin"] / "cache" / "vae" / "lcm", ()), (runs["plugin"] / "cache" / "text" / "lcm", ())],
        "stock": [(runs["stock"] / "cache" / "vae", ("lcm",)), (runs["stock"] / "cache" / "text", ("lcm",))]
        if "stock" in runs else [],
    }
    for path, where in folders.items():
        if not where:
            continue
        files, size, allocated = (sum(v) for v in zip(*(usage(folder, skip) for folder, skip in where)))
        what = "memory-mapped stores + scan memo" if path == "plugin" else "per-image / per-caption .pt files"
        results.add(Row(n, "disk", path, None, f"{what}: {files:,} files, {size / 1e6:,.1f} MB "
                        f"({allocated / 1e6:,.1f} MB allocated, {allocated / n:,.0f} B per image)", per_image=False))


def measure_size(results: Results, n: int, args, model: Path) -> None:
    """Every phase at one N."""
    work = Path(args.work)
    phase_start = time.perf_counter()
    master, generated = ensure_master(work, n, os.cpu_count() or 1)
    if generated is not None:
        results.add(Row(n, "generate", "-", generated, f"{n:,} PNGs + captions written to {master}"))
    stock = n <= args.stock_max
    real = n <= args.real_encode_max
    results.values[(n, "real encode")] = real
    base = work / f"n{n}" / "runs"
    runs = {"plugin": make_run(base / "plugin", model, master)}
    if stock:
        runs["stock"] = make_run(base / "stock", model, master)
    timings = {"folders": time.perf_counter() - phase_start}

    def timed(name, fn, *fn_args):
        start = time.perf_counter()
        try:
            fn(*fn_args)
        except RunFailed as error:
            results.add(Row(n, name, "-", None, f"FAILED: {error}"))
        timings[name] = time.perf_counter() - start

    timed("scan", measure_scan, results, n, runs["plugin"], args.threads, args.scan_repeats)
    timed("cold build plugin", cold_build, results, n, runs["plugin"], "plugin", False, real, args.threads)
    if stock:
        timed("cold build stock", cold_build, results, n, runs["stock"], "stock", True, real, args.threads)
        if n <= args.stock_cold_max:
            cold = make_run(base / "stock-cold", model, master)
            timed("stock cold", measure_stock_cold, results, n, cold)
            shutil.rmtree(cold, ignore_errors=True)
        else:
            results.add(Row(n, "stock cold", "stock", None,
                            f"not run: {n:,} > --stock-cold-max {args.stock_cold_max:,}"))
    else:
        for phase in ("warm restart", "1% restart"):
            results.add(Row(n, phase, "stock", None, f"not run: {n:,} > --stock-max {args.stock_max:,} (its copy "
                            f"would need {n:,} SimpleTuner .pt files written, and its start-up over them; raise "
                            "--stock-max to run it)"))
    timed("first start", measure_restart, results, n, runs, "first start", "first")
    timed("warm restart", measure_restart, results, n, runs, "warm restart", "warm")
    timed("disk", measure_disk, results, n, runs)
    changes = plan_changes(n)
    start = time.perf_counter()
    for run in runs.values():
        change_images(run / "data", changes)
    timings["change 1%"] = time.perf_counter() - start
    timed("1% restart", measure_restart, results, n, runs, "1% restart", "changed", changes)
    timings["all"] = time.perf_counter() - phase_start
    results.values[(n, "timings")] = (timings, load_average())


# ---------------------------------------------------------------- summary


def cost_growth(results: Results, sizes: list[int]) -> None:
    v = results.values
    print("\nCost growth: µs per image (seconds ÷ N), stock ÷ plugin")
    print("| N | phase | plugin µs/img | stock µs/img | stock ÷ plugin | target | verdict |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        for phase in ("warm restart", "1% restart", "first start"):
            ours, theirs = v.get((n, f"{phase} plugin")), v.get((n, f"{phase} stock"))
            if ours is None:
                continue
            ratio = theirs / ours if theirs is not None and ours > 0 else None
            target, verdict = "", ""
            if phase == "warm restart" and ratio is not None:
                need = TARGET_WARM_RATIO if n >= TARGET_WARM_FROM else 1.0
                target, verdict = f">= {need:g}x", "MET" if ratio >= need else "NOT MET"
            print(f"| {n:,} | {phase} data prep | {ours / n * 1e6:.1f} | "
                  f"{'not run' if theirs is None else f'{theirs / n * 1e6:.1f}'} | "
                  f"{'' if ratio is None else f'{ratio:.2f}x'} | {target} | {verdict} |")
        ours, theirs = v.get((n, "cold build plugin")), v.get((n, "stock cold"))
        if ours is not None:
            ratio = f"{theirs / ours:.2f}x" if theirs else ""
            what = "(wall, start-up included)" if v.get((n, "real encode")) else "(SYNTHETIC encoders, in process)"
            print(f"| {n:,} | cold: plugin `cache build` {what} vs stock data prep | {ours / n * 1e6:.1f} | "
                  f"{'not run' if theirs is None else f'{theirs / n * 1e6:.1f}'} | {ratio} |  |  |")
        for phase in ("scan cold", "scan warm"):
            if (n, phase) in v:
                print(f"| {n:,} | {phase} | {1e6 / v[(n, phase)]:.2f} |  |  |  |  |")
    print("\nPeak RSS of the training process (largest process of the `simpletuner train` tree)")
    print("| N | run | plugin MB | stock MB | plugin - stock | per image | target | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        for phase in ("warm restart", "1% restart"):
            ours, theirs = v.get((n, f"{phase} rss plugin")), v.get((n, f"{phase} rss stock"))
            if ours is None:
                continue
            if theirs is None:
                print(f"| {n:,} | {phase} | {ours / 1e6:.0f} | not run |  |  |  |  |")
                continue
            extra = (ours - theirs) / n
            verdict = ("MET" if extra <= TARGET_RSS_BYTES_PER_IMAGE else "NOT MET") if phase == "warm restart" else ""
            print(f"| {n:,} | {phase} | {ours / 1e6:.0f} | {theirs / 1e6:.0f} | {(ours - theirs) / 1e6:+.1f} MB | "
                  f"{extra:+,.0f} B | <= {TARGET_RSS_BYTES_PER_IMAGE} B above stock | {verdict} |")


def targets(results: Results, sizes: list[int]) -> None:
    v = results.values
    print("\nTargets")
    warm = [(n, v[(n, "warm restart stock")] / v[(n, "warm restart plugin")]) for n in sizes
            if (n, "warm restart stock") in v and (n, "warm restart plugin") in v]
    for n, ratio in warm:
        need = TARGET_WARM_RATIO if n >= TARGET_WARM_FROM else 1.0
        print(f"- warm data preparation at {n:,}: stock ÷ plugin {ratio:.2f}x (target >= {need:g}x: "
              f"{'never slower' if need == 1.0 else f'from {TARGET_WARM_FROM:,} images up'}): "
              f"{'MET' if ratio >= need else 'NOT MET'}")
    if not any(n >= TARGET_WARM_FROM for n, _ in warm):
        print(f"- warm data preparation >= {TARGET_WARM_RATIO:g}x from {TARGET_WARM_FROM:,} images up: not measured "
              "(no stock run at that size)")
    for n in sizes:
        if (n, "1% restart encoded plugin") in v:
            encoded, need = v[(n, "1% restart encoded plugin")]
            stock = v.get((n, "1% restart encoded stock"))
            print(f"- 1% restart at {n:,}: plugin encoded {encoded:,} of the {need:,} rewritten or added images "
                  f"(target exactly that): {'MET' if encoded == need else 'NOT MET'}"
                  + (f"; stock encoded {stock[0]:,}" if stock else ""))
    for n in sizes:
        if (n, "scan cold") in v:
            cold, warm_rate = v[(n, "scan cold")], v[(n, "scan warm")]
            applies = n >= TARGET_SCAN_AT
            verdict = lambda rate: ("MET" if rate >= TARGET_SCAN_RATE else "NOT MET") if applies else "target is at 1M"
            print(f"- scan + bucketing at {n:,}: cold {cold:,.0f} images/s ({verdict(cold)}), warm {warm_rate:,.0f} "
                  f"images/s ({verdict(warm_rate)}); target >= {TARGET_SCAN_RATE:,} images/s at {TARGET_SCAN_AT:,}")
    for n in sizes:
        ours, theirs = v.get((n, "warm restart rss plugin")), v.get((n, "warm restart rss stock"))
        if ours is not None and theirs is not None:
            extra = (ours - theirs) / n
            print(f"- peak RSS at {n:,}: plugin {ours / 1e6:.0f} MB, stock {theirs / 1e6:.0f} MB, {extra:+,.0f} B per "
                  f"image above stock (target <= {TARGET_RSS_BYTES_PER_IMAGE}; the budget is "
                  f"{TARGET_RSS_BYTES_PER_IMAGE * n / 1e6:.1f} MB here, run-to-run noise is several MB): "
                  f"{'MET' if extra <= TARGET_RSS_BYTES_PER_IMAGE else 'NOT MET'}")
    for path in ("plugin", "stock"):  # where stock does not run: how each path's peak grows with N
        measured = [(n, v[(n, f"warm restart rss {path}")]) for n in sizes if (n, f"warm restart rss {path}") in v]
        for (a, rss_a), (b, rss_b) in zip(measured, measured[1:]):
            print(f"- {path} peak RSS growth from {a:,} to {b:,} images: {(rss_b - rss_a) / (b - a):+,.0f} B per "
                  "added image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated image counts")
    parser.add_argument("--quick", action="store_true", help="N = 2000 only (smoke run)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "simpletuner-lcm-scale"),
                        help="folder for the generated data and runs, reused when it exists")
    parser.add_argument("--stock-max", type=int, default=100_000, help="run the stock trainer up to this N")
    parser.add_argument("--stock-cold-max", type=int, default=10_000,
                        help="run stock's own caching from nothing (reference row) up to this N")
    parser.add_argument("--real-encode-max", type=int, default=10_000,
                        help="cold builds with the real encoders up to this N, synthetic ones above")
    parser.add_argument("--scan-repeats", type=int, default=3, help="scans of each kind; the best counts")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the scan and builds")
    args = parser.parse_args()
    sizes = [2000] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    command = (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']} "
               f".venv/bin/python bench/scale.py " + shlex.join(
                   (["--quick"] if args.quick else ["--sizes", ",".join(map(str, sizes))])
                   + ["--work", args.work, "--stock-max", str(args.stock_max), "--stock-cold-max",
                      str(args.stock_cold_max), "--real-encode-max", str(args.real_encode_max),
                      "--threads", str(args.threads), "--scan-repeats", str(args.scan_repeats)]))
    print(f"load average at start: {load_average()}; cores: {os.cpu_count()}\ncommand: {command}")
    become_subreaper()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work)
    results = Results()
    print(f"\n{TABLE_HEADER}", flush=True)
    for n in sizes:
        measure_size(results, n, args, model)
    print("\nWall time of each phase of this bench (both paths, model loading included), load average after it")
    for n in sizes:
        timings, load = results.values[(n, "timings")]
        phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
        print(f"- N = {n:,}: {phases}; load {load}")
    cost_growth(results, sizes)
    targets(results, sizes)
    print(f"\nload average at end: {load_average()}\ncommand: {command}")


if __name__ == "__main__":
    main()
