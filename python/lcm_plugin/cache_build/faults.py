"""Kill points for the crash tests (tests/integration/test_cache_build_kill.py), off unless asked for.

`LCM_CACHE_BUILD_FAULT=<point>:<n>` makes the build SIGKILL itself the n-th time (1-based) it reaches `<point>`,
or any point when `<point>` is `*`. `<n>` = 0 only counts (`hits`), which the crash tests use to
draw kill points within a build. Points, in build order: `encoded` (a VAE batch encoded, nothing of it
stored), `put` (one entry queued; the store seals a shard when its size is reached), `pt` (a SimpleTuner-format
file written, its record not yet queued), `commit` (before a writer seals its pending entries), `manifest`
(before manifest.json is replaced), `buckets` (between SimpleTuner's two bucket files). A kill -9 at a random
time covers the points in between, inside the Rust store's shard and index writes included.
"""

from __future__ import annotations

import os
import signal

hits: dict[str, int] = {}  # times each point (and "*", any) was reached while the variable was set


def fault_point(point: str) -> None:
    spec = os.environ.get("LCM_CACHE_BUILD_FAULT")
    if not spec:
        return
    name, _, count = spec.rpartition(":")
    for counted in (point, "*"):
        hits[counted] = hits.get(counted, 0) + 1
    if name in (point, "*") and hits[name] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
