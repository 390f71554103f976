"""One problem found in a config file, and its one-line rendering shared by the CLI and the trainer."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """A finding at `pointer` (RFC 6901 JSON pointer, "" = whole document) of `file`."""

    file: str
    pointer: str
    message: str
    severity: Severity = "error"

    def render(self) -> str:
        """`file: /json/pointer: message`; warnings carry a `warning:` tag before the message."""
        tag = "warning: " if self.severity == "warning" else ""
        return f"{self.file}: {self.pointer or '/'}: {tag}{self.message}"


def pointer(*parts: str | int) -> str:
    """JSON pointer from path parts, escaping `~` and `/` as RFC 6901 says."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest candidate, or "" when none is close."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def has_errors(problems: Iterable[Problem]) -> bool:
    return any(problem.severity == "error" for problem in problems)


def format_problems(problems: Iterable[Problem]) -> str:
    """All problems, errors first, one per line (the `simpletuner-lcm validate` output)."""
    ordered = sorted(problems, key=lambda problem: problem.severity != "error")
    return "\n".join(problem.render() for problem in ordered)
