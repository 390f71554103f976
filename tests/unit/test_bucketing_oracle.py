"""Bucketing equals SimpleTuner 4.10.1's own header-only discovery, image for image.

Oracle: `TrainingSample(image=None, image_metadata={"original_size": ...}).prepare()` and
`MetadataBackend.meets_resolution_requirements`, run after `random.seed(seed)` with a fresh
`StateTracker.aspect_resolution_map`, exactly as `DiscoveryMetadataBackend` does per image.
"""

import random
from types import SimpleNamespace

import pytest

from lcm_plugin._latent_cache import Bucketer

from simpletuner.helpers.data_backend.dataset_types import DatasetType  # noqa: E402
from simpletuner.helpers.data_backend.factory import FactoryRegistry  # noqa: E402
from simpletuner.helpers.image_manipulation.training_sample import TrainingSample  # noqa: E402
from simpletuner.helpers.metadata.backends.base import MetadataBackend  # noqa: E402
from simpletuner.helpers.training.state_tracker import StateTracker  # noqa: E402

BACKEND_ID = "lcm-oracle"


def random_config(rng: random.Random) -> dict:
    kind = rng.choice(["pixel", "area", "pixel_area"])
    config = {
        "resolution_type": kind,
        "resolution": {
            "pixel": rng.choice([256, 512, 768, 1024, 1000]),
            "area": rng.choice([0.25, 0.5, 1.0, 0.7, 0.3, 2.0]),
            "pixel_area": rng.choice([512, 640, 1024]),
        }[kind],
        "crop": rng.random() < 0.7,
        "crop_aspect": rng.choice(["square", "preserve", "closest", "random"]),
        "crop_style": rng.choice(["center", "centre", "corner", "random"]),
        "aspect_bucket_alignment": rng.choice([64, 64, 32, 8]),
        "aspect_bucket_rounding": rng.choice([2, 2, 1, 3]),
    }
    if config["crop_aspect"] in ("closest", "random"):
        if rng.random() < 0.5:
            config["crop_aspect_buckets"] = rng.sample([0.5, 0.75, 1.0, 1.33, 1.5, 1.78, 0.67], rng.randint(1, 5))
        else:
            config["crop_aspect_buckets"] = [
                {"aspect": 0.75, "weight": 0.5},
                {"aspect": 1.0, "weight": 0.25},
                {"aspect": 1.5, "weight": 0.25},
            ]
    if rng.random() < 0.4:
        config["minimum_image_size"] = {"pixel": 400, "area": 0.2, "pixel_area": 448}[kind]
    if rng.random() < 0.4:
        config["maximum_image_size"] = {"pixel": 2048, "area": 2.0, "pixel_area": 1536}[kind]
        config["target_downsample_size"] = {"pixel": 1280, "area": 1.5, "pixel_area": 1280}[kind]
    return config


def random_sizes(rng: random.Random, n: int) -> list[tuple[int, int]]:
    sizes = []
    for _ in range(n):
        pick = rng.random()
        if pick < 0.15:
            edge = rng.randint(32, 4096)
            sizes.append((edge, edge))
        elif pick < 0.3:  # common camera/phone geometries, both orientations
            w, h = rng.choice([(4032, 3024), (1920, 1080), (1152, 896), (1216, 832), (3000, 2000), (1024, 1536)])
            sizes.append((w, h) if rng.random() < 0.5 else (h, w))
        else:
            sizes.append((rng.randint(16, 6000), rng.randint(16, 6000)))
    return sizes


def simpletuner_buckets(config: dict, sizes, seed: int) -> list:
    backend = {k: v for k, v in config.items() if not k.startswith("aspect_bucket_")}
    fake_factory = SimpleNamespace(args=SimpleNamespace(resolution_type="pixel", resolution=1024))
    FactoryRegistry._handle_resolution_conversion(fake_factory, backend)
    StateTracker.set_args(
        SimpleNamespace(
            aspect_bucket_alignment=config["aspect_bucket_alignment"],
            aspect_bucket_rounding=config["aspect_bucket_rounding"],
        )
    )
    StateTracker.set_data_backend_config(BACKEND_ID, backend)
    StateTracker.aspect_resolution_map = {}
    metadata_backend = SimpleNamespace(
        id=BACKEND_ID,
        dataset_config=backend,
        dataset_type=DatasetType.IMAGE,
        minimum_image_size=float(backend["minimum_image_size"]) if backend.get("minimum_image_size") else None,
        resolution_type=backend["resolution_type"],
        minimum_num_frames=None,
        maximum_num_frames=None,
    )
    random.seed(seed)
    out = []
    for w, h in sizes:
        metadata = {"original_size": (w, h)}
        if not MetadataBackend.meets_resolution_requirements(metadata_backend, image_metadata=metadata):
            out.append(None)
            continue
        try:
            sample = TrainingSample(image=None, data_backend_id=BACKEND_ID, image_metadata=metadata, model=None).prepare()
        except ZeroDivisionError:  # SimpleTuner's discovery logs and skips such an image
            out.append(None)
            continue
        out.append(
            {
                "bucket": str(sample.aspect_ratio),
                "intermediary_size": tuple(sample.intermediary_size),
                "target_size": tuple(sample.target_size),
                "crop_coordinates": tuple(sample.crop_coordinates),
            }
        )
    return out


def ours(config: dict, sizes, seed: int) -> list:
    keys = ("bucket", "intermediary_size", "target_size", "crop_coordinates")
    return [None if s is None else {k: s[k] for k in keys} for s in Bucketer(config, seed=seed).assign(sizes)]


@pytest.fixture
def quiet_state_tracker(monkeypatch):
    # The area-mode memo is persisted to args.output_dir by SimpleTuner; keep it in memory only.
    monkeypatch.setattr(StateTracker, "_save_to_disk", classmethod(lambda cls, name, data: None))
    monkeypatch.setattr(StateTracker, "aspect_resolution_map", {})
    monkeypatch.setattr(StateTracker, "args", None)
    yield


def test_bucketing_matches_simpletuner_on_12000_random_images(quiet_state_tracker):
    rng = random.Random(20241126)
    compared = 0
    for case in range(60):
        config = random_config(rng)
        sizes = random_sizes(rng, 200)
        seed = rng.randint(0, 2**40)
        expected = simpletuner_buckets(config, sizes, seed)
        got = ours(config, sizes, seed)
        for size, e, g in zip(sizes, expected, got):
            assert g == e, f"case {case} config={config} size={size}: ours {g} != SimpleTuner {e}"
        compared += len(sizes)
    assert compared >= 10_000


def test_resize_size_is_the_intermediary_size_without_downsampling():
    samples = Bucketer({"resolution": 1024, "resolution_type": "pixel", "crop": True, "crop_aspect": "preserve"}).assign(
        [(4032, 3024), (800, 1200)]
    )
    for s in samples:
        assert s["resize_size"] == s["intermediary_size"]
        top, left = s["crop_coordinates"]
        assert top + s["target_size"][1] <= s["resize_size"][1]
        assert left + s["target_size"][0] <= s["resize_size"][0]
