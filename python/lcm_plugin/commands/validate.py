"""`simpletuner-lcm validate [CONFIG_DIR | config.json [multidatabackend.json]]`: every problem at once, one per line."""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "check config.json and multidatabackend.json (SimpleTuner keys, LCM settings, datasets) before training"


def add_arguments(parser) -> None:
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="a config folder (default: the current folder), a config.json, a config.json and its "
        "multidatabackend.json, or a multidatabackend.json alone",
    )


def run(args) -> int:
    from lcm_plugin.config import format_problems, has_errors
    from lcm_plugin.config.run import find_config, validate_backend_file, validate_files

    paths = [Path(path) for path in args.paths] or [Path(".")]
    if len(paths) > 2:
        print("simpletuner-lcm validate: give at most two paths: config.json [multidatabackend.json]", file=sys.stderr)
        return 2
    first = paths[0]
    if first.is_dir():
        if len(paths) == 2:
            print("simpletuner-lcm validate: a folder cannot be followed by a second path", file=sys.stderr)
            return 2
        config = find_config(first)
        if config is None:
            print(f"simpletuner-lcm validate: no config.json in {first} or {first / 'config'}", file=sys.stderr)
            return 1
        problems = validate_files(config)
    elif len(paths) == 1 and _looks_like_backend_list(first):
        problems = validate_backend_file(first)
    else:
        problems = validate_files(first, paths[1] if len(paths) == 2 else None)
    if problems:
        print(format_problems(problems))
    errors = has_errors(problems)
    print(
        f"{'FAILED' if errors else 'OK'}: {sum(p.severity == 'error' for p in problems)} error(s), "
        f"{sum(p.severity == 'warning' for p in problems)} warning(s)",
        file=sys.stderr,
    )
    return 1 if errors else 0


def _looks_like_backend_list(path: Path) -> bool:
    """A lone multidatabackend.json (a JSON list) rather than a config.json (an object)."""
    try:
        return path.read_text(encoding="utf-8").lstrip().startswith("[")
    except (OSError, UnicodeDecodeError):
        return False
