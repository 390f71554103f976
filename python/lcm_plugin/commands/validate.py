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
    config = None
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
        config = first
        problems = validate_files(first, paths[1] if len(paths) == 2 else None)
    estimate = memory_estimate_of(config) if config is not None else None
    if estimate is not None:
        problems += fit_warnings(estimate, config, visible_gpus())
    if problems:
        print(format_problems(problems))
    if estimate is not None:
        # stderr, beside the summary: stdout stays one problem per line.
        print("\n".join(estimate.lines()), file=sys.stderr)
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


# What lowers each phase's memory, for the warning when the estimate exceeds a visible GPU.
REMEDIES = {
    "caching": "lower vae_batch_size",
    "training": "lower train_batch_size or resolution, keep gradient_checkpointing on, or set base_model_precision "
    "int8-quanto",
    "validation": "lower validation_resolution, or turn distillation_config.lcm.quality_check off",
}


def memory_estimate_of(config_path: Path):
    """lcm_plugin.memory_estimate's estimate for a readable config.json (None if unreadable or not estimated)."""
    from lcm_plugin.config.argv import preprocess_value, training_folder
    from lcm_plugin.config.run import read_json
    from lcm_plugin.config.training import canonical_key, effective_settings, lcm_block_of, parse_distillation_config
    from lcm_plugin.memory_estimate import estimate_run_memory

    config, unreadable = read_json(Path(config_path))
    if unreadable or not isinstance(config, dict):
        return None
    raw = next((value for key, value in config.items() if canonical_key(key) == "distillation_config"), None)
    parsed = (parse_distillation_config(preprocess_value(raw), training_folder(Path(config_path).parent))
              if raw is not None else {})
    block = lcm_block_of(parsed)[0] if isinstance(parsed, dict) else {}
    try:
        return estimate_run_memory(effective_settings(config), block if isinstance(block, dict) else {})
    except (ValueError, TypeError, KeyError, ArithmeticError):
        return None  # a value it cannot read (resolution "abc", ...): validate's own problems name the key


def visible_gpus() -> list[tuple[str, float]]:
    """(name, total GiB) of each CUDA GPU this process would use, read from nvidia-smi rather than torch (validate
    stays light); CUDA_VISIBLE_DEVICES narrows the list when it names GPU indices. Empty without NVIDIA's driver."""
    import os
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listed = subprocess.run([smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = {}
    for line in listed.splitlines():
        try:
            index, rest = line.split(",", 1)
            name, mebibytes = rest.rsplit(",", 1)  # a GPU's name may hold commas
            gpus[index.strip()] = (name.strip(), float(mebibytes) / 1024)
        except ValueError:
            continue  # "[N/A]" memory, or a line that is not a GPU
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(gpus.values())
    indices = [part.strip() for part in visible.split(",") if part.strip()]
    if all(index.isdigit() for index in indices):
        return [gpus[index] for index in indices if index in gpus]
    return list(gpus.values())  # GPU UUIDs: every GPU is a candidate


def fit_warnings(estimate, config_path: Path, gpus: list[tuple[str, float]]) -> list:
    """One warning when the estimated peak exceeds the smallest visible GPU (every rank holds the whole run)."""
    from lcm_plugin.config import Problem

    if not gpus:
        return []
    name, total = min(gpus, key=lambda gpu: gpu[1])
    if estimate.peak_gib <= total:
        return []
    phase = estimate.peak.name
    message = (f"estimated peak GPU memory {estimate.peak_gib:.1f} GiB ({phase}) does not fit the {total:.1f} GiB of "
               f"the {name}: {REMEDIES[phase]}")
    return [Problem(str(config_path), "", message, "warning")]
