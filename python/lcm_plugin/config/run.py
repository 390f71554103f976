"""Validate a run's config.json and multidatabackend.json: the function behind `simpletuner-lcm validate`
and the check the SimpleTuner adapter runs before any model loads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lcm_plugin.config.argv import preprocess_value, training_folder
from lcm_plugin.config.databackend import check_backends, entry_model, is_enabled
from lcm_plugin.config.pitfalls import lcm_pitfalls
from lcm_plugin.config.problems import Problem, pointer
from lcm_plugin.config.training import canonical_key, check_training_config, effective_settings

BACKEND_FILE = "multidatabackend.json"
CONFIG_FILE = "config.json"
# config.json values that dataset entries inherit when they leave them out (SimpleTuner's args).
INHERITED = (
    "resolution",
    "resolution_type",
    "minimum_image_size",
    "maximum_image_size",
    "target_downsample_size",
    "caption_strategy",
    "model_type",
    "controlnet",
    "train_batch_size",
    "framerate",
    "model_family",
)


def read_json(path: Path) -> tuple[Any, list[Problem]]:
    """Parsed JSON, or a problem naming line and column of the syntax error (or why the file is unreadable)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return None, [Problem(str(path), "", f"cannot read: {error.strerror if isinstance(error, OSError) else error}")]
    try:
        return json.loads(text), []
    except json.JSONDecodeError as error:
        return None, [Problem(str(path), "", f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}")]


def run_root(config_path: Path) -> Path:
    """The folder training starts in, against which SimpleTuner resolves relative paths: the parent of the
    nearest `config/` folder holding config.json (`config/config.json`, `config/<env>/config.json`), else
    config.json's own folder."""
    return training_folder(Path(config_path).parent)


def as_seen_from_run_root(path: Path, config_path: Path) -> str:
    """`path` as config.json should name it: relative to where training starts when it lies below, else absolute.
    Both sides are made absolute first: config_path may be relative to the current directory."""
    absolute = Path(path).absolute()
    try:
        return absolute.relative_to(run_root(Path(config_path).absolute())).as_posix()
    except ValueError:
        return absolute.as_posix()


def find_config(folder: Path) -> Path | None:
    """config.json in `folder` or in `folder`/config, as SimpleTuner looks for it."""
    for candidate in (folder / CONFIG_FILE, folder / "config" / CONFIG_FILE):
        if candidate.is_file():
            return candidate
    return None


def find_backend_file(config: dict, config_path: Path) -> tuple[Path | None, list[Problem]]:
    """multidatabackend.json: config.json's data_backend_config, else beside config.json or in config/."""
    keys = {canonical_key(key): key for key in config} if isinstance(config, dict) else {}
    named = config.get(keys["data_backend_config"]) if "data_backend_config" in keys else None
    named = preprocess_value(named) if isinstance(named, str) else named
    folder = config_path.parent
    if isinstance(named, str) and named.strip():
        # SimpleTuner opens it as given, relative to the folder training starts in.
        path = Path(named.strip()).expanduser()
        found = path if path.is_absolute() else run_root(config_path) / path
        if found.is_file():
            return found, []
        beside = folder / path.name
        hint = (
            f'; found {beside}: write "{as_seen_from_run_root(beside, config_path)}"'
            if not path.is_absolute() and beside.is_file()
            else ""
        )
        return None, [
            Problem(
                str(config_path),
                pointer(keys["data_backend_config"]),
                f"no such file: {found} (SimpleTuner opens {named!r} from where training starts, "
                f"{run_root(config_path)}){hint}",
            )
        ]
    for candidate in (folder / BACKEND_FILE, folder / "config" / BACKEND_FILE):
        if candidate.is_file():
            # Training usually starts in the folder above config/: name the file as seen from there.
            return candidate, [
                Problem(
                    str(config_path),
                    "",
                    f"no data_backend_config: SimpleTuner's argument parser "
                    f'requires it; add "data_backend_config": "{as_seen_from_run_root(candidate, config_path)}" (the path '
                    f"as seen from where training starts; found {candidate})",
                )
            ]
    return None, [
        Problem(str(config_path), "", "no data_backend_config, and no multidatabackend.json beside config.json")
    ]


def validate_run(
    config: Any, config_path: str | Path, backend_path: str | Path | None = None, cache_build: bool = False
) -> list[Problem]:
    """Every problem of a run, errors and warnings, before anything heavy loads.

    config: config.json as parsed (a dict of SimpleTuner options; `--` prefixes allowed).
    config_path: where config.json lives; relative data paths resolve against `run_root(config_path)`.
    backend_path: multidatabackend.json; None finds it as SimpleTuner does (data_backend_config, else beside).
    cache_build: judge for `simpletuner-lcm cache build`, which needs one cache_dir_vae per dataset.
    Render with `format_problems(problems)`; any `severity == "error"` means the run must not start.
    """
    return without_shadowed_warnings(_run_problems(config, Path(config_path), backend_path, cache_build))


def _run_problems(config: Any, config_path: Path, backend_path: str | Path | None, cache_build: bool) -> list[Problem]:
    file = str(config_path)
    problems = check_training_config(config, file, config_path.parent)
    if not isinstance(config, dict):
        return problems
    problems += lcm_pitfalls(config, file)
    if backend_path is None:
        found, located = find_backend_file(config, config_path)
        problems += located
        if found is None:
            return problems
        backend_path = found
    backend_path = Path(backend_path)
    entries, unreadable = read_json(backend_path)
    if unreadable:
        return problems + unreadable
    problems += check_backends(
        entries, str(backend_path), inherited_settings(config), run_root(config_path), cache_build
    )
    problems += missing_data_dirs(entries, str(backend_path), run_root(config_path))
    return problems


def without_shadowed_warnings(problems: list[Problem]) -> list[Problem]:
    """Drop warnings at a place that already has an error: the error is what to fix."""
    errors = {
        (problem.file, problem.pointer) for problem in problems if problem.severity == "error" and problem.pointer
    }
    return [p for p in problems if p.severity == "error" or (p.file, p.pointer) not in errors]


def inherited_settings(config: dict) -> dict:
    """config.json values (else SimpleTuner defaults) that dataset entries fall back to."""
    settings = effective_settings(config)
    return {name: settings.get(name) for name in INHERITED}


def validate_files(config_path: str | Path, backend_path: str | Path | None = None) -> list[Problem]:
    """validate_run on files: config.json read from disk (JSON errors reported with line and column)."""
    config, unreadable = read_json(Path(config_path))
    if unreadable:
        return unreadable
    return validate_run(config, config_path, backend_path)


def validate_backend_file(backend_path: str | Path) -> list[Problem]:
    """multidatabackend.json alone, with SimpleTuner's defaults for what config.json would set."""
    entries, unreadable = read_json(Path(backend_path))
    if unreadable:
        return unreadable
    base = run_root(Path(backend_path))
    return check_backends(entries, str(backend_path), inherited_settings({}), base) + missing_data_dirs(
        entries, str(backend_path), base
    )


def missing_data_dirs(entries: Any, file: str, base: Path) -> list[Problem]:
    """Warnings for local data folders that do not exist here (they may exist only on the training machine)."""
    if not isinstance(entries, list):
        return []
    problems = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not is_enabled(entry) or entry.get("type", "local") != "local":
            continue
        if entry_model(entry) is None:
            continue
        key = "instance_data_dir" if "instance_data_dir" in entry else "instance_data_root"
        folders = entry.get(key)
        for folder in [folders] if isinstance(folders, str) else folders if isinstance(folders, list) else []:
            if not isinstance(folder, str) or not folder.strip() or re.search(r"\{\w+\}", folder):
                continue  # empty is an error elsewhere; {placeholders} are filled in by SimpleTuner
            path = Path(folder).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_dir():
                problems.append(
                    Problem(file, pointer(index, key), f"folder {str(path)!r} does not exist here", "warning")
                )
    return problems
