"""Subcommands of `simpletuner-lcm` (see lcm_plugin.cli)."""
