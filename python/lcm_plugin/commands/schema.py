"""`simpletuner-lcm schema --write|--check`: regenerate or compare the JSON Schemas and SimpleTuner's key catalogue."""

from __future__ import annotations

import sys

HELP = "regenerate (--write) or compare (--check) schemas/*.schema.json and the SimpleTuner key catalogue"


def add_arguments(parser) -> None:
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate the files from the installed SimpleTuner")
    mode.add_argument("--check", action="store_true", help="exit 1 if a committed file differs from a fresh build")


def run(args) -> int:
    import warnings

    from lcm_plugin import schema  # imports SimpleTuner when building the catalogue

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SimpleTuner's import-time notices (flash_attn, triton, autocast)
        if args.write:
            for path in schema.write():
                print(f"wrote {path}")
            return 0
        stale = schema.check()
    for path in stale:
        print(f"{path}: out of date; run `simpletuner-lcm schema --write`", file=sys.stderr)
    if not stale:
        print("schemas/ and the SimpleTuner key catalogue are up to date")
    return 1 if stale else 0
