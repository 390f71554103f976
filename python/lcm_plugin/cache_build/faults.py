"""Fault points for the crash and rank-agreement tests, off unless asked for.

`LCM_CACHE_BUILD_FAULT=<point>:<n>` makes the build SIGKILL itself the n-th time (1-based) it reaches `<point>`,
or any point when `<point>` is `*`. `<n>` = 0 only counts (`hits`), which the crash tests
(tests/integration/test_cache_build_kill.py) use to draw kill points within a build.
`LCM_CACHE_BUILD_RAISE=<point>:<n>` makes it raise `InjectedFault` there instead: an error the build does not
expect, on the one rank whose environment asks for it (tests/integration/test_rank_agreement.py).

Points, in build order: `checks` (the first rank's checks of the existing caches, before the other ranks encode),
`encoded` (a VAE batch or a caption chunk encoded, nothing of it stored), `put` (one entry queued; the store seals
a shard when its size is reached), `pt` (a SimpleTuner-format file written, its record not yet queued), `commit`
(before a writer seals its pending entries), `manifest` (before manifest.json is replaced), `buckets` (between
SimpleTuner's two bucket files). A kill -9 at a random time covers the points in between, inside the Rust store's
shard and index writes included.
"""

from __future__ import annotations

import os
import signal

KILL, RAISE = "LCM_CACHE_BUILD_FAULT", "LCM_CACHE_BUILD_RAISE"

hits: dict[str, int] = {}  # times each point (and "*", any) was reached while either variable was set


class InjectedFault(RuntimeError):
    """The error `LCM_CACHE_BUILD_RAISE` asks for."""


def fault_point(point: str) -> None:
    kill, fail = os.environ.get(KILL), os.environ.get(RAISE)
    if not (kill or fail):
        return
    for counted in (point, "*"):
        hits[counted] = hits.get(counted, 0) + 1
    if _due(kill, point):
        os.kill(os.getpid(), signal.SIGKILL)
    if _due(fail, point):
        raise InjectedFault(f"{RAISE}={fail}: fault injected at point {point!r}")


def _due(spec: str | None, point: str) -> bool:
    """Whether `spec` (`<point>:<n>`) asks for a fault now, at this hit of `point`."""
    if not spec:
        return False
    name, _, count = spec.rpartition(":")
    return name in (point, "*") and hits[name] == int(count)
