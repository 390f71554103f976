"""lcm_plugin.demo.metrics against hand computation (the FD metric is tested in test_quality_metric.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lcm_plugin.demo import metrics


def test_endpoint_distance_is_mean_per_sample_rms():
    x = np.zeros((2, 2, 2, 3), np.uint8)
    y = x.copy()
    y[0] = 10  # sample 0: RMS 10; sample 1: RMS 0
    y[1, 0, 0, 0] = 12  # sample 1: sqrt(144 / 12)
    assert metrics.endpoint_distance(x, y) == pytest.approx((10 + np.sqrt(12.0)) / 2)
