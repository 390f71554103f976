"""`simpletuner-lcm`: the console entry point. Each subcommand lives in `lcm_plugin.commands.<name>`.

A command module defines `HELP`, `add_arguments(parser)` and `run(args) -> int`, and keeps heavy
imports (torch, SimpleTuner) inside `run`, so `--help` and `validate` start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lcm_plugin import __version__

COMMANDS = ("validate", "schema", "cache", "train", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simpletuner-lcm",
        description="LCM distillation for SimpleTuner: validate configs, build latent caches, train, demo.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"lcm_plugin.commands.{name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
