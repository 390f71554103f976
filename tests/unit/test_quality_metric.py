"""lcm_plugin.quality: FD against closed forms and scipy; the floor protocol on the demo's shapes images."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from lcm_plugin import quality
from lcm_plugin.demo import shapes

SAMPLES = 256


def _with_exact_moments(rng: np.random.Generator, n: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """n points whose sample mean and (n - 1)-normalised covariance are exactly `mean` and `cov`."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance now I
    return z @ np.linalg.cholesky(cov).T + mean


def test_fd_of_one_dimensional_samples_is_the_closed_form():
    # 1-D: W2^2 = (m1 - m2)^2 + (s1 - s2)^2, with the sample moments.
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 2.0, size=(500, 1)), rng.normal(-0.5, 0.7, size=(400, 1))
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert quality.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_fd_of_a_set_to_itself_is_zero_and_a_shift_adds_its_square():
    a = np.random.default_rng(3).normal(size=(200, 4))
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert quality.frechet_distance(a, a + 2.0) == pytest.approx(4 * 4.0, rel=1e-6)


def test_fd_of_large_gaussian_samples_approaches_the_population_value():
    # Sampling noise only: 200k draws per side put the estimate within about 1 % of the population W2^2.
    rng = np.random.default_rng(4)
    s1, s2 = np.array([[1.0, 0.5], [0.5, 2.0]]), np.diag([0.5, 0.5])
    x = rng.multivariate_normal([0.0, 0.0], s1, size=200_000)
    y = rng.multivariate_normal([1.0, 0.0], s2, size=200_000)
    trace_root = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = 1.0 + np.trace(s1) + np.trace(s2) - 2 * trace_root
    assert quality.frechet_distance(x, y) == pytest.approx(expected, rel=0.02)


def test_fd_of_diagonal_gaussians_is_the_closed_form():
    # Commuting covariances: W2^2 = |m1 - m2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    m1, m2 = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, 0.5])
    a, b = np.array([4.0, 1.0, 0.25]), np.array([1.0, 9.0, 0.25])
    x, y = _with_exact_moments(rng, 300, m1, np.diag(a)), _with_exact_moments(rng, 200, m2, np.diag(b))
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert quality.frechet_distance(x, y) == pytest.approx(expected, rel=1e-10)


def test_fd_of_non_commuting_2d_gaussians_is_the_closed_form():
    # For 2x2 PSD M with eigenvalues l1, l2: Tr(M^1/2) = sqrt(l1) + sqrt(l2) = sqrt(Tr M + 2 sqrt(det M)),
    # and S1^1/2 S2 S1^1/2 has the eigenvalues of S1 S2.
    rng = np.random.default_rng(1)
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    m1, m2 = np.array([0.0, 0.0]), np.array([0.3, -0.4])
    x, y = _with_exact_moments(rng, 400, m1, s1), _with_exact_moments(rng, 400, m2, s2)
    trace_root = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = 0.25 + np.trace(s1) + np.trace(s2) - 2 * trace_root
    assert quality.frechet_distance(x, y) == pytest.approx(expected, rel=1e-10)


def test_fd_matches_scipy_sqrtm_on_high_dimensional_features_and_is_symmetric():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 40)) @ rng.normal(size=(40, 40))
    y = rng.normal(size=(500, 40)) @ rng.normal(size=(40, 40)) + 0.5
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    expected = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(cov_x + cov_y - 2 * linalg.sqrtm(cov_x @ cov_y).real)
    assert quality.frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)
    assert quality.frechet_distance(y, x) == pytest.approx(expected, rel=1e-8)


def test_features_by_hand():
    image = np.zeros((1, 8, 8, 3), np.uint8)
    image[0, :, 4:, 0] = 200  # right half red: a vertical edge between columns 3 and 4
    thumbnail = quality.thumbnail_features(image, 2).reshape(2, 2, 3)
    assert thumbnail[:, 0, 0].tolist() == [0, 0] and thumbnail[:, 1, 0].tolist() == [200, 200]
    histogram = quality.colour_histogram_features(image).reshape(3, 8)
    # red: half the pixels in bin 0, half in bin 200 * 8 // 256 = 6; green and blue all in bin 0
    assert histogram[0, 0] == histogram[0, 6] == 127.5 and histogram[1, 0] == 255.0
    # Gradients are taken on the 7x7 pixels with a right and a lower neighbour: the 7 in column 3 step by 200
    # (bin [128, 256), the 7th), the other 42 are flat (bin [0, 4)).
    gradients = quality.gradient_histogram_features(image)[0]
    assert gradients.tolist() == pytest.approx([255 * 42 / 49, 0, 0, 0, 0, 0, 255 * 7 / 49, 0])
    assert quality.image_features(np.zeros((2, 64, 64, 3), np.uint8)).shape == (2, 32)


def test_thumbnail_features_are_the_cell_means_of_a_random_image():
    # A random, non-square image with non-square cells: a swapped row/column or channel order changes values.
    images = np.random.default_rng(0).integers(0, 256, size=(3, 12, 8, 3), dtype=np.uint8)
    features = quality.thumbnail_features(images, 4)
    assert features.shape == (3, 4 * 4 * 3)
    by_hand = [
        images[n, row * 3 : row * 3 + 3, column * 2 : column * 2 + 2, channel].astype(np.float64).mean()
        for n in range(3)
        for row in range(4)
        for column in range(4)
        for channel in range(3)
    ]
    np.testing.assert_allclose(features.ravel(), by_hand, rtol=0, atol=1e-12)


@pytest.mark.parametrize("height, width", [(10, 8), (8, 10), (6, 6)])
def test_thumbnail_features_refuse_sizes_off_the_grid(height, width):
    with pytest.raises(ValueError, match=f"image size {height}x{width} is not a multiple of the 4x4 feature grid"):
        quality.thumbnail_features(np.zeros((1, height, width, 3), np.uint8), 4)


def _shapes(seed: int, n: int = SAMPLES) -> np.ndarray:
    return shapes.sample_images(n, seed)[0]


def _blur(images: np.ndarray) -> np.ndarray:
    # 5x5 box blur with edge padding: a sampler that loses detail but keeps colour and layout.
    padded = np.pad(images.astype(np.float64), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    out = sum(padded[:, i : i + h, j : j + w] for i in range(5) for j in range(5)) / 25
    return out.round().astype(np.uint8)


def _colour_shift(images: np.ndarray) -> np.ndarray:
    shifted = images.astype(np.int64)
    shifted[..., 0] += 20
    return shifted.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def reference_and_floor():
    return quality.image_features(_shapes(1)), quality.image_features(_shapes(2))


def test_same_distribution_scores_at_the_floor_and_degradations_above_it(reference_and_floor):
    reference, floor = reference_and_floor
    fresh = _shapes(3)
    rows = quality.compare_to_reference(reference, floor, {
        "same": quality.image_features(fresh),
        "blurred": quality.image_features(_blur(fresh)),
        "colour shifted": quality.image_features(_colour_shift(fresh)),
    })
    same = rows["same"]
    # The floor's range is unconditional on this reference draw, so a matching set may also fall below it.
    assert same.fd.value <= same.floor.high and not same.above_floor, same
    assert same.fd.low <= same.floor.value <= same.fd.high, same
    for label in ("blurred", "colour shifted"):
        assert rows[label].above_floor and rows[label].fd.low > rows[label].floor.high, (label, rows[label])


def test_the_floor_interval_holds_for_most_independent_draws(reference_and_floor):
    # A 95 % range: of 8 fresh same-distribution sets, at most one may fall outside (P(>= 2 of 8) is about 5 %).
    reference, floor = reference_and_floor
    evaluated = {seed: quality.image_features(_shapes(seed)) for seed in range(10, 18)}
    rows = quality.compare_to_reference(reference, floor, evaluated, resamples=100)
    assert sum(not row.above_floor for row in rows.values()) >= 7, rows


def test_the_intervals_shrink_with_more_samples():
    def widths(n: int):
        reference, floor = (quality.image_features(_shapes(seed, n)) for seed in (4, 5))
        blurred = quality.image_features(_blur(_shapes(6, n)))
        row = quality.compare_to_reference(reference, floor, {"blurred": blurred}, resamples=100)["blurred"]
        return row.floor.high - row.floor.low, row.fd.high - row.fd.low

    small, large = widths(128), widths(512)
    # Spreads fall as 1 / sqrt(n) or faster: four times the samples, at most about half the width.
    assert large[0] < 0.7 * small[0] and large[1] < 0.7 * small[1], (small, large)


def test_sets_of_other_sizes_are_refused(reference_and_floor):
    reference, floor = reference_and_floor
    with pytest.raises(ValueError, match="'short' has features .* the reference's prompts, one sample each"):
        quality.compare_to_reference(reference, floor, {"short": floor[:10]})
    with pytest.raises(ValueError, match=r"reference \(256, 32\) and floor \(10, 32\) must be feature sets"):
        quality.compare_to_reference(reference, floor[:10], {})
    with pytest.raises(ValueError, match="resamples must be at least 2"):
        quality.compare_to_reference(reference, floor, {"same": floor}, resamples=1)
