"""`simpletuner-lcm train` (not implemented yet)."""

HELP = "train (not implemented yet)"


def add_arguments(parser) -> None:
    del parser


def run(args) -> int:
    del args
    raise SystemExit("simpletuner-lcm train: not implemented yet")
