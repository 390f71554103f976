"""Model identity in cache fingerprints: it follows exactly the files `from_pretrained` reads."""

from __future__ import annotations

import json

import pytest

from lcm_plugin.cache_build.fingerprint import IdentityError, changes, latent_fingerprint, model_identity, vae_folder


def write_vae(folder, weights=b"weights"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"scaling_factor": 0.13025, "block_out_channels": [1, 2, 3, 4]}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    return folder


def test_identity_changes_with_config_or_weights_and_ignores_what_the_loader_skips(tmp_path):
    write_vae(tmp_path / "model" / "vae")
    first = model_identity(str(tmp_path / "model"), ("vae",))
    (tmp_path / "model" / "vae" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"variant")
    (tmp_path / "model" / "vae" / "README.md").write_text("notes")
    assert model_identity(str(tmp_path / "model"), ("vae",)) == first
    write_vae(tmp_path / "model" / "vae", weights=b"weightz")
    assert model_identity(str(tmp_path / "model"), ("vae",)) != first
    write_vae(tmp_path / "model" / "vae")
    assert model_identity(str(tmp_path / "model"), ("vae",)) == first
    config = tmp_path / "model" / "vae" / "config.json"
    config.write_text(config.read_text().replace("0.13025", "0.18215"))
    assert model_identity(str(tmp_path / "model"), ("vae",)) != first


def test_the_vae_folder_is_the_one_simpletuner_loads(tmp_path):
    write_vae(tmp_path / "pipeline" / "vae")
    write_vae(tmp_path / "standalone")
    assert vae_folder(str(tmp_path / "pipeline")) == "vae" and vae_folder(str(tmp_path / "standalone")) == ""
    fingerprint = latent_fingerprint(str(tmp_path / "standalone"), "bf16", 7)
    assert fingerprint["scaling_factor"] == 0.13025 and fingerprint["shift_factor"] is None and fingerprint["seed"] == 7


def test_a_folder_without_a_model_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IdentityError, match="empty: none of vae is a folder"):
        model_identity(str(tmp_path / "empty"), ("vae",))


def test_changes_name_each_field_and_show_cache_wide_values():
    old = {"vae": "a", "vae_dtype": "bf16", "seed": 3}
    new = {"vae": "b", "vae_dtype": "fp32", "seed": 3}
    assert changes(old, new) == ["the VAE changed (its config or weights)", "vae_dtype changed: bf16 -> fp32"]
    assert changes({"content": "ab"}, {"content": "cd"}) == ["the image file's content changed"]


def test_file_digests_are_reused_only_while_the_stamps_hold(tmp_path):
    import hashlib
    import os
    import time

    from lcm_plugin.cache_build.fingerprint import FileDigests

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    settled = time.time_ns() - 10 * FileDigests.RACY_WINDOW_NS
    os.utime(weights, ns=(settled, settled))
    memo = tmp_path / "memo.json"
    first = FileDigests(memo)
    assert first.of(weights) == hashlib.sha256(b"a" * 1000).hexdigest()
    first.save()

    # Unchanged stamps: the memo's digest, no read (a poisoned memo entry would show). The memo is dated later
    # than the file's ctime (which utime set to now), as a memo written at a later start would be.
    stored = json.loads(memo.read_text())
    stored["files"][str(weights)][4] = "remembered"
    stored["written_ns"] = time.time_ns() + 10 * FileDigests.RACY_WINDOW_NS
    memo.write_text(json.dumps(stored))
    assert FileDigests(memo).of(weights) == "remembered"

    # Same size and mtime put back, other bytes: the ctime moved, so the memo is refused and the file hashed again.
    weights.write_bytes(b"b" * 1000)
    os.utime(weights, ns=(settled, settled))
    assert FileDigests(memo).of(weights) == hashlib.sha256(b"b" * 1000).hexdigest()

    # A file changed within the memo's own clock tick is never trusted.
    fresh = FileDigests(memo)
    fresh.written_ns = time.time_ns()
    fresh.known[str(weights)] = [*fresh.known.get(str(weights), [0] * 5)[:4], "racy"]
    weights.write_bytes(b"c" * 1000)
    stamp = weights.stat()
    fresh.known[str(weights)][:4] = [stamp.st_size, stamp.st_mtime_ns, stamp.st_ctime_ns, stamp.st_ino]
    assert fresh.of(weights) == hashlib.sha256(b"c" * 1000).hexdigest()
