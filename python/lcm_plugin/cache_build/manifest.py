"""What a build records beside each latent store: the manifest (per image its key, recipe, bucket, time_ids and
captions, one entry per line) and the completion record a restart with the same plan trusts."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from itertools import chain
from pathlib import Path

from lcm_plugin.cache_build.fingerprint import Fingerprints, recipe_of
from lcm_plugin.cache_build.layout import (
    LCM_DIR,
    MANIFEST,
    MANIFEST_VERSION,
    text_entry,
    time_ids,
)
from lcm_plugin.cache_build.plan import (
    Dataset,
    ImageItem,
)


def _completion_path(dataset: Dataset) -> Path:
    return dataset.vae_cache_dir / LCM_DIR / f"complete.{hashlib.sha256(dataset.id.encode()).hexdigest()[:16]}.json"


def write_completion(dataset: Dataset, plan: str, failed: dict[str, str]) -> None:
    """Records that the plan with digest `plan` (ranks.plan_summary: every dataset's keys and captions, the
    fingerprints) is complete in the stores: the next start with the same plan skips the checks and encoding."""
    from lcm_plugin.cache_build.simpletuner_format import write_atomic

    mine = [(item.path, failed[item.path]) for item in dataset.images.at(dataset.images.positions_of(failed))]
    record = {"format_version": MANIFEST_VERSION, "plan": plan, "failed": mine}
    write_atomic(_completion_path(dataset), json.dumps(record).encode())


def read_completion(dataset: Dataset) -> dict | None:
    try:
        record = json.loads(_completion_path(dataset).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format_version") != MANIFEST_VERSION:
        return None
    return record


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a latent cache folder, None when absent or not one we can read."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format_version") == MANIFEST_VERSION else None


_IMAGE_ENTRY = '{"image": '


def read_manifest_entries(folder: Path, images: set[str]) -> tuple[dict | None, dict[str, dict]]:
    """(the manifest's fields but its image lists, {image key: its entry} for the keys in `images`), read line by line
    (`write_manifest` puts one entry per line): a restart that changed a few images of millions parses a few entries.
    (None, {}) when there is no readable manifest."""
    head, entries = None, {}
    decoder = json.JSONDecoder()
    try:
        with open(folder / MANIFEST, encoding="utf-8") as lines:
            head = json.loads(next(lines).rstrip().removesuffix(",") + "}")
            if not isinstance(head, dict) or head.get("format_version") != MANIFEST_VERSION:
                return None, {}
            for line in lines:
                if line.startswith("]"):
                    break  # the end of "images"; "failed" follows
                if not line.startswith(_IMAGE_ENTRY):
                    continue
                image, _ = decoder.raw_decode(line, len(_IMAGE_ENTRY))
                if image in images:
                    entries[image] = json.loads(line.rstrip().removesuffix(","))
    except (OSError, ValueError, StopIteration):
        return None, {}
    return head, entries


def write_manifest(dataset: Dataset, items: Iterable[ImageItem], prints: Fingerprints, failed: dict[str, str]) -> None:
    """<cache_dir_vae>/lcm/manifest.json: the fingerprints, the settings, per image its latent key (with the
    recipe that names it), bucket, time_ids and caption keys, and the planned images that could not be encoded
    (`failed`: path -> reason). A reader takes keys from here after checking them against its own config
    (`check_run`, which `simpletuner-lcm cache verify RUN` runs).

    Written entry by entry, one per line (`read_manifest_entries` relies on it): first line the other fields, then
    `"images": [`, the entries, `],`, `"failed": [`, its entries, `]}`."""
    from lcm_plugin.cache_build.simpletuner_format import write_atomic_parts

    head = {
        "format": "simpletuner-lcm-manifest",
        "format_version": MANIFEST_VERSION,
        "dataset": dataset.id,
        "instance_data_dir": str(dataset.remote or dataset.data_dir),
        "text_cache": str(dataset.text_cache_dir / LCM_DIR),
        "fingerprint": prints.latent,
        "text_fingerprint": prints.text,
        "settings": {
            "bucket": dataset.bucket_config,
            "minimum_aspect_ratio": dataset.minimum_aspect_ratio,
            "maximum_aspect_ratio": dataset.maximum_aspect_ratio,
            "caption_strategy": dataset.caption_strategy,
            "instance_prompt": dataset.instance_prompt,
            "prepend_instance_prompt": dataset.prepend_instance_prompt,
        },
    }
    images = (
        {
            "image": item.key,
            "key": item.cache_key,
            "recipe": recipe_of(item, prints),
            "bucket": item.sample["bucket"],
            "time_ids": time_ids(item.sample),
            "captions": [text_entry(caption, prints.text_digest) for caption in item.captions],
        }
        for item in items
    )
    failures = (
        {"image": item.key, "key": item.cache_key, "recipe": recipe_of(item, prints), "reason": failed[item.path]}
        for item in dataset.images.at(dataset.images.positions_of(failed))
    )

    def listed(entries):
        for number, entry in enumerate(entries):
            yield ("" if number == 0 else ",\n") + json.dumps(entry)

    write_atomic_parts(dataset.vae_cache_dir / LCM_DIR / MANIFEST, chain(
        (json.dumps(head)[:-1] + ",\n", '"images": [\n'), listed(images), ('\n],\n', '"failed": [\n'),
        listed(failures), ("\n]}\n",),
    ))
