"""Settings shared by every test process."""

from __future__ import annotations

import os


def pytest_configure(config) -> None:
    # Under pytest-xdist each worker gets its share of the cores: torch's intra-op pool would otherwise take
    # every core in every worker, and oversubscribed spin-waits cost more than the parallelism gains.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(session, config, items) -> None:
    # The integration modules start stock trainers (about a minute each): they run first, so that the two workers end
    # on short unit tests rather than one worker holding the suite's last minutes with a trainer module alone.
    items.sort(key=lambda item: "integration" not in item.path.parts)
