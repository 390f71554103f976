"""Batch decode against Pillow (LANCZOS resize + crop) and SimpleTuner's own image loader."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from lcm_plugin.cache import ImageTooLargeError, decode_batch, decode_batch_bytes


def scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth synthetic photo: gradients, edges and mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack(
        [
            128 + 100 * np.sin(x / 37 + seed) * np.cos(y / 53),
            128 + 90 * np.sin((x + y) / 61),
            np.where((x // 97 + y // 71) % 2 == 0, 60.0, 190.0),
        ],
        axis=-1,
    )
    rgb += rng.normal(0, 3, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def pillow_reference(rgb: Image.Image, resize, crop, target) -> np.ndarray:
    top, left = crop
    resized = rgb.resize(resize, Image.Resampling.LANCZOS)
    return np.asarray(resized.crop((left, top, left + target[0], top + target[1])))


GEOMETRIES = [
    # (source W, H), resize (W, H), crop (top, left), target (W, H)
    ((1152, 896), (658, 512), (0, 9), (640, 512)),
    ((800, 1200), (512, 768), (64, 0), (512, 640)),
    ((640, 480), (1024, 768), (0, 0), (1024, 768)),  # upscale
    ((1600, 1200), (341, 256), (0, 21), (256, 256)),  # large reduction: JPEG DCT-domain path
    ((1000, 1000), (512, 512), (0, 0), (512, 512)),
]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_resize_and_crop_match_pillow_lanczos_above_40db(fmt, geometry):
    (w, h), resize, crop, target = geometry
    data = encode(scene(w, h), fmt, **({"quality": 92} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}))
    reference = pillow_reference(Image.open(io.BytesIO(data)).convert("RGB"), resize, crop, target)
    pixels, ok, errors = decode_batch_bytes([data], [resize], [crop], target)
    assert errors == [] and ok == [0]
    assert pixels.shape == (1, target[1], target[0], 3) and pixels.dtype == np.uint8
    assert psnr(pixels[0], reference) >= 40.0


def simpletuner_rgb(data: bytes) -> Image.Image:
    from simpletuner.helpers.image_manipulation.load import load_image

    # load_image, then TrainingSample.correct_image's convert("RGB") (which turns LA into RGB).
    return load_image(data).convert("RGB")


def mode_images():
    base = scene(320, 240, seed=3)
    grey = base.convert("L")
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    rgba = base.copy()
    rgba.putalpha(Image.fromarray((np.arange(320 * 240) % 256).reshape(240, 320).astype(np.uint8)))
    sixteen = Image.fromarray((np.asarray(grey).astype(np.uint16) * 257 + 100).astype(np.uint16))
    return {
        "grey-png": encode(grey, "PNG"),
        "grey-jpeg": encode(grey, "JPEG", quality=95),
        "palette-png": encode(palette, "PNG"),
        "rgba-png": encode(rgba, "PNG"),
        "la-png": encode(grey.convert("LA"), "PNG"),
        "16bit-png": encode(sixteen, "PNG"),
        "cmyk-jpeg": encode(base.convert("CMYK"), "JPEG", quality=95),
    }


@pytest.mark.parametrize("name", list(mode_images()))
def test_modes_convert_to_rgb_like_simpletuner(name):
    data = mode_images()[name]
    expected = simpletuner_rgb(data)
    size = expected.size
    pixels, ok, errors = decode_batch_bytes([data], [size], [(0, 0)], size)
    assert errors == [], errors
    assert psnr(pixels[0], np.asarray(expected)) >= 40.0, name


def test_exif_orientation_is_applied_like_exif_transpose():
    image = scene(300, 200, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(image, "JPEG", quality=95, exif=exif.tobytes())
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert expected.size == (200, 300)
    pixels, ok, errors = decode_batch_bytes([data], [(200, 300)], [(0, 0)], (200, 300))
    assert errors == [] and psnr(pixels[0], np.asarray(expected)) >= 40.0


def test_oriented_false_decodes_as_stored_like_simpletuners_s3_load():
    """SimpleTuner's S3 backend hands the object's bytes to its `load_image`, which keeps the stored orientation:
    `oriented=False` decodes the same pixels."""
    from simpletuner.helpers.image_manipulation.load import load_image

    image = scene(300, 200, seed=6)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(image, "JPEG", quality=95, exif=exif.tobytes())
    expected = load_image(data).convert("RGB")
    assert expected.size == (300, 200)  # as stored
    pixels, ok, errors = decode_batch_bytes([data], [(300, 200)], [(0, 0)], (300, 200), oriented=False)
    assert errors == [] and pixels.shape == (1, 200, 300, 3) and psnr(pixels[0], np.asarray(expected)) >= 40.0
    # the same bytes, oriented: a different image (transposed), so the flag is what decides
    turned, _, _ = decode_batch_bytes([data], [(200, 300)], [(0, 0)], (200, 300))
    assert turned.shape == (1, 300, 200, 3)


def test_bad_files_are_reported_per_file_and_skipped(tmp_path):
    good = encode(scene(64, 48), "PNG")
    jpeg = encode(scene(64, 48), "JPEG")
    files = {
        "good.png": good,
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "text.jpg": b"this is not an image at all",
        "corrupt.png": good[:40] + bytes(200) + good[240:],
        "good2.png": good,
    }
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    paths.append(str(tmp_path / "missing.png"))
    n = len(paths)
    pixels, ok, errors = decode_batch(paths, [(64, 48)] * n, [(0, 0)] * n, (32, 32))
    assert ok == [0, 4]
    assert pixels.shape == (2, 32, 32, 3)
    assert np.array_equal(pixels[0], pixels[1])
    failed = dict(errors)
    assert sorted(failed) == [1, 2, 3, 5]
    for i in failed:
        assert f"`{paths[i]}`" in failed[i]
    assert "not a supported image" in failed[2]


def test_decompression_bombs_are_refused_by_pixel_limit():
    data = encode(Image.new("RGB", (3000, 3000)), "PNG")
    _, ok, errors = decode_batch_bytes([data], [(64, 64)], [(0, 0)], (64, 64), names=["bomb.png"], max_pixels=1_000_000)
    assert ok == []
    assert errors == [(0, "`bomb.png` is 3000x3000 = 9000000 pixels, over the limit of 1000000 (possible decompression bomb)")]
    assert issubclass(ImageTooLargeError, Exception)
