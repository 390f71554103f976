"""Extract the config.json and multidatabackend.json examples from SimpleTuner's documentation.

    .venv/bin/python scripts/extract_simpletuner_doc_configs.py GIT_DIR [--commit REV] \
        [--output tests/fixtures/simpletuner_docs/blocks.json]

GIT_DIR is a clone (or bare mirror) of github.com/bghira/SimpleTuner. Every ```json block of
`documentation/**/*.md` (English pages; the translations repeat the same blocks) that parses as JSON and
looks like one of the two files is written to the fixture with the upstream commit, path and line it came
from. The validate oracle test (tests/integration/test_validate_oracle_real_configs.py) replays them
offline: CI has no network.

A block is a config.json when it is an object most of whose keys are SimpleTuner options (the committed
catalogue, `python/lcm_plugin/config/simpletuner_keys.json`); a multidatabackend.json when it is a list of
objects, or one object, carrying a dataset's `id`/`dataset_type`/`instance_data_dir`. Documentation blocks
are often fragments: the oracle completes each with a minimal run before judging it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / "python" / "lcm_plugin" / "config" / "simpletuner_keys.json"
DEFAULT_OUTPUT = ROOT / "tests" / "fixtures" / "simpletuner_docs" / "blocks.json"
TRANSLATION = re.compile(r"\.(es|hi|ja|pt-BR|zh)\.md$")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```json[ \t]*\n(?P<body>.*?)^(?P=indent)```", re.MULTILINE | re.DOTALL)
DATASET_MARKERS = {"id", "dataset_type", "instance_data_dir"}


def git(git_dir: Path, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", str(git_dir), *args], check=True, capture_output=True, text=True).stdout


def classify(block, options: set[str]) -> str | None:
    """"config", "multidatabackend" or None (API payloads, lycoris and webhook configs, other JSON)."""
    if isinstance(block, list) and block and all(isinstance(item, dict) for item in block):
        return "multidatabackend" if all(DATASET_MARKERS & item.keys() for item in block) else None
    if not isinstance(block, dict) or not block:
        return None
    if "id" in block and (block.keys() - {"id"}) & (DATASET_MARKERS | {"type"}):
        return "multidatabackend"
    known = sum(key.removeprefix("--") in options for key in block)
    return "config" if known * 2 > len(block) else None


def extract(git_dir: Path, commit: str) -> dict:
    options = set(json.loads(CATALOGUE.read_text())["keys"])
    pages = [
        path
        for path in git(git_dir, "ls-tree", "-r", "--name-only", commit, "documentation").splitlines()
        if path.endswith(".md") and not TRANSLATION.search(path)
    ]
    blocks, unparsable, other = [], 0, 0
    for path in sorted(pages):
        text = git(git_dir, "show", f"{commit}:{path}")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 2  # first line inside the fence
            body = "\n".join(row.removeprefix(match["indent"]) for row in match["body"].splitlines())
            try:
                block = json.loads(body)
            except json.JSONDecodeError:
                unparsable += 1  # comments, "...", trailing commas: not a file anyone could run
                continue
            kind = classify(block, options)
            if kind is None:
                other += 1
                continue
            blocks.append({"path": path, "line": line, "kind": kind, "block": block})
    return {
        "source": "https://github.com/bghira/SimpleTuner",
        "commit": commit,
        "skipped": {"not_json": unparsable, "not_a_config": other},
        "blocks": blocks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("git_dir", type=Path, help="a clone's .git folder or a bare mirror of SimpleTuner")
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    git_dir = args.git_dir / ".git" if (args.git_dir / ".git").is_dir() else args.git_dir
    commit = git(git_dir, "rev-parse", args.commit).strip()
    result = extract(git_dir, commit)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    kinds = [block["kind"] for block in result["blocks"]]
    print(
        f"{args.output}: {kinds.count('config')} config.json and {kinds.count('multidatabackend')} "
        f"multidatabackend.json blocks from {commit[:12]}; skipped {result['skipped']}"
    )


if __name__ == "__main__":
    main()
