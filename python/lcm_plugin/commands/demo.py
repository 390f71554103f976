"""`simpletuner-lcm demo` (not implemented yet)."""

HELP = "demo (not implemented yet)"


def add_arguments(parser) -> None:
    del parser


def run(args) -> int:
    del args
    raise SystemExit("simpletuner-lcm demo: not implemented yet")
