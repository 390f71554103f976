"""Test instrumentation for runs of the stock `simpletuner train` (tests/integration/test_trainer_data_path.py).

Put this folder on PYTHONPATH and set LCM_BATCH_RECORD to a folder: in every training interpreter, once
`simpletuner.helpers.training.trainer` has been imported, `Trainer.prepare_batch` saves the first
LCM_BATCH_RECORD_COUNT (default 8) batches it is handed, as collate produced them, to
`<folder>/rank<R>-step<S>.pt` (S = the trainer's global_step before the step): per sample the image path, the
caption, the bucket metadata SimpleTuner holds for it (aspect bucket, original, intermediary and target size, crop
coordinates), the latent, the SDXL time_ids, the prompt and pooled text embeddings. Recording happens at the one
point every data path must feed, whichever of SimpleTuner's seams it patches; the batch itself is not changed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

RECORD_ENV = "LCM_BATCH_RECORD"
COUNT_ENV = "LCM_BATCH_RECORD_COUNT"
TRIGGER_MODULE = "simpletuner.helpers.training.trainer"


def _cpu_copy(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, (list, tuple)):
        return [_cpu_copy(item) for item in value]
    return value


def _metadata(state_tracker, path: str, backend_id: str) -> dict:
    """SimpleTuner's metadata of the image, sizes as lists (as its metadata JSON holds them)."""
    found = state_tracker.get_metadata_by_filepath(path, data_backend_id=backend_id) or {}
    return {key: list(value) if isinstance(value, tuple) else value for key, value in found.items()}


def _instrument(module, folder: str, count: int) -> None:
    import torch
    from simpletuner.helpers.training.state_tracker import StateTracker

    prepare_batch = module.Trainer.prepare_batch
    recorded = []

    def recording_prepare_batch(self, batch):
        if batch and "filepaths" in batch and len(recorded) < count:
            backend_id = batch["data_backend_id"]
            record = {
                "global_step": int(self.state.get("global_step", 0)),
                "rank": int(self.accelerator.process_index),
                "num_processes": int(self.accelerator.num_processes),
                "backend_id": backend_id,
                "filepaths": list(batch["filepaths"]),
                "prompts": list(batch["prompts"]) if batch.get("prompts") is not None else None,
                "metadata": [_metadata(StateTracker, path, backend_id) for path in batch["filepaths"]],
                **{key: _cpu_copy(batch.get(key)) for key in (
                    "latent_batch", "batch_time_ids", "prompt_embeds", "add_text_embeds")},
            }
            target = os.path.join(folder, f"rank{record['rank']}-step{record['global_step']:04d}.pt")
            torch.save(record, target + ".tmp")
            os.replace(target + ".tmp", target)
            recorded.append(target)
        return prepare_batch(self, batch)

    module.Trainer.prepare_batch = recording_prepare_batch


class _InstrumentAfterImport(importlib.abc.Loader):
    def __init__(self, loader, folder: str, count: int):
        self._loader, self._folder, self._count = loader, folder, count

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader
        _instrument(module, self._folder, self._count)


class _TrainerFinder(importlib.abc.MetaPathFinder):
    def __init__(self, folder: str, count: int):
        self._folder, self._count = folder, count

    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _InstrumentAfterImport(spec.loader, self._folder, self._count)
        return spec


if os.environ.get(RECORD_ENV):
    os.makedirs(os.environ[RECORD_ENV], exist_ok=True)
    sys.meta_path.insert(0, _TrainerFinder(os.environ[RECORD_ENV], int(os.environ.get(COUNT_ENV, "8"))))
