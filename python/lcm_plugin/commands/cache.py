"""`simpletuner-lcm cache` (not implemented yet)."""

HELP = "cache (not implemented yet)"


def add_arguments(parser) -> None:
    del parser


def run(args) -> int:
    del args
    raise SystemExit("simpletuner-lcm cache: not implemented yet")
