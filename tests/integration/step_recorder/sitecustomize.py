"""Test instrumentation for runs of the stock `simpletuner train` (tests/integration/test_family_matrix.py).

Put this folder on PYTHONPATH and set LCM_STEP_RECORD to a file path: in every interpreter, once
`lcm_plugin.simpletuner.distiller` has been imported, each LcmDistiller step records every UNet call made
between `prepare_batch` and `compute_distill_loss` (which network, grad mode, LoRA adapters on or off, inputs,
outputs) with the batch as the trainer handed it and the drawn guidance scales. The latest step overwrites the
file, so after a run it holds the last step (LoRA weights no longer zero there). Nothing else changes: the step
runs exactly as without the recorder.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

RECORD_ENV = "LCM_STEP_RECORD"
TRIGGER_MODULE = "lcm_plugin.simpletuner.distiller"


def _detached(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(item) for item in value)
    return value


def _adapters_enabled(unet):
    """True/False for a PEFT-wrapped UNet (all LoRA layers agree or it is an error), None without LoRA layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    states = {not layer.disable_adapters for layer in unet.modules() if isinstance(layer, BaseTunerLayer)}
    if len(states) > 1:
        raise AssertionError("LoRA layers disagree on whether adapters are enabled")
    return states.pop() if states else None


def _instrument(module, path: str) -> None:
    import torch

    cls = module.LcmDistiller
    prepare_batch, compute_distill_loss = cls.prepare_batch, cls.compute_distill_loss
    sample_guidance_scale = module.sample_guidance_scale
    step = {}

    def recording_guidance_scale(*args, **kwargs):
        step["guidance_scale"] = sample_guidance_scale(*args, **kwargs)
        return step["guidance_scale"]

    def networks(distiller) -> dict:
        return {
            role: unet
            for role, unet in (
                ("student", distiller.teacher_model.get_trained_component()),
                ("teacher_copy", distiller.teacher_unet),
                ("target_copy", distiller.target_unet),
            )
            if unet is not None
        }

    def hook_for(role):
        def hook(unet, args, kwargs, output):
            names = ("sample", "timestep", "encoder_hidden_states")
            inputs = {**dict(zip(names, args)), **{k: v for k, v in kwargs.items() if k in names}}
            step["calls"].append({
                "network": role,
                "grad_enabled": torch.is_grad_enabled(),
                "adapters_enabled": _adapters_enabled(unet),
                **_detached(inputs),
                "added_cond_kwargs": _detached(kwargs.get("added_cond_kwargs")),
                "output": _detached(output[0] if isinstance(output, tuple) else output.sample),
            })

        return hook

    def recording_prepare_batch(self, batch, model=None, state=None):
        step.clear()
        step.update(calls=[], batch=_detached({key: batch.get(key) for key in (
            "latents", "noise", "encoder_hidden_states", "added_cond_kwargs")}))
        step["handles"] = [
            unet.register_forward_hook(hook_for(role), with_kwargs=True) for role, unet in networks(self).items()
        ]
        return prepare_batch(self, batch, model, state)

    def recording_compute_distill_loss(self, prepared_batch, model_output, original_loss):
        for handle in step.pop("handles", ()):
            handle.remove()
        loss, logs = compute_distill_loss(self, prepared_batch, model_output, original_loss)
        record = {key: value for key, value in step.items()}
        record.update(
            loss=float(loss.detach()),
            num_ddim_timesteps=self.lcm_config.num_ddim_timesteps,
            prediction_type=self.prediction_type,
            full_model=self.teacher_unet is not None,
        )
        torch.save(_detached(record), path)
        return loss, logs

    module.sample_guidance_scale = recording_guidance_scale
    cls.prepare_batch = recording_prepare_batch
    cls.compute_distill_loss = recording_compute_distill_loss


class _InstrumentAfterImport(importlib.abc.Loader):
    def __init__(self, loader, path: str):
        self._loader, self._path = loader, path

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader
        _instrument(module, self._path)


class _DistillerFinder(importlib.abc.MetaPathFinder):
    def __init__(self, path: str):
        self._path = path

    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _InstrumentAfterImport(spec.loader, self._path)
        return spec


if os.environ.get(RECORD_ENV):
    sys.meta_path.insert(0, _DistillerFinder(os.environ[RECORD_ENV]))
