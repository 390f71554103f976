"""simpletuner-lcm's start-up hook: `simpletuner_lcm_hook.pth` imports it in every interpreter of the environment.

`simpletuner train` trains in a child interpreter (`accelerate launch .../train.py`), so a patch made in the
parent never reaches training. This module puts a one-shot finder first on `sys.meta_path`; when SimpleTuner's
trainer module has finished importing, the finder calls `lcm_plugin.simpletuner.install.install()` and is gone.

Every interpreter pays for this module (DataLoader workers, tools, anything run with this Python), so at start-up
it uses only `os` and `sys`, which `site` has already loaded: no importlib machinery, no `lcm_plugin`. It lives
in site-packages beside its .pth (shipped as wheel data), so it imports before any editable-install path file
has run. `bench/hook_startup.py` measures it. Opt out with SIMPLETUNER_LCM_DISABLE=1.

If install() fails (typically a SimpleTuner upgrade moved a surface it patches):
- a run whose configuration asks for `distillation_method: lcm` stops with `LcmPluginUnavailable`, naming the
  surface: without the plugin SimpleTuner's own LCM path fails anyway ("LCM distiller not found"), later;
- every other run logs one warning naming the surface and trains with SimpleTuner unchanged.

"Asks for lcm" is read the way SimpleTuner's loader will read it, with the standard library only (the surfaces
may be what moved): `--distillation_method lcm` or `--distillation_method=lcm` in the command line or in
TRAINER_EXTRA_ARGS (the env backend's arguments), or `distillation_method` in the config file SimpleTuner picks:
the backend named by SIMPLETUNER_CONFIG_BACKEND / CONFIG_BACKEND / CONFIG_TYPE, else the first of config.json,
config.toml, config.env under config/[<env>]; a JSON file is found by the rule of
`json_file._candidate_json_paths` (CONFIG_PATH, then SIMPLETUNER_ENVIRONMENT / SIMPLETUNER_ENV / ENV, then
config/config.json).
"""

import os
import sys

DISABLE_ENV = "SIMPLETUNER_LCM_DISABLE"
# The trainer imports the distillation factory and defines the Trainer class that install() wraps: once its
# body has run, every surface install() patches exists.
TRIGGER_MODULE = "simpletuner.helpers.training.trainer"
METHOD = "lcm"
METHOD_KEY = "distillation_method"


class LcmPluginUnavailable(RuntimeError):
    """The run asks for distillation_method lcm, but the plugin could not be installed."""


class _InstallAfterImport:
    """Delegates to the real loader, then installs the plugin once the module body has run."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        # Hand the module its real loader back (tracebacks and get_source go through it).
        module.__loader__ = self._loader
        module.__spec__.loader = self._loader
        install_plugin()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _TrainerFinder:
    """Finds TRIGGER_MODULE through the other finders and wraps its loader; one-shot."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER_MODULE:
            return None
        sys.meta_path.remove(self)  # one-shot, and keeps the lookup below from coming back here
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _InstallAfterImport(spec.loader)
        return spec


def install_plugin():
    """install(); on failure an error for LCM runs, a warning for the others (see the module docstring)."""
    try:
        from lcm_plugin.simpletuner.install import install

        install()
    except Exception as error:  # noqa: BLE001 - whatever broke, a run that does not need the plugin goes on
        reason = f"{type(error).__name__}: {error}"
        source = lcm_requested_by()
        if source is not None:
            raise LcmPluginUnavailable(
                f"simpletuner-lcm: {source} asks for {METHOD_KEY} '{METHOD}', but the plugin could not be "
                f"installed: {reason}"
            ) from error
        import logging

        logging.getLogger("simpletuner-lcm").warning(
            "simpletuner-lcm is not active (this run does not ask for %s '%s'): %s", METHOD_KEY, METHOD, reason
        )


def lcm_requested_by():
    """Where this run's configuration asks for distillation_method lcm (a phrase for messages), or None."""
    for where, arguments in (
        ("the command line", getattr(sys, "argv", [])[1:]),  # embedded interpreters may have no argv
        ("TRAINER_EXTRA_ARGS", os.environ.get("TRAINER_EXTRA_ARGS", "").split()),  # split as SimpleTuner does
    ):
        if _is_lcm(_method_in_arguments(arguments)):
            return f"{METHOD_KEY} in {where}"
    path = config_file()
    if path is not None and _is_lcm(_method_in_file(path)):
        return str(path)
    return None


def _is_lcm(value):
    return isinstance(value, str) and value.strip().lower() == METHOD


def _method_in_arguments(arguments):
    flag = "--" + METHOD_KEY
    for index, argument in enumerate(arguments):
        if argument == flag and index + 1 < len(arguments):
            return arguments[index + 1]
        if argument.startswith(flag + "="):
            return argument[len(flag) + 1 :]
    return None


def _environment():
    return os.environ.get("SIMPLETUNER_ENVIRONMENT", os.environ.get("SIMPLETUNER_ENV", os.environ.get("ENV")))


def config_file():
    """The config.json or config.toml SimpleTuner's loader will read in this run, if it exists."""
    from pathlib import Path

    env = _environment()
    env_dir = Path("config", env) if env and env != "default" else Path("config")
    backend = os.environ.get("SIMPLETUNER_CONFIG_BACKEND", os.environ.get("CONFIG_BACKEND", os.environ.get("CONFIG_TYPE")))
    if not backend:
        backend = next((kind for kind in ("json", "toml", "env") if (env_dir / f"config.{kind}").exists()), "json")
    backend = backend.lower()
    if backend == "json":
        return next((path for path in json_candidates(env) if path.is_file()), None)
    if backend == "toml" and (env_dir / "config.toml").is_file():
        return env_dir / "config.toml"
    return None  # the env backend's distillation_method can only come from TRAINER_EXTRA_ARGS


def json_candidates(env):
    """The paths simpletuner.helpers.configuration.json_file._candidate_json_paths(env) tries, in order."""
    from pathlib import Path

    candidates = []
    override = os.environ.get("CONFIG_PATH")
    if override:
        override_path = Path(override)
        if override_path.is_dir():
            candidates.append(override_path / "config.json")
        else:
            if override_path.suffix:
                candidates.append(override_path)
            candidates.append(override_path.with_suffix(".json"))
    if env and env != "default":
        env_path = Path(env).expanduser()
        if env_path.suffix:
            candidates.append(env_path)
            if not env_path.is_absolute():
                candidates.append(Path.cwd() / env_path)
        else:
            candidates.append(env_path / "config.json")
            if (env_path.parts or ("",))[0] != "config":
                candidates.append(Path("config") / env_path / "config.json")
            # json_file.py's package root: the simpletuner package folder, imported by now (the trainer is).
            simpletuner = sys.modules.get("simpletuner")
            if getattr(simpletuner, "__file__", None):
                package_root = Path(simpletuner.__file__).resolve().parent
                candidates.append(package_root / env_path / "config.json")
                candidates.append(package_root / env_path / "config" / "config.json")
    else:
        candidates.append(Path("config/config.json"))
    return list(dict.fromkeys(path.expanduser() for path in candidates))


def _method_in_file(path):
    """distillation_method in a config.json (keys with or without "--") or config.toml; None if unreadable."""
    try:
        with open(path, "rb") as file:
            if path.suffix == ".toml":
                import tomllib

                config = tomllib.load(file)
            else:
                import json

                config = json.load(file)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return next((value for key, value in config.items() if str(key).strip().lstrip("-") == METHOD_KEY), None)


def arm():
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return
    if any(isinstance(finder, _TrainerFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _TrainerFinder())


arm()
