"""`simpletuner-lcm train [CONFIG_DIR]`: SimpleTuner's own training script, in this process, plugin installed.

The explicit twin of the .pth hook: it calls install() itself (so it works with SIMPLETUNER_LCM_DISABLE=1
too) and then runs `simpletuner/train.py` as `__main__`, exactly what `accelerate launch` would run.
Because training happens in this interpreter, it also works as the script of a launcher:

    accelerate launch --num_processes 2 -m lcm_plugin.cli train config/

Paths inside config.json resolve against the current directory, as with `simpletuner train`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HELP = "train with SimpleTuner's trainer in this process, LCM plugin installed (works under accelerate launch)"


def add_arguments(parser) -> None:
    parser.add_argument(
        "config_dir",
        nargs="?",
        default=Path("."),
        type=Path,
        help="folder holding config.json, or whose config/ subfolder does (default: the current directory)",
    )


def find_config_json(config_dir: Path) -> Path:
    """config.json in `config_dir` or `config_dir/config`, SimpleTuner's own search order."""
    from lcm_plugin.config.run import find_config

    found = find_config(config_dir)
    if found is None:
        raise SystemExit(
            f"simpletuner-lcm train: no config.json in {config_dir} or {config_dir / 'config'} "
            "(SimpleTuner's config.json with \"distillation_method\": \"lcm\"; check it with simpletuner-lcm validate)"
        )
    return found


def run(args) -> int:
    config_json = find_config_json(args.config_dir)
    # SimpleTuner's trainer reads its configuration from these, as set by its own `simpletuner train`.
    os.environ["CONFIG_BACKEND"] = "json"
    os.environ["CONFIG_PATH"] = str(config_json.resolve().with_suffix(""))

    import runpy

    import simpletuner

    from lcm_plugin.simpletuner.install import install

    install()
    train_py = Path(simpletuner.__file__).parent / "train.py"
    # train.py reads overrides from argv: hand it none of ours.
    sys.argv = [str(train_py)]
    runpy.run_path(str(train_py), run_name="__main__")
    return 0
