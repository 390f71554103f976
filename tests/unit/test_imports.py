"""Dependency direction, checked in fresh interpreters (this process has imported everything already).

config <- lcm <- simpletuner adapter <- cli: the pure math never reaches for the host or the CLI, and
`import lcm_plugin` stays cheap (the start-up hook's cost is tests/unit/test_hook.py's business).
"""

from __future__ import annotations

import json
import subprocess
import sys



def _modules_after(statement: str) -> set[str]:
    """Top-level and lcm_plugin.* module names loaded by a fresh interpreter after running `statement`."""
    program = f"import sys\n{statement}\nimport json\nprint(json.dumps(sorted(sys.modules)))"
    completed = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=False, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    return set(json.loads(completed.stdout.strip().splitlines()[-1]))


def _loaded(modules: set[str], name: str) -> bool:
    return name in modules or any(m.startswith(name + ".") for m in modules)


def test_import_lcm_plugin_pulls_in_neither_torch_nor_simpletuner():
    modules = _modules_after("import lcm_plugin")
    assert "lcm_plugin" in modules
    for heavy in ("torch", "simpletuner", "diffusers", "transformers", "numpy"):
        assert not _loaded(modules, heavy), f"`import lcm_plugin` imported {heavy}"


FORBIDDEN_FOR_LCM = (
    "simpletuner",
    "lcm_plugin.simpletuner",
    "lcm_plugin.cache",
    "lcm_plugin.cli",
    "lcm_plugin.commands",
    "lcm_plugin.demo",
    # The base install needs only torch (with numpy and pydantic): the math must not need the diffusers stack.
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
)


def test_pure_lcm_math_imports_no_host_and_no_cli():
    modules = _modules_after("import lcm_plugin.lcm")
    assert "torch" in modules  # the probe really imported the math
    leaked = [name for name in FORBIDDEN_FOR_LCM if _loaded(modules, name)]
    assert not leaked, f"lcm_plugin.lcm imported {leaked}"


def test_probe_detects_an_import():
    # The probe can fail: importing the adapter shows up as lcm_plugin.simpletuner.
    assert _loaded(_modules_after("import lcm_plugin.simpletuner.install"), "lcm_plugin.simpletuner")
