"""Typed configuration: the `distillation_config.lcm` block, config.json and multidatabackend.json.

Pure data (pydantic only): no torch, no SimpleTuner. SimpleTuner's own keys come from a catalogue
generated from its argument parser when schemas are built (`simpletuner-lcm schema --write`).
"""

from lcm_plugin.config.lcm import LcmConfig
from lcm_plugin.config.problems import Problem, format_problems, has_errors
from lcm_plugin.config.run import validate_backend_file, validate_files, validate_run

__all__ = [
    "LcmConfig",
    "Problem",
    "format_problems",
    "has_errors",
    "validate_backend_file",
    "validate_files",
    "validate_run",
]
