"""What the packed-source readers share. A packed source is a dataset whose images are inside other files on local
disk (a `type: webshart` folder's tar shards, a `type: huggingface` folder's parquet or Arrow tables), listed by the
source's own index rather than by a folder scan; `plan.PackedSource` wraps a reader (webshart_source, hf_source)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lcm_plugin.config.problems import pointer


@dataclass(frozen=True)
class SourceListing:
    """A packed source as SimpleTuner sees it, from its index, before any image is read."""

    keys: list[str]  # SimpleTuner's sample names of the images, in its list_files order
    # per key: (the containing file's size, or the member's length; the file's mtime_ns; its ctime_ns; a u64
    # mixing the file's inode and the image's place in it: `place_stamps`)
    stamps: list[tuple[int, int, int, int]]
    # per key: the (W, H) SimpleTuner's metadata backend buckets it by, as the index gives it; None: the index
    # gives none (the reader says whether SimpleTuner then sizes the image itself or never buckets it: `left_out`)
    sizes: list[tuple[int, int] | None]
    captions: dict[str, tuple[str, ...]]  # key -> its captions as SimpleTuner's prompt handler gives them
    # key -> why SimpleTuner has no caption for it: it leaves the image out of its buckets, or drops it when
    # gathering captions
    missing_captions: dict[str, str]
    left_out: dict[str, str] = field(default_factory=dict)  # key -> why SimpleTuner never buckets it
    # samples SimpleTuner buckets whose format is not one of the reader's images
    other_samples: tuple[str, ...] = ()
    unindexed: tuple[str, ...] = ()  # files of the source its discovery leaves out, such as a tar without an index


def place_stamps(inode: int, places: np.ndarray) -> np.ndarray:
    """A 64-bit value per place in a file (a member's offset, a row's number) that changes with the file's inode or
    the place (splitmix64 of both): the last field of `SourceListing.stamps`."""
    with np.errstate(over="ignore"):
        x = np.uint64(inode & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15) + places.astype(np.uint64)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def entry_block(entry: dict, index: int, file: str, kind: str, error: type[Exception]):
    """The checks every packed entry starts with: `type` is `kind`, the `kind` block (e.g. `webshart:`) is an
    object (absent or null: {}), an `id` is given, and `dataset_type` is image. Returns (at, block, dataset_id):
    `at(*parts)` names a key of entry number `index` of `file` for messages. Raises `error` naming the key."""
    at = lambda *parts: f"{file}: {pointer(index, *parts)}"  # noqa: E731
    if entry.get("type") != kind:
        raise error(f"{at('type')}: not a {kind} dataset")
    block = entry.get(kind)
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise error(f"{at(kind)}: must be an object")
    dataset_id = entry.get("id")
    if not isinstance(dataset_id, str) or not dataset_id:
        raise error(f"{at('id')}: a {kind} dataset needs an id")
    dataset_type = entry.get("dataset_type", "image")
    if dataset_type not in (None, "image"):
        raise error(f"{at('dataset_type')}: cache build reads image datasets (got {dataset_type!r})")
    return at, block, dataset_id


def caption_settings(entry: dict, at, kind: str, error: type) -> tuple[str, str | list[str] | None, bool]:
    """(caption_strategy, instance_prompt, prepend_instance_prompt) of a `type: <kind>` entry, as SimpleTuner's
    factory takes them: the kind's own strategy when none is named, or instanceprompt with a prompt; its metadata
    backend can only be the kind's own. `error` names the key (`at(key)`) of what it refuses."""
    metadata_backend = entry.get("metadata_backend")
    if metadata_backend not in (None, kind):
        raise error(f"{at('metadata_backend')}: a {kind} dataset's metadata_backend is {kind} (got {metadata_backend!r})")
    strategy = entry.get("caption_strategy") or kind  # the factory's default for the type
    if strategy not in (kind, "instanceprompt"):
        raise error(f"{at('caption_strategy')}: a {kind} dataset's caption_strategy is {kind} or instanceprompt "
                    f"(got {strategy!r})")
    instance_prompt = entry.get("instance_prompt")
    prepend = bool(entry.get("prepend_instance_prompt", False))
    if strategy == "instanceprompt":
        prompts = [instance_prompt] if isinstance(instance_prompt, str) else instance_prompt
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or not any(
                p.strip() for p in prompts):
            raise error(f"{at('instance_prompt')}: caption_strategy instanceprompt needs a prompt")
    elif prepend and instance_prompt is not None and not isinstance(instance_prompt, str):
        raise error(f"{at('instance_prompt')}: prepend_instance_prompt needs a string")
    return strategy, instance_prompt, prepend
