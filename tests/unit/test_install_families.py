"""install.py F1: SimpleTuner's SD 1.x pipeline builds from loaded components without a safety checker.

Upstream's `_load_pipeline(load_base_model=False)` (text-embedding caching) calls the SD 1.x pipeline class with
the model's components and no safety_checker / feature_extractor; without F1 that is a TypeError.
"""

from __future__ import annotations

import inspect

import pytest
from diffusers import StableDiffusionPipeline

from lcm_plugin.simpletuner import install as installer
from lcm_plugin.tiny_sd import save_tiny_sd1


@pytest.fixture(scope="module")
def sd1x_pipeline_class():
    installer.install()  # imports SimpleTuner's trainer (which fires the .pth hook) with a known end state
    installer.uninstall()
    from simpletuner.helpers.models.common import PipelineTypes
    from simpletuner.helpers.models.sd1x.model import StableDiffusion1

    yield StableDiffusion1.PIPELINE_CLASSES[PipelineTypes.TEXT2IMG]
    installer.uninstall()


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """What `_load_pipeline(load_base_model=False)` passes: the model's components, no safety components."""
    folder = save_tiny_sd1(tmp_path_factory.mktemp("tiny-sd1"))
    loaded = StableDiffusionPipeline.from_pretrained(str(folder)).components
    return folder, {k: v for k, v in loaded.items() if k not in ("safety_checker", "feature_extractor", "image_encoder")}


def test_sd1x_pipeline_builds_without_safety_components_only_while_installed(sd1x_pipeline_class, components):
    folder, parts = components
    original_init = sd1x_pipeline_class.__dict__["__init__"]
    with pytest.raises(TypeError, match="safety_checker"):
        sd1x_pipeline_class(**parts)  # SimpleTuner 4.10.1 as shipped

    installer.install()
    try:
        pipeline = sd1x_pipeline_class(**parts)
        assert pipeline.safety_checker is None and pipeline.feature_extractor is None
        assert pipeline.config.requires_safety_checker is False
        prompt_embeds, _ = pipeline.encode_prompt("red circle", "cpu", 1, do_classifier_free_guidance=False)
        assert prompt_embeds.shape == (1, 77, parts["text_encoder"].config.hidden_size)
        # diffusers' from_pretrained reads the signature: it must still see the two required components.
        parameters = inspect.signature(sd1x_pipeline_class.__init__).parameters
        assert parameters["safety_checker"].default is inspect.Parameter.empty
        assert sd1x_pipeline_class.from_pretrained(str(folder)).safety_checker is None
        # A caller that passes the components keeps full control.
        explicit = sd1x_pipeline_class(**parts, safety_checker=None, feature_extractor=None)
        assert explicit.config.requires_safety_checker is True
    finally:
        installer.uninstall()
    assert sd1x_pipeline_class.__dict__["__init__"] is original_init
