"""Sample quality against a reference sampler, with its noise floor and an interval (issue 10; docs/quality.md).

One implementation for the demo, the benchmark and the in-training check. numpy only: callers pass
uint8 images [N, H, W, 3] (or features they computed with `image_features`).

Protocol:
- the reference is the teacher's many-step sampler on noise R;
- every evaluated sampler draws from noise independent of R, so the comparison does not favour deterministic
  samplers that track the reference sample by sample;
- the floor is the reference sampler itself on such independent noise. Each set is scored by the Fréchet
  distance (FD) of its features to the reference's. A finite-sample FD is positive and biased upwards even
  between identical distributions, by an amount that depends on the sample sizes. So a row is read against
  the floor at the same sizes, never against 0;
- all sets hold one sample per prompt of one prompt list, in the same order (sample i of each set shares
  its prompt), so conditioning mixes match exactly and only the sampler differs;
- the floor's interval is the 2.5-97.5 % range of the FD after swapping each pair (reference[i], floor[i])
  at random: a permutation null, the FDs a sampler that matches the reference produces. A row above that
  range is measurably worse than the reference; one inside it (or below) is not distinguishable from it;
- a row's own interval is its FD +/- 1.96 bootstrap standard deviations, resampling the pairs
  (row[i], reference[i]). Near the floor the bootstrap overstates the spread (the FD is degenerate there),
  so that interval is conservative. The verdict uses the floor's range.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

INTERVAL_Z = 1.96
RESAMPLES = 200


def _cell_means(images: np.ndarray, grid: int) -> np.ndarray:
    n, height, width, channels = images.shape
    if height % grid or width % grid:
        raise ValueError(f"image size {height}x{width} is not a multiple of the {grid}x{grid} feature grid")
    cells = images.reshape(n, grid, height // grid, grid, width // grid, channels).astype(np.float64)
    return cells.mean(axis=(2, 4)).reshape(n, -1)


def thumbnail_features(images: np.ndarray, grid: int = 4) -> np.ndarray:
    """uint8 [N, H, W, 3] -> [N, grid * grid * 3]: the mean colour (0-255) of each cell of a grid x grid split."""
    return _cell_means(images, grid)


def colour_histogram_features(images: np.ndarray, bins: int = 8) -> np.ndarray:
    """uint8 [N, H, W, 3] -> [N, 3 * bins]: per channel, the share of pixels in each of `bins` equal
    intensity ranges, times 255 so that a share has the scale of a pixel value."""
    n = images.shape[0]
    index = (images.reshape(n, -1, 3).astype(np.int64) * bins) // 256  # [N, P, 3] bin of each pixel value
    # One bincount over all images: bin id (image * 3 + channel) * bins + bin.
    index += bins * (np.arange(3) + 3 * np.arange(n)[:, None, None])
    counts = np.bincount(index.ravel(), minlength=n * 3 * bins).reshape(n, 3 * bins)
    return 255.0 * counts / index.shape[1]


GRADIENT_BIN_EDGES = (4, 8, 16, 32, 64, 128, 256)


def gradient_histogram_features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> [N, 8]: the share of pixels (times 255) whose gradient |dx| + |dy|, summed over
    channels, falls below 4, in [4, 8), [8, 16), ... [128, 256) or at 256 and above: how sharp the image is,
    wherever its edges are."""
    pixels = images.astype(np.int64)
    dx = np.abs(np.diff(pixels, axis=2)).sum(axis=3)[:, :-1, :]
    dy = np.abs(np.diff(pixels, axis=1)).sum(axis=3)[:, :, :-1]
    index = np.searchsorted(np.array(GRADIENT_BIN_EDGES), (dx + dy).reshape(len(images), -1), side="right")
    bins = len(GRADIENT_BIN_EDGES) + 1
    index += bins * np.arange(len(images))[:, None]
    counts = np.bincount(index.ravel(), minlength=len(images) * bins).reshape(len(images), bins)
    return 255.0 * counts / index.shape[1]


def image_features(images: np.ndarray) -> np.ndarray:
    """The metric's features: uint8 [N, H, W, 3] -> [N, 32]; colour distribution (3 x 8-bin histograms, 24)
    and sharpness (8-bin gradient histogram). Both ignore where things are in the image, see docs/quality.md."""
    return np.concatenate([colour_histogram_features(images), gradient_histogram_features(images)], axis=1)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance between Gaussians fitted to two feature sets [N, D] (unbiased covariances):
    |mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a^1/2 S_b S_a^1/2)^1/2).
    """
    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(features_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(features_b, rowvar=False))
    eigenvalues, eigenvectors = np.linalg.eigh(cov_a)
    root_a = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
    # Symmetric PSD product: real, non-negative eigenvalues up to round-off, which the clip removes.
    cross = root_a @ cov_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((cross + cross.T) / 2.0), 0.0, None)).sum()
    trace = np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root
    return float(np.sum((mu_a - mu_b) ** 2) + max(trace, 0.0))


@dataclass(frozen=True)
class Estimate:
    """A value and its 95 % interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """One evaluated sampler against the reference: its FD and the floor's, both to the reference."""

    fd: Estimate
    floor: Estimate

    @property
    def above_floor(self) -> bool:
        """True when the sampler is measurably worse than the reference sampler: its FD lies beyond the floor's
        interval, which a sampler of the reference's distribution exceeds 2.5 % of the time."""
        return self.fd.value > self.floor.high


def floor_estimate(reference: np.ndarray, floor: np.ndarray, *, resamples: int, rng: np.random.Generator) -> Estimate:
    """FD(floor, reference) with the 2.5-97.5 % range of the FD after swapping each pair (reference[i], floor[i])
    with probability 1/2: the permutation null of two sets drawn by one sampler with the same conditioning."""
    splits = np.empty(resamples)
    for b in range(resamples):
        swap = rng.random(len(reference)) < 0.5
        splits[b] = frechet_distance(np.where(swap[:, None], reference, floor), np.where(swap[:, None], floor, reference))
    low, high = np.percentile(splits, [2.5, 97.5])
    return Estimate(frechet_distance(floor, reference), float(low), float(high))


def fd_estimate(features: np.ndarray, reference: np.ndarray, *, resamples: int, rng: np.random.Generator) -> Estimate:
    """FD(features, reference) +/- 1.96 bootstrap standard deviations, low clipped at 0. A replicate resamples
    the pairs (features[i], reference[i]), so both sides keep one conditioning mix."""
    replicates = np.empty(resamples)
    for b in range(resamples):
        index = rng.integers(0, len(features), len(features))
        replicates[b] = frechet_distance(features[index], reference[index])
    value = frechet_distance(features, reference)
    half_width = INTERVAL_Z * float(np.std(replicates, ddof=1))
    return Estimate(value, max(value - half_width, 0.0), value + half_width)


def compare_to_reference(
    reference: np.ndarray,
    floor: np.ndarray,
    evaluated: Mapping[str, np.ndarray],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, Comparison]:
    """Score each evaluated feature set [N, D] against `reference` [N, D], beside the floor [N, D].

    `floor` holds the reference sampler's features on noise independent of the reference's. Sample i of every
    set must share its conditioning (prompt) with sample i of the reference: the resampling keeps pairs together,
    so conditioning mixes stay matched and only the sampler differs. Resampling draws from `seed`.
    """
    if reference.ndim != 2 or reference.shape != floor.shape:
        raise ValueError(
            f"reference {reference.shape} and floor {floor.shape} must be feature sets [N, D] of one shape, "
            "sample i of each drawn with the same prompt"
        )
    for label, features in evaluated.items():
        if features.shape != reference.shape:
            raise ValueError(
                f"{label!r} has features {features.shape} but the reference has {reference.shape}: evaluate every "
                "sampler on the reference's prompts, one sample each"
            )
    if resamples < 2:
        raise ValueError(f"resamples must be at least 2 for an interval, got {resamples}")

    rng = np.random.default_rng(seed)
    floor_value = floor_estimate(reference, floor, resamples=resamples, rng=rng)
    return {
        label: Comparison(fd_estimate(features, reference, resamples=resamples, rng=rng), floor_value)
        for label, features in evaluated.items()
    }
