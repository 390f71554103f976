"""Filling the stores: the plan's VAE batches decoded in Rust (the next batch on a helper thread while the VAE
encodes this one) and encoded, then its captions, putting only what the stores lack (resumable: a batch with any
latent missing is re-encoded whole, the same images giving the same latents)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lcm_plugin.cache_build.faults import fault_point
from lcm_plugin.cache_build.fingerprint import Fingerprints
from lcm_plugin.cache_build.layout import (
    LCM_DIR,
    POOLED_PROMPT_EMBEDS,
    PROMPT_EMBEDS,
    TIME_IDS,
    text_entry,
    time_ids,
)
from lcm_plugin.cache_build.plan import (
    Batch,
    BuildError,
    Dataset,
    ImageItem,
    RunSettings,
    unique_captions,
)

if TYPE_CHECKING:
    from lcm_plugin.cache_build.build import BuildOptions, BuildReport
    from lcm_plugin.cache_build.ranks import Crew
from lcm_plugin.cache_build.store import (
    latent_file,
    open_reader,
    open_writer,
    pt_done,
    put,
    write_pt,
)

TEXT_BATCH = 32  # captions per text-encoder call
# Objects of an S3 dataset requested ahead of the decoder. A request waits tens of milliseconds on a real bucket,
# and one VAE batch (SimpleTuner's default vae_batch_size is 4) would leave the build waiting on that latency.
FETCH_AHEAD_OBJECTS = 64


class FetchWindow:
    """Fetches of upcoming batches' objects, kept FETCH_AHEAD_OBJECTS objects ahead of the batch being taken.
    `sizes[i]`: the objects batch i fetches (0: none); `fetch(i)`: starts batch i's fetch, returns its future."""

    def __init__(self, sizes: list[int], fetch):
        self.sizes, self.fetch = sizes, fetch
        self.pending: dict[int, object] = {}  # batch -> its fetch's future, started and not yet taken
        self.next = 0  # batches before it have been started (or fetch nothing)

    def take(self, index: int):
        """The future of batch `index`'s objects (None when it fetches nothing), after starting the fetches the
        window has room for beyond it."""
        self.next = max(self.next, index)
        in_flight = sum(self.sizes[i] for i in self.pending)
        while self.next < len(self.sizes) and in_flight < FETCH_AHEAD_OBJECTS:
            if self.sizes[self.next]:
                self.pending[self.next] = self.fetch(self.next)
                in_flight += self.sizes[self.next]
            self.next += 1
        return self.pending.pop(index, None)


def _fetch(batch: Batch, dataset: Dataset):
    """(bytes or None per image, [(index, why)]) of `batch`'s images, read by name (an S3 dataset's objects,
    concurrently; a packed source's samples)."""
    return dataset.image_reader()([item.path for item in batch.items])


def _decode(batch: Batch, dataset: Dataset, threads: int | None, fetched=None):
    """(pixels, ok, errors) of `decode_batch` for every image of `batch`: the same images give the same batch. Images
    read by name (`fetched`: a future of `_fetch`, else read here) are decoded from memory, oriented as SimpleTuner's
    backend for the dataset orients them (an S3 object never); one that cannot be read is an error of its own."""
    from lcm_plugin.cache import decode_batch, decode_batch_bytes

    items = batch.items
    geometry = ([item.sample["resize_size"] for item in items], [item.sample["crop_coordinates"] for item in items],
                items[0].sample["target_size"])
    if dataset.image_reader() is None:
        return decode_batch([str(item.path) for item in items], *geometry, threads=threads)
    blobs, failures = _fetch(batch, dataset) if fetched is None else fetched.result()
    fetched = [i for i, blob in enumerate(blobs) if blob is not None]
    pixels, ok, errors = decode_batch_bytes(
        [blobs[i] for i in fetched], [geometry[0][i] for i in fetched], [geometry[1][i] for i in fetched], geometry[2],
        names=[items[i].path for i in fetched], threads=threads, oriented=dataset.oriented(),
    )
    errors = [(fetched[i], message) for i, message in errors]
    what = "s3 object" if dataset.remote is not None else f"{dataset.packed.kind} sample"
    errors += [(i, f"cannot read {what} {items[i].path!r}: {why}") for i, why in failures]
    return pixels, [fetched[i] for i in ok], sorted(errors)


def encode_images(
    batches: list[Batch], datasets: list[Dataset], settings: RunSettings, prints: Fingerprints,
    options: BuildOptions, rank: int, report: BuildReport, models,
) -> None:
    """Decodes batch i + 1 on a helper thread (the Rust decode releases the GIL) while the VAE encodes batch i; the
    objects of an S3 dataset's next batches are fetched further ahead (FETCH_AHEAD_OBJECTS)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from tqdm import tqdm

    from lcm_plugin.cache_build.encode import vae_memory_problem

    by_id = {d.id: d for d in datasets}
    writers = {d.id: open_writer(d.vae_cache_dir / LCM_DIR, rank, options.shard_bytes) for d in datasets}
    readers: dict[str, object] = {}
    # Per dataset, by position: whether the store held the latent and its time_ids when this began. A batch held
    # whole is not looked at image by image (a restart after a change of 1% skips 99% of the batches here).
    held = {}
    if not options.simpletuner_format:
        for dataset in datasets:
            reader = open_reader(dataset.vae_cache_dir / LCM_DIR)
            if reader is not None:
                table = dataset.images.table
                held[dataset.id] = table.held(reader.native, "") & table.held(reader.native, TIME_IDS)

    def todo(batch: Batch) -> tuple[list[ImageItem], list[ImageItem]]:
        """(items whose latent is missing, items whose latent is stored but time_ids or SimpleTuner file are not)."""
        if batch.dataset in held and held[batch.dataset][batch.positions].all():
            return [], []
        writer, dataset = writers[batch.dataset], by_id[batch.dataset]
        items = batch.items
        missing = [item for item in items if item.cache_key not in writer]

        def lacks_file(item: ImageItem) -> bool:
            if not options.simpletuner_format:
                return False
            return not pt_done(writer, item.cache_key, latent_file(dataset, item.cache_key))

        incomplete = [
            item for item in items
            if item.cache_key in writer and (item.cache_key + TIME_IDS not in writer or lacks_file(item))
        ]
        return missing, incomplete

    work = [(batch, *todo(batch)) for batch in batches]
    work = [(batch, missing, incomplete) for batch, missing, incomplete in work if missing or incomplete]
    report.reused += sum(len(b) for b in batches) - sum(len(missing) for _, missing, _ in work)
    vae = models.vae() if any(missing for _, missing, _ in work) else None
    # Why each batch with something to encode cannot be (None: it can), decided before anything is decoded.
    problems = [vae_memory_problem(vae, missing[0].sample["target_size"]) if missing else None
                for batch, missing, _ in work]
    bar = tqdm(total=sum(len(b) for b, _, _ in work), unit="img", desc=f"latents (rank {rank})",
               disable=rank != 0 or not work)
    start = time.perf_counter()
    wanted = [bool(missing) and problem is None for (_, missing, _), problem in zip(work, problems)]
    with (ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcm-decode") as decoder,
          ThreadPoolExecutor(max_workers=FETCH_AHEAD_OBJECTS, thread_name_prefix="lcm-fetch") as fetcher):
        decoding = {}
        of_work = [by_id[batch.dataset] for batch, _, _ in work]
        window = FetchWindow([len(batch) if dataset.image_reader() is not None and wanted[i] else 0
                              for i, ((batch, _, _), dataset) in enumerate(zip(work, of_work))],
                             lambda i: fetcher.submit(_fetch, work[i][0], of_work[i]))

        def decode_ahead(index: int) -> None:
            if index < len(work) and wanted[index]:
                decoding[index] = decoder.submit(_decode, work[index][0], of_work[index], options.threads,
                                                 window.take(index))

        decode_ahead(0)
        for index, (batch, missing, incomplete) in enumerate(work):
            decode_ahead(index + 1)
            dataset, writer = by_id[batch.dataset], writers[batch.dataset]
            for item in incomplete:
                if item.cache_key + TIME_IDS not in writer:
                    put(writer, item.cache_key + TIME_IDS, torch.tensor(time_ids(item.sample), dtype=torch.int64))
                path = latent_file(dataset, item.cache_key)
                if options.simpletuner_format and not pt_done(writer, item.cache_key, path):
                    if batch.dataset not in readers:
                        readers[batch.dataset] = open_reader(dataset.vae_cache_dir / LCM_DIR)
                    latent = readers[batch.dataset].get_torch(item.cache_key).clone()
                    write_pt(writer, item.cache_key, path, latent, dataset.compress_vae)
            if problems[index]:
                report.failed += [(str(item.path), problems[index]) for item in missing]
            elif missing:
                _encode_decoded(decoding.pop(index).result(), batch, dataset, writer, vae, settings, options, report)
            bar.update(len(batch))
    bar.close()
    for writer in writers.values():
        fault_point("commit")
        writer.close()
    if work:
        report.encode_seconds = time.perf_counter() - start


def _encode_decoded(decoded, batch: Batch, dataset: Dataset, writer, vae, settings: RunSettings,
                    options: BuildOptions, report: BuildReport) -> None:
    """VAE-encodes one decoded batch and puts what the store lacks (latent, time_ids, SimpleTuner file)."""
    import torch

    from lcm_plugin.cache_build.encode import encode_latents

    pixels, ok, errors = decoded
    batch_items = batch.items
    report.failed += [(str(batch_items[i].path), message) for i, message in errors]
    if not ok:
        return
    items = [batch_items[i] for i in ok]
    try:
        latents = encode_latents(vae, pixels, [item.key for item in items], settings.seed)
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not isinstance(error, torch.OutOfMemoryError) and "allocate" not in str(error):
            raise
        w, h = batch_items[0].sample["target_size"]
        report.failed += [
            (str(item.path), f"the VAE ran out of memory on its {w}x{h} target (batch of {len(items)}); "
             "leave such images out with minimum_aspect_ratio / maximum_aspect_ratio or "
             "minimum_image_size, or lower vae_batch_size")
            for item in items if item.cache_key not in writer
        ]
        return
    fault_point("encoded")
    for item, latent in zip(items, latents):
        if item.cache_key not in writer:
            put(writer, item.cache_key, latent)
            report.encoded += 1
        if item.cache_key + TIME_IDS not in writer:
            put(writer, item.cache_key + TIME_IDS, torch.tensor(time_ids(item.sample), dtype=torch.int64))
        path = latent_file(dataset, item.cache_key)
        if options.simpletuner_format and not pt_done(writer, item.cache_key, path):
            value = latent.clone(memory_format=torch.contiguous_format)  # the VAE's may be channels-last
            write_pt(writer, item.cache_key, path, value, dataset.compress_vae)


def encode_captions(
    datasets: list[Dataset], prints: Fingerprints, options: BuildOptions, crew: Crew, report: BuildReport, models,
) -> None:
    """Captions in fixed chunks of TEXT_BATCH (the r-th rank of the `crew`'s N takes chunks r, r + N, ...). A chunk
    with any caption missing is encoded whole, as latents are: an encoder's output bits can depend on the batch it
    ran in, and the same chunk gives the same embeddings after a kill, whatever the number of processes."""
    from tqdm import tqdm

    from lcm_plugin.cache_build.encode import encode_prompts
    from lcm_plugin.cache_build.simpletuner_format import text_cache_path

    compress = {d.text_cache_dir: d.compress_text for d in datasets}
    work = []  # (folder, writer, chunks with a caption to encode, captions stored but missing their SimpleTuner file)
    for folder, captions in unique_captions(datasets).items():
        writer = open_writer(folder / LCM_DIR, crew.rank, options.shard_bytes)
        chunks = [captions[start : start + TEXT_BATCH] for start in range(0, len(captions), TEXT_BATCH)]
        chunks = chunks[crew.index::crew.size]
        encode, files = [], []
        for chunk in chunks:
            keys = [text_entry(caption, prints.text_digest) for caption in chunk]
            if not all(prints.has_text(writer, key) for key in keys):
                encode.append(chunk)
            elif options.simpletuner_format:
                files += [c for c, k in zip(chunk, keys) if not pt_done(writer, k, text_cache_path(folder, c))]
        work.append((folder, writer, encode, files))
    for folder, writer, _, files in work:
        reader = open_reader(folder / LCM_DIR) if files else None
        for caption in files:
            key = text_entry(caption, prints.text_digest)
            value = {
                "prompt_embeds": reader.get_torch(key + PROMPT_EMBEDS)[None].clone(),
                "pooled_prompt_embeds": reader.get_torch(key + POOLED_PROMPT_EMBEDS).clone(),
            }
            write_pt(writer, key, text_cache_path(folder, caption), value, compress[folder])
    if any(chunks for _, _, chunks, _ in work):
        encode_caption = getattr(models, "encode_caption", None)
        tokenizers, encoders = models.text_encoders()
        bar = tqdm(total=sum(len(c) for _, _, chunks, _ in work for c in chunks), unit="caption",
                   desc=f"text (rank {crew.rank})", disable=crew.rank != 0)
        for folder, writer, chunks, _ in work:
            for chunk in chunks:
                if encode_caption is not None:
                    put_model_encoded(writer, chunk, encode_caption, prints, report)
                    bar.update(len(chunk))
                    continue
                prompt_embeds, pooled = encode_prompts(tokenizers, encoders, chunk, prints.family)
                fault_point("encoded")
                for index, (caption, embeds) in enumerate(zip(chunk, prompt_embeds)):
                    key = text_entry(caption, prints.text_digest)
                    if key + PROMPT_EMBEDS not in writer:
                        put(writer, key + PROMPT_EMBEDS, embeds)
                        report.captions += 1
                    if pooled is not None and key + POOLED_PROMPT_EMBEDS not in writer:
                        put(writer, key + POOLED_PROMPT_EMBEDS, pooled[index])
                    path = text_cache_path(folder, caption)
                    if options.simpletuner_format and not pt_done(writer, key, path):  # `cache build`: SDXL only
                        value = {"prompt_embeds": embeds[None].clone(), "pooled_prompt_embeds": pooled[index].clone()}
                        write_pt(writer, key, path, value, compress[folder])
                bar.update(len(chunk))
        bar.close()
    for _, writer, _, _ in work:
        fault_point("commit")
        writer.close()


def put_model_encoded(writer, captions: list[str], encode_caption, prints: Fingerprints, report: BuildReport) -> None:
    """Each caption's text cache dict as the trainer's SimpleTuner model encodes it (`encode_caption`), one caption
    per call as its text cache encodes them, each part stored as the dict holds it (layout.MODEL_ENCODED_FAMILIES).
    A dict whose parts are not the family's (another SimpleTuner release) stops the build: nothing is guessed."""
    import torch

    expected = {part[1:] for part in prints.text_parts}
    for caption in captions:
        key = text_entry(caption, prints.text_digest)
        encoded = encode_caption(caption)
        fault_point("encoded")
        if not (isinstance(encoded, dict) and set(encoded) == expected
                and all(isinstance(value, torch.Tensor) for value in encoded.values())):
            found = sorted(encoded) if isinstance(encoded, dict) else type(encoded).__name__
            raise BuildError(f"SimpleTuner's {prints.family} model encodes a caption as {found}, not the tensors "
                             f"{sorted(expected)} this path stores")
        if key + PROMPT_EMBEDS not in writer:
            report.captions += 1
        for part in prints.text_parts:
            if key + part not in writer:
                put(writer, key + part, encoded[part[1:]].detach().cpu().contiguous())


def load_model(loader, path: str, dtype: str, what: str):
    try:
        return loader(path, dtype)
    except (OSError, ValueError, EnvironmentError) as error:
        raise BuildError(f"cannot load the {what} from {path!r}: {str(error).splitlines()[0]}") from None


class FileModels:
    """The VAE and text encoders loaded from the run's model paths (once, when first needed)."""

    def __init__(self, settings: RunSettings):
        self.settings = settings
        self._vae = None
        self._text = None

    def vae(self):
        if self._vae is None:
            from lcm_plugin.cache_build.encode import load_vae

            self._vae = load_model(load_vae, self.settings.vae_path, self.settings.vae_dtype, what="VAE")
        return self._vae

    def text_encoders(self) -> tuple[list, list]:
        """(tokenizers, text encoders)."""
        if self._text is None:
            from lcm_plugin.cache_build.encode import load_text_encoders

            self._text = load_model(
                load_text_encoders, self.settings.model_path, self.settings.text_dtype, what="text encoders"
            )
        return self._text
