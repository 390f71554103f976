"""cache_build.fill.FetchWindow: which S3 fetches the build has started when it takes each batch (hand-counted)."""

from __future__ import annotations

from lcm_plugin.cache_build.fill import FETCH_AHEAD_OBJECTS, FetchWindow


def test_fetches_run_a_window_of_objects_ahead_and_skip_batches_with_nothing_to_fetch():
    assert FETCH_AHEAD_OBJECTS == 64  # the counts below are worked out for this window
    # VAE batches of 4 objects, two batches with nothing to fetch (local, or already cached), larger batches
    sizes = [4] * 20 + [0, 0] + [40, 40, 40] + [4]
    started: list[int] = []

    def fetch(index: int) -> str:
        started.append(index)
        return f"future {index}"

    window = FetchWindow(sizes, fetch)
    expected_starts = {
        0: list(range(16)),  # 16 batches of 4: 64 objects in flight
        1: [16], 2: [17], 3: [18], 4: [19],  # each batch taken makes room for the next one
        5: [22],  # 60 in flight: the next batch with objects starts, though it overshoots the window (100)
        15: [23],  # batches 6..14 taken: 20 + 40 = 60 in flight
        23: [24],  # 22 taken: 40 (batch 23's) in flight
        24: [25],
    }
    for index in range(len(sizes)):
        before = len(started)
        future = window.take(index)
        assert future == (f"future {index}" if sizes[index] else None), index
        assert started[before:] == expected_starts.get(index, []), index
    assert started == [i for i, size in enumerate(sizes) if size]  # each once, in order
