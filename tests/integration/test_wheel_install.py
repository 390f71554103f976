"""What `pip install simpletuner-lcm` users get: the built wheel, installed into a fresh virtual environment.

The wheel is built with `maturin build --release` (cargo's target/ is shared with `make develop`, so this only
packages when the extension is up to date). The fresh environment sees this environment's packages through a
path file (not SimpleTuner's dependencies again), but none of its .pth files: `lcm_plugin`, the hook module and
the hook's .pth must all come from the wheel.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [str(BIN / "maturin"), "build", "--release", "--interpreter", sys.executable, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (built,) = out.glob("simpletuner_lcm-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site_packages = Path(
        subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       check=True, capture_output=True, text=True).stdout.strip()
    )
    # A plain path line: the dev environment's packages become importable, its .pth files do not run.
    (site_packages / "dev_environment_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


def test_wheel_ships_the_hook_module_beside_its_pth(wheel):
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    for hook_file in ("simpletuner_lcm_hook.pth", "simpletuner_lcm_hook.py"):
        assert any(name.endswith(f".data/purelib/{hook_file}") for name in names), names


def test_installed_wheel_arms_the_hook_and_runs_validate(fresh_venv, lcm_training_dir):
    venv_site = fresh_venv / "lib"
    program = (
        "import json, sys, simpletuner_lcm_hook\n"
        "assert any(type(f).__module__ == 'simpletuner_lcm_hook' for f in sys.meta_path), 'hook not armed'\n"
        "assert not any(m.startswith('lcm_plugin') for m in sys.modules), 'lcm_plugin imported at start-up'\n"
        "import simpletuner.helpers.training.trainer\n"
        "import lcm_plugin\n"
        "from lcm_plugin.simpletuner import install\n"
        # SimpleTuner recolours print() and logs to stdout: report on the untouched stream, one marked line.
        "report = {'hook': simpletuner_lcm_hook.__file__, 'plugin': lcm_plugin.__file__,\n"
        "          'installed': install.is_installed()}\n"
        "sys.__stdout__.write('\\nRESULT ' + json.dumps(report) + '\\n')\n"
    )
    env = {"PATH": f"{fresh_venv / 'bin'}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(fresh_venv / "bin" / "python"), "-c", program], cwd=lcm_training_dir, env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert Path(report["hook"]).is_relative_to(venv_site), report
    assert Path(report["plugin"]).is_relative_to(venv_site), report  # the wheel's package, not this checkout's
    assert report["installed"] is True, result.stdout[-3000:]
    # The wheel carries the Rust extension the cache commands need.
    assert list(Path(report["plugin"]).parent.glob("_latent_cache*.so"))

    validate = subprocess.run(
        [str(fresh_venv / "bin" / "simpletuner-lcm"), "validate", "config"], cwd=lcm_training_dir, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert validate.stderr.strip().splitlines()[-1].startswith("OK: 0 error(s)")
