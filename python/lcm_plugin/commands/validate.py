"""`simpletuner-lcm validate` (not implemented yet)."""

HELP = "validate (not implemented yet)"


def add_arguments(parser) -> None:
    del parser


def run(args) -> int:
    del args
    raise SystemExit("simpletuner-lcm validate: not implemented yet")
