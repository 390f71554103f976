"""What the packed-source oracle tests (test_webshart_oracle, test_hf_oracle) share: our reader's listing of an
entry, and the stand-in for SimpleTuner's TrainingSample in its metadata backends."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

FILE = "config/multidatabackend.json"  # the entry's file, as messages name it


def listed(open_source, root: Path, entry: dict, **options):
    """(reader, listing) of `entry` as entry 0 of FILE, opened by `open_source` (webshart_source, hf_source) on a
    copy of it, in the run folder `root`."""
    source = open_source(json.loads(json.dumps(entry)), 0, FILE, root, **options)
    return source, source.listing()


class Geometry:
    """Stands in for TrainingSample: the bucketer's geometry is judged in test_bucketing_oracle; here, the size."""

    def __init__(self, **_):
        pass

    def prepare(self):
        return SimpleNamespace(aspect_ratio=1.0, intermediary_size=(1, 1), crop_coordinates=(0, 0), target_size=(1, 1))
