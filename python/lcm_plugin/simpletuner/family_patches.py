"""Model-family patch F1 (the table is in install.py's docstring)."""

from __future__ import annotations

import functools

from lcm_plugin.simpletuner.surfaces import import_surface, require



SD1X_MODEL_MODULE = "simpletuner.helpers.models.sd1x.model"
# What diffusers' own SD pipelines are given for a model folder without a safety checker.


_NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _requires_safety_components(pipeline_class) -> bool:
    import inspect

    parameters = inspect.signature(pipeline_class.__init__).parameters
    return all(
        name in parameters and parameters[name].default is inspect.Parameter.empty
        for name in ("safety_checker", "feature_extractor")
    )


def surfaces() -> dict:
    """The SimpleTuner objects F1 patches, checked (install() calls this before it changes anything)."""
    sd1x = require(import_surface(SD1X_MODEL_MODULE), "StableDiffusion1", SD1X_MODEL_MODULE)
    pipeline_classes = require(sd1x, "PIPELINE_CLASSES", "StableDiffusion1")
    return {"sd1x_pipelines": [cls for cls in dict.fromkeys(pipeline_classes.values())
                               if _requires_safety_components(cls)]}


def _init_without_safety_checker(original):
    """F1: `__init__` that supplies _NO_SAFETY_CHECKER when neither safety component is passed."""
    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)  # keeps the original signature visible to diffusers' from_pretrained
    def __init__(self, *args, **kwargs):
        passed = signature.bind_partial(self, *args, **kwargs).arguments
        if "safety_checker" not in passed and "feature_extractor" not in passed:
            kwargs = {**_NO_SAFETY_CHECKER, **kwargs}
        original(self, *args, **kwargs)

    return __init__


def patch(surfaces: dict, saved: dict) -> None:
    saved["families"] = {cls: cls.__dict__["__init__"] for cls in surfaces["sd1x_pipelines"]}
    for cls, original in saved["families"].items():
        cls.__init__ = _init_without_safety_checker(original)


def restore(saved: dict) -> None:
    for cls, original in saved["families"].items():
        cls.__init__ = original
