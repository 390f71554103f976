"""`simpletuner-lcm schema` (not implemented yet)."""

HELP = "schema (not implemented yet)"


def add_arguments(parser) -> None:
    del parser


def run(args) -> int:
    del args
    raise SystemExit("simpletuner-lcm schema: not implemented yet")
