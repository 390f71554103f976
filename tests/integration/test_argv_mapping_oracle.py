"""Oracle: validate's replay of SimpleTuner's JSON-to-argv mapping (`lcm_plugin.config.argv.map_config`) against
SimpleTuner 4.10.1's own `json_file.normalize_args`, key by key.

validate's type checks read the texts `map_config` says reach the parser; a mapping that differs from
SimpleTuner's (which item of a list lands, `--key=false` against a dropped key, a prefix resolving to another
option) can leave every verdict of test_validate_oracle_real_configs.py unchanged, so it is compared here on its
own. For each key of each config: the options the key lands on, resolved by SimpleTuner's own argparse parser
(exact name, alias, unique prefix), and each occurrence's text after `=` (None for a bare `--key`), in order.

Corpora: the three of test_validate_oracle_real_configs.py ((a) SimpleTuner's shipped examples, (b) its
documentation's config.json blocks completed with a minimal run, (c) the generated key combinations), and (d)
every value spelling for each key SimpleTuner's legacy handlers (`cli_utils._LEGACY_ARG_HANDLERS`) rewrite.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from test_validate_oracle_real_configs import BASE_CONFIG, SPELLINGS, _doc_blocks, _generated_runs

from lcm_plugin.config.argv import examples_root, map_config

LEGACY_HANDLED = [
    "vae_cache_preprocess", "save_total_limit", "validation_steps", "checkpointing_steps", "aspect_ratio_bucketing",
    "aspect_ratio_bucket_min", "repeats", "ez_model_type",
]


def shipped_examples() -> list[tuple[str, dict]]:
    configs = []
    for example in sorted(examples_root().glob("*/config.json")):
        with contextlib.suppress(json.JSONDecodeError):  # SimpleTuner refuses the file before any mapping
            configs.append((f"(a) {example.parent.name}", json.loads(example.read_text())))
    assert len(configs) > 100  # the wheel's examples folder was found
    return configs


def documentation_blocks() -> list[tuple[str, dict]]:
    blocks = [block for block in _doc_blocks()["blocks"] if block["kind"] == "config"]
    return [(f"(b) {block['path']}:{block['line']}", {**BASE_CONFIG, **block["block"]}) for block in blocks]


def generated_runs() -> list[tuple[str, dict]]:
    return [(f"(c) {label}", config) for label, config, _ in _generated_runs()]


def legacy_spellings() -> list[tuple[str, dict]]:
    values = [*SPELLINGS, " 5 ", "  ", 2.5, "config/examples/x"]
    return [(f"(d) {key}={value!r}", {key: value}) for key in LEGACY_HANDLED for value in values]


@pytest.fixture(scope="module")
def landing():
    """`--name` -> the dest SimpleTuner's parser matches (exact, alias or unique prefix), or None."""
    from simpletuner.helpers.configuration.cmd_args import get_argument_parser

    parser = get_argument_parser()

    def dest(name: str) -> str | None:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse prints usage before refusing a prefix
            try:
                found = parser._parse_optional("--" + name)
            except SystemExit:  # an ambiguous prefix
                return None
        return found[0].dest if found and found[0] is not None else None

    return dest


def simpletuners_landing(key: str, value, dest) -> list[tuple[str, list[str | None]]]:
    """normalize_args({key: value}) as [(option, [text per occurrence])], consecutive occurrences grouped."""
    from simpletuner.helpers.configuration.json_file import normalize_args

    grouped: list[tuple[str, list[str | None]]] = []
    for argument in normalize_args({key: value}):
        name, equals, text = argument.removeprefix("--").partition("=")
        option = dest(name) or name
        if grouped and grouped[-1][0] == option:
            grouped[-1][1].append(text if equals else None)
        else:
            grouped.append((option, [text if equals else None]))
    return grouped


def our_landing(key: str, value, dest) -> list[tuple[str, list[str | None]]]:
    return [(dest(passed.option) or passed.option, list(passed.texts)) for passed in map_config({key: value})[0]]


@pytest.mark.parametrize(
    "corpus", [shipped_examples, documentation_blocks, generated_runs, legacy_spellings], ids=lambda c: c.__name__
)
def test_each_key_reaches_the_parser_as_simpletuner_maps_it(corpus, landing, capsys):
    compared, differences = 0, []
    for label, config in corpus():
        for key, value in config.items():
            ours, theirs = our_landing(key, value, landing), simpletuners_landing(key, value, landing)
            compared += 1
            if ours != theirs:
                differences.append(f"{label}: {key}={value!r}: SimpleTuner passes {theirs}, map_config {ours}")
    with capsys.disabled():
        print(f"\n[argv oracle] {corpus.__name__}: {compared} keys compared, {len(differences)} differences")
    assert compared > 10
    assert not differences, "\n".join(differences[:40])
