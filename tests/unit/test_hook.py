"""The start-up hook (packaging/wheel-data/purelib/simpletuner_lcm_hook.py, armed by simpletuner_lcm_hook.pth).

Start-up behaviour and the trigger are checked in fresh interpreters of this environment (the installed copy,
which the first test ties to this checkout); the config lookup is checked in-process against SimpleTuner's own
`json_file._candidate_json_paths`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIR = REPO / "packaging" / "wheel-data" / "purelib"
HOOK = "simpletuner_lcm_hook"
TRIGGER = "simpletuner.helpers.training.trainer"
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def fresh_env(**changes: str | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "SIMPLETUNER_LCM_DISABLE"}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_python(args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env or fresh_env(), capture_output=True, text=True, timeout=600
    )


def test_installed_hook_is_this_checkout():
    site_packages = Path(sysconfig.get_paths()["purelib"])
    for name in (f"{HOOK}.py", f"{HOOK}.pth"):
        installed = site_packages / name
        assert installed.is_file(), f"{installed} missing: run `make develop`"
        assert installed.read_text() == (SOURCE_DIR / name).read_text(), f"{installed} is stale: run `make develop`"


def importtime_tree(stderr: str) -> list[tuple[int, str]]:
    """(depth, module) per `-X importtime` line, in print order (a module's imports print before it)."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        name_field = line.rsplit("|", 1)[1]
        stripped = name_field.lstrip(" ")
        rows.append(((len(name_field) - len(stripped) - 1) // 2, stripped.strip()))
    return rows


def imported_by(tree: list[tuple[int, str]], module: str) -> list[str]:
    """The modules `module` imported (transitively), read from the importtime tree."""
    index = next(i for i, (_, name) in enumerate(tree) if name == module)
    depth = tree[index][0]
    children = []
    for child_depth, name in reversed(tree[:index]):
        if child_depth <= depth:
            break
        children.append(name)
    return children


def test_importtime_tree_reader_sees_nested_imports():
    # The reader can fail: json imports json.decoder (and more) beneath it.
    tree = importtime_tree(run_python(["-X", "importtime", "-c", "import json"]).stderr)
    assert "json.decoder" in imported_by(tree, "json")


def test_start_up_imports_only_the_hook_module():
    tree = importtime_tree(run_python(["-X", "importtime", "-c", "pass"]).stderr)
    assert HOOK in [name for _, name in tree]
    assert imported_by(tree, HOOK) == []
    assert not [name for _, name in tree if name.startswith("lcm_plugin")]


@pytest.mark.parametrize(("disable", "armed"), [(None, True), ("1", False), ("0", True)])
def test_hook_arms_a_finder_and_honours_the_opt_out(disable, armed):
    probe = (
        "import sys; print('torch' in sys.modules, any(m.startswith('lcm_plugin') for m in sys.modules), "
        f"any(type(f).__module__ == '{HOOK}' for f in sys.meta_path))"
    )
    result = run_python(["-c", probe], env=fresh_env(SIMPLETUNER_LCM_DISABLE=disable))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", str(armed)]


def trainer_import_program(remove_surface: str | None = None) -> str:
    """Import SimpleTuner's trainer, optionally after deleting `module:Class.attribute` (a simulated upgrade)."""
    lines = ["import sys", f"assert any(type(f).__module__ == '{HOOK}' for f in sys.meta_path), 'hook not armed'"]
    if remove_surface is not None:
        module, attribute = remove_surface.split(":")
        owner, name = attribute.split(".")
        lines += [f"import {module} as surface", f"delattr(surface.{owner}, {name!r})"]
    lines += [
        f"assert {TRIGGER!r} not in sys.modules, 'trainer imported too early'",
        f"import {TRIGGER}",
        "from lcm_plugin.simpletuner import install",
        # SimpleTuner recolours print() and logs to stdout: report on the untouched stream, one marked line.
        f"sys.__stdout__.write(f'\\nRESULT installed={{install.is_installed()}} "
        f"finder_left={{any(type(f).__module__ == {HOOK!r} for f in sys.meta_path)}}\\n')",
    ]
    return "\n".join(lines)


def trainer_import_result(stdout: str) -> str | None:
    return next((line.removeprefix("RESULT ") for line in stdout.splitlines() if line.startswith("RESULT ")), None)


def write_config(run_dir: Path, **settings) -> Path:
    config_dir = run_dir / "config"
    config_dir.mkdir(parents=True)
    (config_dir / "config.json").write_text(json.dumps({"model_family": "sdxl", "model_type": "lora", **settings}))
    return run_dir


def test_importing_the_trainer_installs_the_plugin_once(tmp_path):
    result = run_python(["-c", trainer_import_program()], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert trainer_import_result(result.stdout) == "installed=True finder_left=False", result.stdout[-3000:]


def test_a_moved_surface_only_warns_when_the_run_is_not_lcm(tmp_path):
    run_dir = write_config(tmp_path / "run", distillation_method="dcm")
    program = trainer_import_program("simpletuner.helpers.distillation.factory:DistillerFactory._create_lcm_distiller")
    result = run_python(["-c", program], cwd=run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert trainer_import_result(result.stdout) == "installed=False finder_left=False", result.stdout[-3000:]
    # SimpleTuner's logging setup decides the stream.
    warning = [line for line in (result.stdout + result.stderr).splitlines() if "simpletuner-lcm is not active" in line]
    assert len(warning) == 1, (result.stdout + result.stderr)[-3000:]
    assert "DistillerFactory._create_lcm_distiller is missing" in warning[0]


def test_a_moved_surface_stops_an_lcm_run_with_its_name(tmp_path):
    # (The command line and the other config sources are covered by the lookup tests below.)
    run_dir = write_config(tmp_path / "run", distillation_method="lcm")
    program = trainer_import_program("simpletuner.helpers.distillation.registry:DistillationRegistry.get_metadata")
    result = run_python(["-c", program], cwd=run_dir)
    assert result.returncode != 0
    assert trainer_import_result(result.stdout) is None
    last_line = ANSI_COLOUR.sub("", result.stderr).strip().splitlines()[-1]  # SimpleTuner colours tracebacks
    assert last_line.startswith(f"{HOOK}.LcmPluginUnavailable: simpletuner-lcm: config/config.json asks for "
                                "distillation_method 'lcm'"), result.stderr[-3000:]
    assert "DistillationRegistry.get_metadata is missing" in last_line


# ----- the config lookup, in this process (the source file, loaded unarmed) -----


@pytest.fixture
def hook(monkeypatch):
    monkeypatch.setenv("SIMPLETUNER_LCM_DISABLE", "1")  # load it without arming a second finder here
    # Executed from source, not imported: no __pycache__ may appear in the wheel data folder.
    source = SOURCE_DIR / f"{HOOK}.py"
    module = types.ModuleType("hook_under_test")
    exec(compile(source.read_text(), str(source), "exec"), module.__dict__)
    for variable in ("CONFIG_PATH", "SIMPLETUNER_ENVIRONMENT", "SIMPLETUNER_ENV", "ENV", "SIMPLETUNER_CONFIG_BACKEND",
                     "CONFIG_BACKEND", "CONFIG_TYPE", "TRAINER_EXTRA_ARGS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    return module


@pytest.mark.parametrize(
    "variables",
    [
        {},
        {"CONFIG_PATH": "{tmp}/elsewhere"},
        {"CONFIG_PATH": "{tmp}/elsewhere/config"},
        {"CONFIG_PATH": "{tmp}/elsewhere/my.json"},
        {"CONFIG_PATH": "{tmp}/elsewhere/config", "ENV": "team/run1"},
        {"SIMPLETUNER_ENVIRONMENT": "team"},
        {"SIMPLETUNER_ENV": "config/team"},
        {"ENV": "default"},
        {"ENV": "runs/a.json"},
        {"SIMPLETUNER_ENVIRONMENT": "examples/sdxl.peft-lora"},
        {"SIMPLETUNER_ENVIRONMENT": "~/team"},
    ],
)
def test_json_candidates_are_simpletuners(hook, tmp_path, monkeypatch, variables):
    from simpletuner.helpers.configuration import json_file

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    for key, value in variables.items():
        monkeypatch.setenv(key, value.format(tmp=tmp_path))
    env = hook._environment()
    assert hook.json_candidates(env) == json_file._candidate_json_paths(env)


def test_lcm_is_read_from_the_config_file_simpletuner_picks(hook, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hook.lcm_requested_by() is None  # no config at all
    write_config(tmp_path, distillation_method="lcm")
    assert hook.lcm_requested_by() == "config/config.json"
    (tmp_path / "config" / "config.json").write_text(json.dumps({"--distillation_method": " LCM "}))
    assert hook.lcm_requested_by() == "config/config.json"
    (tmp_path / "config" / "config.json").write_text(json.dumps({"distillation_method": "dcm"}))
    assert hook.lcm_requested_by() is None
    (tmp_path / "config" / "config.json").write_text("{not json")
    assert hook.lcm_requested_by() is None

    # An environment's own config.json wins over config/config.json, as in SimpleTuner.
    team = tmp_path / "config" / "team"
    team.mkdir()
    (team / "config.json").write_text(json.dumps({"distillation_method": "lcm"}))
    monkeypatch.setenv("SIMPLETUNER_ENVIRONMENT", "team")
    assert hook.lcm_requested_by() == "config/team/config.json"

    # CONFIG_PATH, as `simpletuner train` sets it (config.json without its suffix), points anywhere.
    write_config(tmp_path / "elsewhere", distillation_method="lcm")
    elsewhere = tmp_path / "elsewhere" / "config" / "config.json"
    monkeypatch.setenv("CONFIG_PATH", str(elsewhere.with_suffix("")))
    assert hook.lcm_requested_by() == str(elsewhere)


def test_lcm_is_read_from_toml_and_arguments(hook, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.toml").write_text('distillation_method = "lcm"\n')
    assert hook.lcm_requested_by() == "config/config.toml"  # auto-detected: no config.json
    monkeypatch.setenv("CONFIG_BACKEND", "json")
    assert hook.lcm_requested_by() is None  # the json backend never reads the toml file

    for argv in (["--distillation_method", "lcm"], ["--distillation_method=lcm"]):
        monkeypatch.setattr(sys, "argv", ["train.py", "--seed=1", *argv])
        assert hook.lcm_requested_by() == "distillation_method in the command line"
    monkeypatch.setattr(sys, "argv", ["train.py", "--distillation_method"])
    assert hook.lcm_requested_by() is None
    monkeypatch.setenv("TRAINER_EXTRA_ARGS", "--seed=1 --distillation_method=lcm")
    assert hook.lcm_requested_by() == "distillation_method in TRAINER_EXTRA_ARGS"
