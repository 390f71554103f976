"""The stock `simpletuner train` starts on a cache written by `simpletuner-lcm cache build --format simpletuner`
and encodes nothing itself: every VAE and caption cache file it needs is there, and none is rewritten.

The one file SimpleTuner always rewrites at start is the caption-dropout embedding (TextEmbeddingCache.
encode_dropout_caption encodes "" unconditionally); its rewrite must equal what the build wrote.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import torch

from conftest import write_lcm_training_dir


def cache_files(run: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (run / "cache").rglob("*.pt")}


def test_stock_trainer_reuses_the_simpletuner_format_cache(tmp_path, tiny_sdxl_dir, trainer_env):
    run = write_lcm_training_dir(tmp_path / "run", tiny_sdxl_dir, max_train_steps=1)
    bin_dir = Path(trainer_env["PATH"].split(":", 1)[0])
    built = subprocess.run(
        [str(bin_dir / "simpletuner-lcm"), "cache", "build", str(run), "--format", "simpletuner"],
        env=trainer_env, capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    from simpletuner.helpers.data_backend.local import LocalDataBackend

    before = cache_files(run)
    assert len([p for p in before if "vae" in p.parts]) == 4  # the four shapes
    dropout_file = run / "cache" / "text" / f"{hashlib.md5(b'').hexdigest()}-sdxl.pt"
    loader = LocalDataBackend(accelerator=None, id="text", compress_cache=True)  # compress_disk_cache default
    ours = loader.torch_load(str(dropout_file))

    trainer_env["SIMPLETUNER_LCM_DATA_PATH"] = "simpletuner"  # SimpleTuner's own caching reads these files
    result = subprocess.run(
        [str(bin_dir / "simpletuner"), "train"], cwd=run, env=trainer_env, capture_output=True, text=True, timeout=540
    )
    log = result.stdout + result.stderr
    assert (run / "output" / "training_metrics.jsonl").is_file(), log[-4000:]
    # Nothing re-encoded: the same files (inode and mtime), and no new ones.
    after = cache_files(run)
    assert after.keys() == before.keys(), log[-4000:]
    assert {p: v for p, v in after.items() if p != dropout_file} == {p: v for p, v in before.items() if p != dropout_file}
    assert after[dropout_file] != before[dropout_file], "SimpleTuner did not rewrite the dropout embedding"
    theirs = loader.torch_load(str(dropout_file))
    for name in ("prompt_embeds", "pooled_prompt_embeds"):
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-5)
