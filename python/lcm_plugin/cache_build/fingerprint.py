"""What determines a cache entry, recorded so that a cache never serves what the current config would not produce.

Two levels:
- a **fingerprint** per cache: for latents the recipe format, the store format, the VAE's identity (a hash of
  its config and weight files), `vae_dtype`, `scaling_factor`/`shift_factor` and `seed`; for text embeddings the
  recipe format, the text encoders' and tokenizers' identity and their dtype. It is written in manifest.json
  and compared at build and at read (`simpletuner-lcm cache verify`).
- a **recipe** per latent: the fingerprint's digest plus what the bucketer decided for that image (original,
  resize and target sizes, crop coordinates) and the hash of the image file's bytes. Its
  digest is part of the entry's key in the store (`<image key>@<digest>`), and a caption's embeddings are
  stored under `<md5(caption)>@<text fingerprint digest>`. A changed setting therefore changes the key: the
  store is append-only, and a key can only ever hold what its recipe produces. A rebuild finds which keys are
  missing and encodes exactly those.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from lcm_plugin.cache_build.layout import TEXT_PARTS
from lcm_plugin.cache_build.plan import BuildError, Dataset, ImageItem, RunSettings

# Bump when the pixels or the encoding change for the same inputs (decode, resize, normalisation, sampling).
RECIPE_VERSION = 1
# Files a diffusers / transformers `from_pretrained` without `variant` reads: configs, tokenizer files and the
# plain (not `.fp16.`) weights, sharded or not.
_WEIGHTS = re.compile(r"^(diffusion_pytorch_model|model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")
_CHUNK = 1 << 24


def digest(value) -> str:
    """16 hex digits (64 bits) of sha256 over the canonical JSON of `value`."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


class IdentityError(Exception):
    """A model folder or hub id whose files cannot be found or read."""


def _hash_folder(folder: Path, weights: bool, digests: FileDigests) -> str:
    """sha256 over (name, sha256 of the bytes) of the files a loader reads in `folder`."""
    names = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and (p.suffix in (".json", ".txt", ".model") or (weights and _WEIGHTS.match(p.name)))
    )
    if "config.json" not in names and weights:
        raise IdentityError(f"{folder}: no config.json")
    hasher = hashlib.sha256()
    for name in names:
        hasher.update(name.encode() + b"\0" + digests.of(folder / name).encode() + b"\0")
    return hasher.hexdigest()


class FileDigests:
    """sha256 of files, remembered per user across runs while a file's stamps (size, mtime, ctime, inode) are
    unchanged: SDXL's VAE and text encoders weigh gigabytes, seconds per start per rank to hash. A file whose
    mtime or ctime is within `RACY_WINDOW_NS` of the memo's writing may have changed without a new stamp and is
    hashed again."""

    RACY_WINDOW_NS = 2_000_000_000
    VERSION = 1

    def __init__(self, memo: Path | None = None):
        self.memo = memo or _user_cache() / "file-digests.json"
        self.known: dict[str, list] = {}
        self.written_ns = 0
        self.changed = False
        try:
            stored = json.loads(self.memo.read_text())
            if stored.get("version") == self.VERSION:
                self.known, self.written_ns = dict(stored["files"]), int(stored["written_ns"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # no memo, or one we cannot trust: hash everything

    def of(self, path: Path) -> str:
        path = Path(os.path.abspath(path))
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        known = self.known.get(str(path))
        settled = max(stat.st_mtime_ns, stat.st_ctime_ns) < self.written_ns - self.RACY_WINDOW_NS
        if known is not None and known[:4] == stamp and settled:
            return known[4]
        hasher = hashlib.sha256()
        with open(path, "rb") as file:
            while chunk := file.read(_CHUNK):
                hasher.update(chunk)
        self.known[str(path)] = stamp + [hasher.hexdigest()]
        self.changed = True
        return hasher.hexdigest()

    def save(self) -> None:
        """Writes the memo (atomically) if anything was hashed; a memo that cannot be written is skipped."""
        if not self.changed:
            return
        record = {"version": self.VERSION, "written_ns": time.time_ns(), "files": self.known}
        temporary = self.memo.with_name(f"{self.memo.name}.{os.getpid()}.tmp")
        try:
            self.memo.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(record))
            os.replace(temporary, self.memo)
        except OSError:
            temporary.unlink(missing_ok=True)


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "simpletuner-lcm"


def _snapshot(repo: str, subfolders: tuple[str, ...]) -> Path:
    """The local snapshot folder of hub model `repo` holding `subfolders` (downloaded if allowed and missing)."""
    from huggingface_hub import snapshot_download

    try:  # configs only: the identity of a hub model is its revision
        patterns = [f"{sub}/*.json" if sub else "*.json" for sub in subfolders]
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as error:  # every hub failure (offline, unknown repo, network) means: cannot identify it
        raise IdentityError(f"{repo!r}: not a local folder, and the hub says: {str(error).splitlines()[0]}") from None


def model_identity(path: str, subfolders: tuple[str, ...], digests: FileDigests | None = None) -> str:
    """Identity of the model parts at `path` (a folder, or a hub id): a hash of the files `from_pretrained` reads
    in each subfolder ("" = the folder itself; a missing subfolder is skipped), or, for a hub id, its revision."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        snapshot = _snapshot(path, subfolders)
        return f"{path}@{snapshot.name}"
    digests = digests or FileDigests()
    parts = []
    for sub in subfolders:
        where = folder / sub if sub else folder
        if where.is_dir():
            try:
                parts.append(f"{sub}:{_hash_folder(where, not sub.startswith('tokenizer'), digests)}")
            except OSError as error:
                raise IdentityError(f"{where}: {error.strerror or error}") from None
    digests.save()
    if not parts:
        raise IdentityError(f"{folder}: none of {', '.join(s or '.' for s in subfolders)} is a folder")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def vae_folder(vae_path: str) -> str:
    """The subfolder `load_vae` reads: `vae` when it exists, else the folder itself (SimpleTuner's fallback)."""
    folder = Path(vae_path).expanduser()
    if folder.is_dir():
        return "vae" if (folder / "vae" / "config.json").is_file() else ""
    return "vae"


def vae_config(vae_path: str) -> dict:
    """The VAE's config.json (local folder or cached hub snapshot)."""
    folder = Path(vae_path).expanduser()
    if not folder.is_dir():
        folder = _snapshot(vae_path, ("vae", ""))  # SimpleTuner's default SDXL VAE keeps its config at the root
    sub = vae_folder(str(folder))
    try:
        return json.loads(((folder / sub) if sub else folder).joinpath("config.json").read_text())
    except (OSError, ValueError) as error:
        raise IdentityError(f"{folder}: unreadable VAE config.json ({error})") from None


def latent_fingerprint(vae_path: str, vae_dtype: str, seed: int) -> dict:
    """Everything shared by all latents of a cache that determines their values."""
    from lcm_plugin.cache import FORMAT_VERSION

    config = vae_config(vae_path)
    return {
        "recipe_version": RECIPE_VERSION,
        "store_format_version": FORMAT_VERSION,
        "vae": model_identity(vae_path, (vae_folder(vae_path),)),
        "vae_dtype": vae_dtype,
        "scaling_factor": config.get("scaling_factor", 0.18215),  # diffusers' AutoencoderKL default
        "shift_factor": config.get("shift_factor"),
        "seed": seed,
    }


def latent_geometry(vae_path: str, vae_dtype: str) -> tuple[int, int, str]:
    """(latent channels, pixel-to-latent factor, stored dtype) of the VAE: the shape every latent must have."""
    config = vae_config(vae_path)
    factor = 2 ** (len(config.get("block_out_channels", (64,))) - 1)
    return int(config.get("latent_channels", 4)), factor, "F32" if vae_dtype == "fp32" else "BF16"


# Every subfolder a family's text encoders and tokenizers load from (absent ones are skipped: SDXL has no third).
TEXT_SUBFOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


def text_fingerprint(model_path: str, text_dtype: str, text_options: tuple = ()) -> dict:
    """Everything shared by all text embeddings of a cache that determines their values (the caption is the key).
    `text_options`: (name, value) pairs of the trainer's settings that its model's encoder reads (RunSettings); its
    `text_encoder_paths` are models other than `model_path` that text encoders load from (AuraFlow's)."""
    fingerprint = {
        "recipe_version": RECIPE_VERSION,
        "text_encoders": model_identity(model_path, TEXT_SUBFOLDERS),
        "text_dtype": text_dtype,
    }
    if text_options:  # absent for the families encoded here: their caches keep the digests they were written with
        options = dict(text_options)
        options["text_encoder_paths"] = {path: model_identity(path, TEXT_SUBFOLDERS)
                                         for path in options.get("text_encoder_paths", ())}
        fingerprint["text_options"] = options
    return fingerprint


def latent_recipe(fingerprint_digest: str, sample: dict, content: str) -> dict:
    """What one latent is a function of: the cache fingerprint, the bucketer's geometry and the image's bytes (their
    hash: a copied or touched file keeps its latents, an edited one does not)."""
    return {
        "fingerprint": fingerprint_digest,
        "content": content,
        "original_size": list(sample["original_size"]),
        "intermediary_size": list(sample["intermediary_size"]),
        "crop_coordinates": list(sample["crop_coordinates"]),
        "target_size": list(sample["target_size"]),
    }


# Recipe and fingerprint fields, as a rebuild names them when they changed.
_WHY = {
    "recipe_version": "the cache recipe version changed (a newer simpletuner-lcm encodes differently)",
    "store_format_version": "the cache store format changed",
    "vae": "the VAE changed (its config or weights)",
    "vae_dtype": "vae_dtype changed",
    "scaling_factor": "the VAE scaling_factor changed",
    "shift_factor": "the VAE shift_factor changed",
    "seed": "seed changed",
    "text_encoders": "the text encoders or tokenizers changed",
    "text_dtype": "the text encoder dtype (mixed_precision) changed",
    "text_options": "the text encoders' settings (SimpleTuner's version, t5_padding, tokenizer_max_length, "
                    "quantisation) changed",
    "content": "the image file's content changed",
    "original_size": "the image size changed",
    "target_size": "the target size changed (resolution settings)",
    "intermediary_size": "the resize size changed (resolution settings)",
    "crop_coordinates": "the crop changed (crop settings or seed)",
}


_SHOWN = ("recipe_version", "store_format_version", "vae_dtype", "scaling_factor", "shift_factor", "seed", "text_dtype")


def changes(old: dict, new: dict) -> list[str]:
    """Human reasons for the fields that differ between two fingerprints or recipes, with old -> new values for
    the cache-wide settings (per-image values would make one reason per image)."""
    reasons = []
    for name in _WHY:
        if name in old or name in new:
            before, after = old.get(name), new.get(name)
            if before != after:
                shown = name in _SHOWN
                reasons.append(_WHY[name] + (f": {before} -> {after}" if shown else ""))
    return reasons


@dataclass(frozen=True)
class Fingerprints:
    """The run's cache fingerprints (fingerprint.py) and their digests, which name the entries."""

    latent: dict
    latent_digest: str
    text: dict
    text_digest: str
    latent_shape: tuple[int, int, str]  # (channels, pixel-to-latent factor, stored dtype)
    family: str  # the run's model_family: what its text embeddings are (TEXT_PARTS)

    @property
    def text_parts(self) -> tuple[str, ...]:
        return TEXT_PARTS[self.family]

    def has_text(self, store, key: str) -> bool:
        """Whether `store` (a reader, writer or key set) holds every part of the caption entry `key`."""
        return store is not None and all(key + part in store for part in self.text_parts)


def fingerprints(settings: RunSettings) -> Fingerprints:
    from lcm_plugin.cache_build.fingerprint import (
        IdentityError,
        digest,
        latent_fingerprint,
        latent_geometry,
        text_fingerprint,
    )

    try:
        latent = latent_fingerprint(settings.vae_path, settings.vae_dtype, settings.seed)
        text = text_fingerprint(settings.model_path, settings.text_dtype, settings.text_options)
        shape = latent_geometry(settings.vae_path, settings.vae_dtype)
    except IdentityError as error:
        raise BuildError(f"cannot identify the models of {settings.config_path}: {error}") from None
    return Fingerprints(latent, digest(latent), text, digest(text), shape, settings.model_family)


def name_entries(datasets: list[Dataset], prints: Fingerprints) -> None:
    """Give every image its store key, `<key>@<first 16 hex digits of digest(latent_recipe(...))>` (named in Rust,
    from the same canonical JSON: plan.rs `recipe_digest`)."""
    for dataset in datasets:
        dataset.images.table.name(prints.latent_digest)


def recipe_of(item: ImageItem, prints: Fingerprints) -> dict:
    """What `item`'s latent is a function of (its key's digest names it)."""
    from lcm_plugin.cache_build.fingerprint import latent_recipe

    return latent_recipe(prints.latent_digest, item.sample, item.content)
