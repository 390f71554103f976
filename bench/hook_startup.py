"""Start-up cost of the .pth hook (not a test): the old hook against the shipped one, in one run.

    .venv/bin/python bench/hook_startup.py [RUNS]

Every interpreter of the environment pays the hook. Each variant below is a fresh `python -S` that runs
`site.main()` itself, so all of them process the same site-packages and differ only in what happens at
`simpletuner_lcm_hook.pth`:
- without: the .pth skipped (the environment without the plugin's hook);
- old: the hook as shipped before (`import lcm_plugin._hook`: the package's __init__ reads its version with
  importlib.metadata, then importlib.abc / importlib.util and a finder), reconstructed below as OLD_HOOK;
- new: the shipped .pth line, `import simpletuner_lcm_hook`.
Plus `python -S -c pass` (no site at all) and the environment's real `python -c pass` (new hook).

Printed: the hook's cumulative `-X importtime` figure (median), and per variant the median wall time and CPU time
(user + system, less disturbed on a busy machine) of `python -c pass`, with the hook's share (variant minus
`without`) and old/new ratios.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 40
PTH = "simpletuner_lcm_hook.pth"

# The old start-up path (python/lcm_plugin/_hook.py until it was replaced by simpletuner_lcm_hook): its module
# body, with the parent-package import that `import lcm_plugin._hook` performed first.
OLD_HOOK = '''
import lcm_plugin
import importlib.abc
import importlib.util
import os
import sys


class _InstallAfterImport(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__loader__ = self._loader
        module.__spec__.loader = self._loader
        from lcm_plugin.simpletuner.install import install

        install()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _TrainerFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "simpletuner.helpers.training.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _InstallAfterImport(spec.loader)
        return spec


if os.environ.get("SIMPLETUNER_LCM_DISABLE", "") in ("", "0"):
    sys.meta_path.insert(0, _TrainerFinder())
'''

# Runs site.main() with our .pth skipped, replaced by the old hook, or as shipped (argv: variant, old hook dir).
DRIVER = f'''
import site, sys
variant, old_dir = sys.argv[1], sys.argv[2]
process = site.addpackage
def addpackage(sitedir, name, known_paths):
    if name != {PTH!r} or variant == "new":
        return process(sitedir, name, known_paths)
    if variant == "old":
        sys.path.append(old_dir)
        import old_lcm_hook
    return known_paths
site.addpackage = addpackage
site.main()
'''


def command(variant: str, old_dir: str) -> list[str]:
    if variant == "no site (-S)":
        return [sys.executable, "-S", "-c", "pass"]
    if variant == "real python -c pass":
        return [sys.executable, "-c", "pass"]
    return [sys.executable, "-S", "-c", DRIVER, variant, old_dir]


def hook_importtime_us(stderr: str, module: str) -> int:
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.rsplit("|", 1)[1].strip() == module:
            return int(line.split("|")[1])
    raise SystemExit(f"hook_startup: {module} not in the -X importtime output; is the plugin installed?")


def main() -> None:
    variants = ("no site (-S)", "without", "old", "new", "real python -c pass")
    with tempfile.TemporaryDirectory() as old_dir:
        (Path(old_dir) / "old_lcm_hook.py").write_text(OLD_HOOK)
        env_hook_modules = {"old": "old_lcm_hook", "new": "simpletuner_lcm_hook"}
        for variant in variants:  # warm-up: page cache and .pyc files
            subprocess.run(command(variant, old_dir), check=True)
        importtime = {variant: [] for variant in env_hook_modules}
        walls = {variant: [] for variant in variants}
        cpus = {variant: [] for variant in variants}
        for _ in range(RUNS):
            for variant in variants:  # interleaved, so drift hits every variant alike
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                subprocess.run(command(variant, old_dir), check=True)
                walls[variant].append(time.perf_counter() - start)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpus[variant].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            for variant, module in env_hook_modules.items():
                traced = subprocess.run(
                    [*command(variant, old_dir)[:1], "-X", "importtime", *command(variant, old_dir)[1:]],
                    check=True, capture_output=True, text=True,
                )
                importtime[variant].append(hook_importtime_us(traced.stderr, module))

    old_us, new_us = (statistics.median(importtime[v]) for v in ("old", "new"))
    print(f"python {sys.version.split()[0]} at {sys.executable}, {RUNS} runs per variant (medians)\n")
    print("-X importtime, the hook's cumulative time:")
    print(f"  old (lcm_plugin._hook path)     {old_us / 1000:8.2f} ms")
    print(f"  new (simpletuner_lcm_hook)      {new_us / 1000:8.2f} ms   old/new {old_us / new_us:6.0f}x")
    for label, samples in (("wall", walls), ("CPU (user + system)", cpus)):
        median = {variant: statistics.median(times) for variant, times in samples.items()}
        print(f"\n{label} time of `python -c pass`:")
        for variant in variants:
            share = "" if variant in ("no site (-S)", "without") else (
                f"   hook's share {1000 * (median[variant] - median['without']):7.2f} ms"
            )
            print(f"  {variant:<30}  {1000 * median[variant]:8.2f} ms{share}")
        print(f"  old/new {median['old'] / median['new']:.2f}x; new/without {median['new'] / median['without']:.3f}x; "
              f"old/without {median['old'] / median['without']:.2f}x")


if __name__ == "__main__":
    main()
