"""Sampler patch S1 (the table is in install.py's docstring)."""

from __future__ import annotations

import functools

from lcm_plugin.simpletuner.surfaces import import_surface, require

SAMPLER_MODULE = "simpletuner.helpers.multiaspect.sampler"


def surfaces() -> dict:
    """The SimpleTuner object S1 patches, checked (install() calls this before it changes anything)."""
    sampler = require(import_surface(SAMPLER_MODULE), "MultiAspectSampler", SAMPLER_MODULE)
    require(sampler, "_sample_path", "MultiAspectSampler")
    return {"sampler": sampler}


def _object_keys_kept(original):
    """S1: an S3 dataset's sample is named by its object key, which already holds the key prefix."""

    @functools.wraps(original)
    def _sample_path(self, image):
        if getattr(getattr(self, "data_backend", None), "type", None) == "aws":
            return image
        return original(self, image)

    return _sample_path


def patch(surfaces: dict, saved: dict) -> None:
    sampler = surfaces["sampler"]
    saved["sampler"] = (sampler, sampler.__dict__["_sample_path"])
    sampler._sample_path = _object_keys_kept(saved["sampler"][1])


def restore(saved: dict) -> None:
    sampler, original = saved["sampler"]
    sampler._sample_path = original
