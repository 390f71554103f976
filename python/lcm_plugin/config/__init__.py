"""Typed configuration: the `distillation_config.lcm` block, config.json and multidatabackend.json.

Pure data (pydantic only): no torch, no SimpleTuner.
"""

from lcm_plugin.config.lcm import LcmConfig

__all__ = ["LcmConfig"]
