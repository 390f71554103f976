"""The only module that patches SimpleTuner. `install()` and `uninstall()` are idempotent.

What install() changes, and why:
1. `DistillerFactory._create_lcm_distiller` -> builds our `LcmDistiller` from the user's
   `distillation_config.lcm` block (validated as `LcmConfig`). Upstream's imports
   `simpletuner.helpers.distillation.lcm.distiller`, a module that has never existed.
2. `DistillerFactory._method_config` accepts SimpleTuner's string form of `distillation_config`
   (a JSON or Python-literal string, or a JSON file path, read as `validate` reads it) for the "lcm"
   method; upstream returns {} for it.
3. `DistillationRegistry` entry "lcm" -> `LcmDistiller`. Collision policy: we replace upstream's
   entry on purpose (its class computes the target with the teacher and crashes on SDXL), and log it.
   Upstream's module registers itself on import, so it is imported first and cannot overwrite us later.
4. `simpletuner.helpers.distillation.lcm.distiller` becomes importable (exposes `LCMDistiller`).
5. `Trainer.init_data_backend` first runs `simpletuner-lcm validate`'s checks on config.json and
   multidatabackend.json (LCM runs only), so a bad config fails before data caching and model loading,
   not minutes later at distiller creation.
6. On hosts without an accelerator, `torch.Tensor.pin_memory` becomes a no-op: SimpleTuner's collate
   pins every latent and torch raises "Found no NVIDIA driver" there.
7. `json_file.mapping_to_cli_args` drops the `$schema` key (editor autocompletion, see docs/config.md),
   which SimpleTuner's argument parser would refuse.
"""

from __future__ import annotations

import functools
import logging
import sys
import types
from importlib.metadata import version

from pydantic import ValidationError

from lcm_plugin.config import LcmConfig
from lcm_plugin.config import training as config_training

logger = logging.getLogger("simpletuner-lcm")

TESTED_SIMPLETUNER_VERSIONS = ("4.10.1",)
METHOD = "lcm"
SUPPORTED_MODEL_TYPES = ("lora", "full")
ALIAS_MODULE = "simpletuner.helpers.distillation.lcm.distiller"

# Originals saved by install() and put back by uninstall(); None while not installed.
_saved: dict | None = None


class SimpleTunerSurfaceError(RuntimeError):
    """A SimpleTuner surface that install() patches is missing or changed shape."""


def is_installed() -> bool:
    return _saved is not None


def parse_distillation_config(raw) -> dict:
    """`distillation_config` as a dict, read exactly as `simpletuner-lcm validate` reads it (a dict, a JSON or
    Python-literal string, or a JSON file path relative to where training starts); None or "" is {}."""
    if raw is None or raw == "":
        return {}
    parsed = config_training.parse_distillation_config(raw, None)
    if isinstance(parsed, str):
        raise ValueError(f"distillation_config: expected a JSON object; {parsed}")
    return parsed


def lcm_block(distillation_config) -> dict:
    """The "lcm" block, as SimpleTuner selects it: `distillation_config["lcm"]`, or the whole config if absent."""
    block, _ = config_training.lcm_block_of(parse_distillation_config(distillation_config))
    if not isinstance(block, dict):
        raise ValueError(f"distillation_config.{METHOD}: expected a JSON object, got {block!r}")
    return block


def lcm_config_from_block(block: dict) -> LcmConfig:
    """LcmConfig from the user's block; errors name `distillation_config.lcm.<key>` and the valid range."""
    try:
        return LcmConfig.model_validate(block)
    except ValidationError as error:
        lines = [
            f"  distillation_config.{METHOD}"
            + "".join(f".{part}" for part in problem["loc"])
            + f": {problem['msg']}"
            + _hint(problem)
            for problem in error.errors()
        ]
        raise ValueError("invalid LCM settings in config.json:\n" + "\n".join(lines)) from None


def _hint(problem: dict) -> str:
    if problem["type"] == "extra_forbidden":
        return f" (valid keys: {', '.join(LcmConfig.model_fields)})"
    if problem["loc"] and problem["type"] != "missing":
        return f" (got {problem['input']!r})"
    return ""


def validate_before_model_load(trainer) -> None:
    """Checks run by the patched `Trainer.init_data_backend`, before data caching and model loading."""
    config = trainer.config
    if str(getattr(config, "distillation_method", None) or "").lower() != METHOD:
        return
    _validate_config_files(getattr(config, "data_backend_config", None))
    lcm_config_from_block(lcm_block(getattr(config, "distillation_config", None)))
    prediction_type = getattr(trainer.model, "PREDICTION_TYPE", None)
    if prediction_type is not None and prediction_type.is_flow_prediction:
        raise ValueError(
            "distillation_method 'lcm': flow-matching models are not supported yet by simpletuner-lcm "
            f"(model_family {config.model_family!r} predicts {prediction_type.value!r})."
        )
    _check_model_type(config.model_type)


def _validate_config_files(backend_path) -> None:
    """`simpletuner-lcm validate`'s checks on the running config.json and multidatabackend.json.

    Warnings are logged; errors stop the run with the same lines the CLI prints. Only JSON configs are
    checked (SimpleTuner's env/toml backends have no file our validator reads).
    """
    import os

    from simpletuner.helpers.configuration import json_file

    from lcm_plugin.config import format_problems, has_errors, validate_files

    env = os.environ.get("SIMPLETUNER_ENVIRONMENT", os.environ.get("SIMPLETUNER_ENV", os.environ.get("ENV")))
    config_path = next((path for path in json_file._candidate_json_paths(env) if path.is_file()), None)
    if config_path is None:
        logger.info("simpletuner-lcm: no config.json found (env or toml config?); skipping file validation.")
        return
    problems = validate_files(config_path, backend_path)
    if has_errors(problems):
        raise ValueError("simpletuner-lcm validate found errors:\n" + format_problems(problems))
    for line in format_problems(problems).splitlines():
        logger.warning("simpletuner-lcm validate: %s", line)


def _mapping_without_schema_key(original):
    """json_file.mapping_to_cli_args minus `$schema`, the editor hint SimpleTuner's parser would refuse."""

    @functools.wraps(original)
    def mapping_to_cli_args(mapping, *args, **kwargs):
        if isinstance(mapping, dict):
            mapping = {key: value for key, value in mapping.items() if key.lstrip("-") != "$schema"}
        return original(mapping, *args, **kwargs)

    return mapping_to_cli_args


def _create_lcm_distiller(
    teacher_model, noise_scheduler, distill_config, model_type, prediction_type, student_model=None
):
    """Replacement for DistillerFactory._create_lcm_distiller (same keyword signature)."""
    del prediction_type  # LcmDistiller reads it from the model and refuses flow matching
    _check_model_type(model_type)
    from lcm_plugin.simpletuner.distiller import LcmDistiller

    return LcmDistiller(
        teacher_model,
        student_model,
        noise_scheduler=noise_scheduler,
        config=lcm_config_from_block(distill_config),
        full_model=model_type == "full",
    )


def _check_model_type(model_type) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"distillation_method 'lcm': model_type {model_type!r} is not supported by simpletuner-lcm; "
            f"use one of {', '.join(SUPPORTED_MODEL_TYPES)}."
        )


def _method_config_accepting_strings(original):
    @functools.wraps(original)
    def method_config(method, config):
        if getattr(method, "value", method) == METHOD and isinstance(config.get("distillation_config"), str):
            config = {**config, "distillation_config": parse_distillation_config(config["distillation_config"])}
        return original(method, config)

    return staticmethod(method_config)


def _validating_init_data_backend(original):
    @functools.wraps(original)
    def init_data_backend(self, *args, **kwargs):
        validate_before_model_load(self)
        return original(self, *args, **kwargs)

    return init_data_backend


def _unpinned(self, *args, **kwargs):
    """Tensor.pin_memory on a host without an accelerator: pinning has no use there, return the tensor."""
    del args, kwargs
    return self


def _require(owner, name: str, where: str):
    if not hasattr(owner, name):
        raise SimpleTunerSurfaceError(
            f"simpletuner-lcm cannot patch SimpleTuner {_simpletuner_version()}: {where}.{name} is missing "
            f"(tested with SimpleTuner {', '.join(TESTED_SIMPLETUNER_VERSIONS)}). "
            "Set SIMPLETUNER_LCM_DISABLE=1 to run SimpleTuner without the plugin."
        )
    return getattr(owner, name)


def _import_surface(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise SimpleTunerSurfaceError(
            f"simpletuner-lcm cannot patch SimpleTuner {_simpletuner_version()}: module {module} does not import "
            f"({error}; tested with SimpleTuner {', '.join(TESTED_SIMPLETUNER_VERSIONS)}). "
            "Set SIMPLETUNER_LCM_DISABLE=1 to run SimpleTuner without the plugin."
        ) from error


def _simpletuner_version() -> str:
    try:
        return version("simpletuner")
    except Exception:  # noqa: BLE001 - a source checkout has no metadata; the seam checks still decide
        return "(unknown version)"


def _has_accelerator(torch) -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def install() -> None:
    """Patch SimpleTuner so that `distillation_method: lcm` trains our LcmDistiller. Safe to call twice."""
    global _saved
    if _saved is not None:
        return
    import torch

    installed_version = _simpletuner_version()
    if installed_version not in TESTED_SIMPLETUNER_VERSIONS:
        logger.warning(
            "simpletuner-lcm was tested with SimpleTuner %s, found %s; checking its surfaces.",
            ", ".join(TESTED_SIMPLETUNER_VERSIONS), installed_version,
        )

    # Every surface is checked before anything is changed, so a failure leaves SimpleTuner untouched.
    factory = _require(_import_surface("simpletuner.helpers.distillation.factory"), "DistillerFactory",
                       "simpletuner.helpers.distillation.factory")
    registry = _require(_import_surface("simpletuner.helpers.distillation.registry"), "DistillationRegistry",
                        "simpletuner.helpers.distillation.registry")
    base = _require(_import_surface("simpletuner.helpers.distillation.common"), "DistillationBase",
                    "simpletuner.helpers.distillation.common")
    upstream_lcm = _import_surface("simpletuner.helpers.distillation.lcm")  # registers upstream's "lcm" now
    trainer_cls = _require(_import_surface("simpletuner.helpers.training.trainer"), "Trainer",
                           "simpletuner.helpers.training.trainer")
    dataset_types = _import_surface("simpletuner.helpers.data_backend.dataset_types")
    json_file = _import_surface("simpletuner.helpers.configuration.json_file")
    if _saved is not None:  # importing the trainer fired lcm_plugin._hook, which has just installed
        return
    for owner, names, where in (
        (factory, ("_create_lcm_distiller", "_method_config"), "DistillerFactory"),
        (registry, ("register", "get", "get_metadata", "_registry", "_metadata", "_requirement_profiles"),
         "DistillationRegistry"),
        (base, ("toggle_adapter", "prepare_batch", "compute_distill_loss", "get_scheduler",
                "_init_scheduler_configs"), "DistillationBase"),
        (trainer_cls, ("init_data_backend",), "Trainer"),
        (json_file, ("mapping_to_cli_args", "_candidate_json_paths"), "simpletuner.helpers.configuration.json_file"),
        (_require(dataset_types, "DatasetType", "simpletuner.helpers.data_backend.dataset_types"), ("IMAGE",),
         "DatasetType"),
    ):
        for name in names:
            _require(owner, name, where)

    from lcm_plugin.simpletuner.distiller import LcmDistiller

    saved = {
        "create": factory.__dict__["_create_lcm_distiller"],
        "method_config": factory.__dict__["_method_config"],
        "init_data_backend": trainer_cls.__dict__["init_data_backend"],
        "registered": registry.get(METHOD),
        "metadata": registry.get_metadata(METHOD),
        "alias_attr": upstream_lcm.__dict__.get("distiller"),
        "pin_memory": None,
        "mapping_to_cli_args": json_file.mapping_to_cli_args,
    }

    factory._create_lcm_distiller = staticmethod(_create_lcm_distiller)
    factory._method_config = _method_config_accepting_strings(saved["method_config"].__func__)
    trainer_cls.init_data_backend = _validating_init_data_backend(saved["init_data_backend"])
    json_file.mapping_to_cli_args = _mapping_without_schema_key(saved["mapping_to_cli_args"])
    registry.register(
        METHOD,
        LcmDistiller,
        requires_distillation_cache=False,
        data_requirements=[[dataset_types.DatasetType.IMAGE]],
    )
    if saved["registered"] is not None and saved["registered"] is not LcmDistiller:
        logger.info(
            "simpletuner-lcm: distillation method 'lcm' now uses %s.%s (replacing SimpleTuner's %s.%s).",
            LcmDistiller.__module__, LcmDistiller.__qualname__,
            saved["registered"].__module__, saved["registered"].__qualname__,
        )
    alias = types.ModuleType(ALIAS_MODULE, "simpletuner-lcm: the LCM distiller import path the factory expects.")
    alias.LCMDistiller = LcmDistiller
    sys.modules[ALIAS_MODULE] = alias
    upstream_lcm.distiller = alias
    if not _has_accelerator(torch):
        saved["pin_memory"] = torch.Tensor.pin_memory
        torch.Tensor.pin_memory = _unpinned
    _saved = saved


def uninstall() -> None:
    """Undo install(); a no-op when not installed."""
    global _saved
    if _saved is None:
        return
    import torch
    from simpletuner.helpers.distillation import lcm as upstream_lcm
    from simpletuner.helpers.distillation.factory import DistillerFactory
    from simpletuner.helpers.distillation.registry import DistillationRegistry
    from simpletuner.helpers.configuration import json_file
    from simpletuner.helpers.training.trainer import Trainer

    saved, _saved = _saved, None
    json_file.mapping_to_cli_args = saved["mapping_to_cli_args"]
    DistillerFactory._create_lcm_distiller = saved["create"]
    DistillerFactory._method_config = saved["method_config"]
    Trainer.init_data_backend = saved["init_data_backend"]
    if saved["registered"] is not None:
        DistillationRegistry.register(METHOD, saved["registered"], **saved["metadata"])
    else:
        for table in (DistillationRegistry._registry, DistillationRegistry._metadata,
                      DistillationRegistry._requirement_profiles):
            table.pop(METHOD, None)
    sys.modules.pop(ALIAS_MODULE, None)
    if saved["alias_attr"] is None:
        upstream_lcm.__dict__.pop("distiller", None)
    else:
        upstream_lcm.distiller = saved["alias_attr"]
    if saved["pin_memory"] is not None:
        torch.Tensor.pin_memory = saved["pin_memory"]
