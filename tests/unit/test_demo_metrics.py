"""lcm_plugin.demo.metrics against hand computation, closed forms and scipy/numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from lcm_plugin.demo import metrics


def test_thumbnail_features_are_cell_means():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    features = metrics.thumbnail_features(images, size=4)
    assert features.shape == (3, 48)
    # Cell (row 1, column 2) of image 2, channel 1: the mean of its 2x2 pixel block, by hand.
    block = images[2, 2:4, 4:6, 1].astype(float)
    assert features[2].reshape(4, 4, 3)[1, 2, 1] == pytest.approx(block.mean())


def test_thumbnail_features_reject_sizes_off_the_grid():
    with pytest.raises(ValueError, match="not a multiple"):
        metrics.thumbnail_features(np.zeros((1, 10, 10, 3), np.uint8), size=4)


def test_frechet_distance_of_one_dimensional_gaussians_is_the_closed_form():
    # 1-D: W2^2 = (m1 - m2)^2 + (s1 - s2)^2, with the sample moments.
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 2.0, size=(500, 1)), rng.normal(-0.5, 0.7, size=(400, 1))
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_a_direct_scipy_formula_and_is_symmetric():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + 0.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Symmetric form: Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2).
    root_a = linalg.sqrtm(cov_a).real
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(root_a @ cov_b @ root_a).real)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert metrics.frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_a_set_to_itself_is_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 4))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert metrics.frechet_distance(a, a + 2.0) == pytest.approx(4 * 4.0, rel=1e-6)


def test_endpoint_distance_is_mean_per_sample_rms():
    x = np.zeros((2, 2, 2, 3), np.uint8)
    y = x.copy()
    y[0] = 10  # sample 0: RMS 10; sample 1: RMS 0
    y[1, 0, 0, 0] = 12  # sample 1: sqrt(144 / 12)
    assert metrics.endpoint_distance(x, y) == pytest.approx((10 + np.sqrt(12.0)) / 2)
