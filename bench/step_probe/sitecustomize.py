"""Benchmark instrumentation for runs of the stock `simpletuner train` (bench/sdxl_real_size.py, bench/gpu_check.py).

Put this folder on PYTHONPATH and set LCM_STEP_PROBE to a file path: in every interpreter that imports
`lcm_plugin.simpletuner.distiller`, each training step appends one JSON line {"step", "seconds", "cpu_seconds",
"peak_bytes", "rank"}: wall and process CPU seconds from the distiller's `prepare_batch` (the step's first call into
the plugin) to its `post_training_step` (after SimpleTuner's optimizer step), and the peak memory in between
(peak_memory.py). Each LCM quality check (lcm_plugin.quality_check.QualityCheck.run) appends {"event":
"quality_check", "seconds", "peak_bytes"}. Nothing else changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time

PROBE_ENV = "LCM_STEP_PROBE"


def _instrument_distiller(module, path: str) -> None:
    from peak_memory import append_record, peak_bytes, reset_peak

    cls = module.LcmDistiller
    prepare_batch, post_training_step = cls.prepare_batch, cls.post_training_step
    current = {"step": 0}

    def probed_prepare_batch(self, batch, model=None, state=None):
        device = batch["latents"].device
        reset_peak(device)
        current.update(step=current["step"] + 1, device=device, started=time.perf_counter(),
                       cpu_started=time.process_time())
        return prepare_batch(self, batch, model, state)

    def probed_post_training_step(self, model, step):
        result = post_training_step(self, model, step)
        if "started" in current:
            peak = peak_bytes(current["device"])
            append_record(path, {"event": "step", "step": current["step"],
                                 "seconds": time.perf_counter() - current.pop("started"),
                                 "cpu_seconds": time.process_time() - current.pop("cpu_started"), "peak_bytes": peak})
        return result

    cls.prepare_batch, cls.post_training_step = probed_prepare_batch, probed_post_training_step


def _instrument_quality_check(module, path: str) -> None:
    import torch
    from peak_memory import append_record, peak_bytes, reset_peak

    run = module.QualityCheck.run

    def probed_run(self, sample, *, step):
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        reset_peak(device)
        started = time.perf_counter()
        report = run(self, sample, step=step)
        append_record(path, {"event": "quality_check", "step": step, "seconds": time.perf_counter() - started,
                             "peak_bytes": peak_bytes(device)})
        return report

    module.QualityCheck.run = probed_run


INSTRUMENTS = {
    "lcm_plugin.simpletuner.distiller": _instrument_distiller,
    "lcm_plugin.quality_check": _instrument_quality_check,
}


class _InstrumentAfterImport(importlib.abc.Loader):
    def __init__(self, loader, instrument, path: str):
        self._loader, self._instrument, self._path = loader, instrument, path

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._instrument(module, self._path)


class _ProbeFinder(importlib.abc.MetaPathFinder):
    """Instruments each module of INSTRUMENTS right after its first import, then leaves the import system."""

    def __init__(self, path: str):
        self._path, self._pending = path, dict(INSTRUMENTS)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self._pending:
            return None
        instrument = self._pending.pop(fullname)
        sys.meta_path.remove(self)  # find the real module without coming back here
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            if self._pending:
                sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _InstrumentAfterImport(spec.loader, instrument, self._path)
        return spec


if os.environ.get(PROBE_ENV):
    sys.meta_path.insert(0, _ProbeFinder(os.environ[PROBE_ENV]))
