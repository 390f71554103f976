"""`simpletuner-lcm cache build` then the stock `simpletuner train` on the same host encodes nothing twice, on
both of the trainer's data paths: SimpleTuner's own caching (`SIMPLETUNER_LCM_DATA_PATH=simpletuner`, reading the
files `--format simpletuner` writes) and the plugin's (the default for an LCM run, reading the memory-mapped
caches). Every VAE and caption cache file the trainer needs is there, and none is deleted or rewritten.

The configs leave `vae_dtype` unset, as the seed does: SimpleTuner then keeps its VAE in fp32 on a CPU (this
host) and casts it to bf16 only on an accelerator. A build that took bf16 here had every latent encoded again on
the plugin's path, and on SimpleTuner's path served bf16 latents that its own VAE does not produce.

The one file SimpleTuner always rewrites at start is the caption-dropout embedding (TextEmbeddingCache.
encode_dropout_caption encodes "" unconditionally); its rewrite must equal what the build wrote.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import torch

from conftest import write_lcm_training_dir
from test_simpletuner_train import run_stock_trainer

# The plugin data path's summary line (trainer_cache.prepare), rank 0.
SERVED = re.compile(r"simpletuner-lcm data path: datasets .* \((\d+) image\(s\) encoded here, (\d+) already cached\)")
# What the memory-mapped stores hold their entries in: the shards and each writer's index and journal.
STORE_FILES = ("*.safetensors", "index.*")


def cache_files(run: Path, *patterns: str) -> dict[Path, tuple[int, int]]:
    """(inode, mtime) of the files under the run's cache folder that match `patterns` (SimpleTuner's `*.pt` when
    none are given)."""
    found = [p for pattern in patterns or ("*.pt",) for p in (run / "cache").rglob(pattern)]
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in found if p.is_file()}


def without(files: dict[Path, tuple[int, int]], path: Path) -> dict[Path, tuple[int, int]]:
    return {p: v for p, v in files.items() if p != path}


def seed_run(tmp_path: Path, model_dir: Path, **config) -> Path:
    """A 1-step LCM run whose config.json leaves vae_dtype to SimpleTuner's default, as the seed's does, with
    `config` on top."""
    run = write_lcm_training_dir(tmp_path / "run", model_dir, max_train_steps=1)
    path = run / "config" / "config.json"
    values = json.loads(path.read_text())
    values.pop("vae_dtype", None)
    path.write_text(json.dumps(values | config, indent=2))
    return run


def run_tool(env: dict[str, str], *args: str, cwd: Path | None = None) -> str:
    """Run a command of this venv (`simpletuner-lcm`); its output, after checking it succeeded."""
    bin_dir = Path(env["PATH"].split(":", 1)[0])
    result = subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=540)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def test_stock_trainer_reuses_the_simpletuner_format_cache(tmp_path, tiny_sdxl_dir, trainer_env):
    run = seed_run(tmp_path, tiny_sdxl_dir)
    run_tool(trainer_env, "simpletuner-lcm", "cache", "build", str(run), "--format", "simpletuner")
    from simpletuner.helpers.data_backend.local import LocalDataBackend

    before = cache_files(run)
    assert len([p for p in before if "vae" in p.parts]) == 4  # the four shapes
    dropout_file = run / "cache" / "text" / f"{hashlib.md5(b'').hexdigest()}-sdxl.pt"
    loader = LocalDataBackend(accelerator=None, id="text", compress_cache=True)  # compress_disk_cache default
    ours = loader.torch_load(str(dropout_file))

    trainer_env["SIMPLETUNER_LCM_DATA_PATH"] = "simpletuner"  # SimpleTuner's own caching reads these files
    log = run_stock_trainer(run, trainer_env)
    assert (run / "output" / "training_metrics.jsonl").is_file(), log[-4000:]
    # Nothing re-encoded: the same files (inode and mtime), and no new ones.
    after = cache_files(run)
    assert after.keys() == before.keys(), log[-4000:]
    assert without(after, dropout_file) == without(before, dropout_file)
    assert after[dropout_file] != before[dropout_file], "SimpleTuner did not rewrite the dropout embedding"
    theirs = loader.torch_load(str(dropout_file))
    for name in ("prompt_embeds", "pooled_prompt_embeds"):
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-5)
    # The latents are in the dtype SimpleTuner's VAE has on this host (no accelerator: the fp32 it loads in).
    assert {loader.torch_load(str(p)).dtype for p in before if "vae" in p.parts} == {torch.float32}


def test_plugin_data_path_encodes_nothing_after_cache_build(tmp_path, tiny_sdxl_dir, trainer_env):
    # mixed_precision bf16 (the seed's): SimpleTuner casts the text encoders to bf16 on a CPU too, while the
    # launcher's MIXED_PRECISION=no (trainer_env) only reaches `accelerate launch`, which the trainer's own
    # Accelerator(mixed_precision=...) overrides.
    run = seed_run(tmp_path, tiny_sdxl_dir, mixed_precision="bf16")
    run_tool(trainer_env, "simpletuner-lcm", "cache", "build", str(run))
    before = cache_files(run, *STORE_FILES)
    assert len([p for p in before if p.suffix == ".safetensors"]) >= 2  # latents and text embeddings
    manifest = run / "cache" / "vae" / "lcm" / "manifest.json"
    manifest_text = manifest.read_text()

    log = run_stock_trainer(run, trainer_env)
    assert (run / "output" / "training_metrics.jsonl").is_file(), log[-4000:]
    plugin_lines = "\n".join(line for line in log.splitlines() if "simpletuner-lcm data path" in line)
    served = [match.groups() for match in SERVED.finditer(log)]
    assert served == [("0", "4")], plugin_lines  # 0 encoded here, the 4 images already cached
    assert "to encode" not in log, plugin_lines
    # The shards and indexes are untouched; the manifest is written again at every start, with the same content.
    after = cache_files(run, *STORE_FILES)
    assert after == before
    assert manifest.read_text() == manifest_text
    # What SimpleTuner's models are on this host: the VAE in the fp32 it loads in, the text encoders in bf16.
    prints = json.loads(manifest_text)
    assert (prints["fingerprint"]["vae_dtype"], prints["text_fingerprint"]["text_dtype"]) == ("fp32", "bf16")
