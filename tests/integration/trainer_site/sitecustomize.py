"""Imported at the start of every test trainer process (conftest.stock_trainer_env puts this folder on PYTHONPATH).

SimpleTuner 4.10.1 marks the start of each training step for CUDA graph trees whenever `dynamo_backend` is set
(helpers/training/dynamo.py, `mark_cudagraph_step_begin`), and its default, "no", is a truthy string: the first step
of every run imports torch._inductor for the mark, 4.5 s of a 20 s tiny CPU run, a fifth of the suite's trainer
time. A CPU run records no CUDA graph, so the mark changes nothing there. Here `torch.compiler` comes without
`cudagraph_mark_step_begin`, which SimpleTuner then skips (it looks the function up with getattr); nothing else
differs. A test that puts its own sitecustomize first runs without this one.
"""

import importlib.abc
import importlib.machinery
import sys


class _WithoutCudaGraphStepMark(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "torch.compiler":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        exec_module = spec.loader.exec_module

        def exec_without_the_mark(module):
            exec_module(module)
            del module.cudagraph_mark_step_begin

        spec.loader.exec_module = exec_without_the_mark
        return spec


sys.meta_path.insert(0, _WithoutCudaGraphStepMark())
