"""Post-import hook armed by simpletuner_lcm_hook.pth at interpreter start-up.

`simpletuner train` runs training in a child interpreter (`accelerate launch .../train.py`), so a patch
made by a wrapper in the parent never reaches it. Every interpreter of the environment runs the .pth
line `import lcm_plugin._hook`; this module only puts a finder on `sys.meta_path`. When SimpleTuner's
trainer module has finished importing, the finder calls `lcm_plugin.simpletuner.install.install()`
and removes itself.

Must stay import-cheap: standard library only (no torch, no SimpleTuner) at start-up.
Opt out with SIMPLETUNER_LCM_DISABLE=1.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

DISABLE_ENV = "SIMPLETUNER_LCM_DISABLE"
# The trainer imports the distillation factory (through distillation.composition) and defines the
# Trainer class that install() wraps: once it has run, every surface install() patches exists.
TRIGGER_MODULE = "simpletuner.helpers.training.trainer"


class _InstallAfterImport(importlib.abc.Loader):
    """Delegates to the real loader, then calls install() once the module body has run."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        # Hand the module its real loader back (tracebacks and get_source go through it).
        module.__loader__ = self._loader
        module.__spec__.loader = self._loader
        from lcm_plugin.simpletuner.install import install

        install()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _TrainerFinder(importlib.abc.MetaPathFinder):
    """Finds TRIGGER_MODULE through the other finders and wraps its loader; one-shot."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER_MODULE:
            return None
        sys.meta_path.remove(self)  # one-shot, and keeps find_spec below from recursing into us
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _InstallAfterImport(spec.loader)
        return spec


def _arm() -> None:
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return
    if any(isinstance(finder, _TrainerFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _TrainerFinder())


_arm()
