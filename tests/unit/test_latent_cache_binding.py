"""The binding's surface: exceptions (type and message), header scan against SimpleTuner's header-only probe,
and GIL release."""

import io
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lcm_plugin import _latent_cache
from lcm_plugin.cache import (
    BucketConfigError,
    Bucketer,
    CacheFormatError,
    CorruptShardError,
    ImageDecodeError,
    LatentCacheError,
    MissingKeyError,
    decode_batch_bytes,
    read_header,
    scan_sizes,
)


def test_exceptions_subclass_the_base_and_live_in_an_importable_module():
    import importlib

    for name in ("ImageDecodeError", "ImageTooLargeError", "BucketConfigError", "CacheFormatError",
                 "CorruptShardError", "MissingKeyError", "DuplicateKeyError", "CacheIOError", "WriterLockedError"):
        cls = getattr(_latent_cache, name)
        assert issubclass(cls, LatentCacheError) and name.endswith("Error")
        assert getattr(importlib.import_module(cls.__module__), name) is cls


def test_missing_file_raises_file_not_found_naming_it(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match=r"cannot access `.*nope\.jpg`"):
        read_header(str(path))


def test_non_image_raises_decode_error_naming_it(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello")
    with pytest.raises(ImageDecodeError) as info:
        read_header(str(path))
    assert str(info.value) == f"`{path}` is not a supported image (jpeg, png, webp, gif, bmp)"


def test_bad_bucket_setting_names_the_key():
    with pytest.raises(BucketConfigError, match=r"invalid setting `crop_style`: `face` is not one of center, centre, corner, random"):
        Bucketer({"resolution": 1024, "resolution_type": "pixel", "crop_style": "face"})
    with pytest.raises(BucketConfigError, match=r"invalid setting `resolution_type`: is required"):
        Bucketer({"resolution": 1024})


def write_images(folder):
    """Images in every scanned format, some with EXIF orientations."""
    image = Image.new("RGB", (120, 80), (200, 40, 10))
    cases = []
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")):
        for orientation in (None, 3, 6, 8):
            path = folder / f"{ext}-{orientation}.{ext}"
            kwargs = {}
            if orientation is not None:
                exif = Image.Exif()
                exif[0x0112] = orientation
                kwargs["exif"] = exif.tobytes()
            image.save(path, fmt, **kwargs)
            cases.append(path)
    for fmt, ext in (("GIF", "gif"), ("BMP", "bmp")):
        path = folder / f"plain.{ext}"
        image.save(path, fmt)
        cases.append(path)
    return cases


def test_scan_matches_simpletuner_header_probe(tmp_path):
    from simpletuner.helpers.metadata.backends.discovery import DiscoveryMetadataBackend

    paths = write_images(tmp_path)
    sizes, errors = scan_sizes([str(p) for p in paths])
    assert errors == []
    probe = SimpleNamespace(id="scan-oracle")
    for path, size in zip(paths, sizes):
        expected = DiscoveryMetadataBackend._probe_image_dimensions(probe, str(path))["original_size"]
        assert size == expected, path.name
    assert sizes[paths.index(tmp_path / "jpg-6.jpg")] == (80, 120)


def test_scan_reports_bad_files_per_index(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (5, 7)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:20])
    sizes, errors = scan_sizes([str(good), str(bad), str(tmp_path / "gone.png")])
    assert sizes == [(5, 7), None, None]
    assert [i for i, _ in errors] == [1, 2]
    assert f"`{bad}`" in errors[0][1] and "gone.png" in errors[1][1]


def test_cache_errors_have_their_types(tmp_path):
    from lcm_plugin.cache import LatentCacheReader, LatentCacheWriter

    (tmp_path / "index.x.json").write_text('{"format": "other", "format_version": 1, "writer": "x", "shards": []}')
    with pytest.raises(CacheFormatError, match="format is `other`"):
        LatentCacheReader(tmp_path)
    (tmp_path / "index.x.json").unlink()
    with LatentCacheWriter(tmp_path) as writer:
        writer.put("a", np.zeros(3, np.float32))
    reader = LatentCacheReader(tmp_path)
    with pytest.raises(MissingKeyError, match="key `b` is not in the cache"):
        reader.get("b")
    assert issubclass(CorruptShardError, LatentCacheError)


def test_decode_releases_the_gil():
    """While one thread is inside a long decode call, another keeps running Python code."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8)).save(buf, "PNG")
    blobs = [buf.getvalue()] * 40
    started, finished = threading.Event(), threading.Event()

    def work():
        started.set()
        decode_batch_bytes(blobs, [(400, 300)] * 40, [(0, 0)] * 40, (400, 300), threads=1)
        finished.set()

    worker = threading.Thread(target=work)
    worker.start()
    started.wait()
    spins = 0
    while not finished.is_set():
        spins += 1
    worker.join()
    # With the GIL held for the whole call, this loop could not run until the call returned.
    assert spins > 10_000


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
def test_forked_child_can_still_scan_and_gather(tmp_path):
    """DataLoader workers fork after the parent used the thread pool; the child must not hang."""
    import multiprocessing

    from lcm_plugin.cache import LatentCacheReader, LatentCacheWriter

    image = tmp_path / "a.png"
    Image.new("RGB", (9, 4)).save(image)
    # One shard per entry: the reader opens several shards in parallel (one would be read on the caller's thread).
    with LatentCacheWriter(tmp_path / "cache", shard_bytes=1) as writer:
        for i in range(4):
            writer.put(str(i), np.full(8, i, np.float32))
            writer.commit()
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4
    assert scan_sizes([str(image)] * 8)[0][0] == (9, 4)  # parent uses the global pool
    assert scan_sizes([str(image)] * 8, threads=2)[0][0] == (9, 4)  # and the kept pool for an explicit count
    LatentCacheReader(tmp_path / "cache").gather(["0", "1"])

    def child(queue):
        sizes, _ = scan_sizes([str(image)] * 8)
        assert scan_sizes([str(image)] * 8, threads=2)[0] == sizes
        batch = LatentCacheReader(tmp_path / "cache").gather(["3", "2"])
        queue.put((sizes[0], batch[:, 0].tolist()))

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    process.join(timeout=60)
    if process.is_alive():
        process.kill()
        pytest.fail("forked child hung in the data path")
    assert queue.get(timeout=5) == ((9, 4), [3.0, 2.0])
