"""The model part of a warm start at SDXL's real size: fingerprinting the VAE and both text encoders.

Every start (every rank) fingerprints the run's models so that no cache serves latents or embeddings of other
weights (lcm_plugin.cache_build.fingerprint). Hashing every weight file is what that cost before the per-user digest
memo (`FileDigests`); with it, a start stats the files and hashes only those whose stamps changed.

Model: lcm_plugin.real_sdxl (SDXL base 1.0's architecture, random weights; written once, ~7 GB in bf16, to
~/.cache/simpletuner-lcm). Rows, in one process, each with the files in the page cache (a cold disk only makes the
hashing rows slower):
  - no memo: every weight file hashed (sha256), the cost of every start without the memo;
  - memo, nothing changed: a warm start;
  - memo, one file touched (its mtime changed, its bytes not): that file is hashed again, the rest are not.

    .venv/bin/python bench/model_fingerprint.py [--dtype bf16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def fingerprint_seconds(model: Path) -> tuple[float, dict, dict]:
    """Seconds to fingerprint `model`'s VAE and text encoders as a build does, and the two fingerprints."""
    from lcm_plugin.cache_build.fingerprint import latent_fingerprint, text_fingerprint

    start = time.perf_counter()
    latent = latent_fingerprint(str(model), "bf16", 0)
    text = text_fingerprint(str(model), "bf16")
    return time.perf_counter() - start, latent, text


def hashed_bytes(model: Path) -> int:
    from lcm_plugin.cache_build.fingerprint import _WEIGHTS

    folders = ("vae", "text_encoder", "text_encoder_2")
    return sum(p.stat().st_size for f in folders for p in (model / f).iterdir() if _WEIGHTS.match(p.name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", help="real-size model dtype on disk (default bf16)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the median is shown (default 3)")
    args = parser.parse_args()
    from lcm_plugin.real_sdxl import ensure_real_sdxl

    model = ensure_real_sdxl(args.dtype)
    size = hashed_bytes(model)
    print(f"model: {model} ({size / 2**30:.2f} GiB of VAE and text encoder weights fingerprinted)")
    rows: dict[str, list[float]] = {"no memo (every file hashed)": [], "memo, nothing changed": [],
                                    "memo, one file touched (the VAE's weights)": []}
    with tempfile.TemporaryDirectory() as cache_home:
        os.environ["XDG_CACHE_HOME"] = cache_home  # the digest memo's folder (fingerprint._user_cache)
        memo = Path(cache_home) / "simpletuner-lcm" / "file-digests.json"
        fingerprint_seconds(model)  # the files into the page cache
        for _ in range(args.repeats):
            memo.unlink(missing_ok=True)
            seconds, *cold = fingerprint_seconds(model)
            rows["no memo (every file hashed)"].append(seconds)
            seconds, *warm = fingerprint_seconds(model)
            assert warm == cold, "the memo changed a fingerprint"
            rows["memo, nothing changed"].append(seconds)
        # Last: a touched file stays within the memo's racy window (rehashed) for 2 s after each memo written.
        touched = model / "vae" / "diffusion_pytorch_model.safetensors"
        for _ in range(args.repeats):
            os.utime(touched)
            seconds, *after = fingerprint_seconds(model)
            assert after == cold, "a touched file changed a fingerprint"
            rows["memo, one file touched (the VAE's weights)"].append(seconds)
    baseline = statistics.median(rows["no memo (every file hashed)"])
    print(f"\n| model fingerprint at a start ({args.dtype}, {size / 2**30:.2f} GiB) | seconds (median of "
          f"{args.repeats}) | no memo ÷ row |")
    print("| --- | --- | --- |")
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {baseline / median:.0f}× |")


if __name__ == "__main__":
    main()
