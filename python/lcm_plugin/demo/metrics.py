"""The demo table's paired measure; its distribution metric is lcm_plugin.quality (docs/quality.md).

For deterministic samplers, the distance of each sample to the teacher's 50-step ODE endpoint from the same
noise and prompt: what consistency distillation trains a 1-step student to hit. Distance to real data is not
used: it rewards any few-step LCM sampling, distilled or not (NOTES.md "Measuring LCM quality on a CPU").
"""

from __future__ import annotations

import numpy as np


def endpoint_distance(images: np.ndarray, endpoints: np.ndarray) -> float:
    """Mean over samples of the RMS pixel difference (0-255) between paired images [N, H, W, 3]."""
    diff = images.astype(np.float64) - endpoints.astype(np.float64)
    return float(np.sqrt((diff**2).reshape(len(diff), -1).mean(axis=1)).mean())
