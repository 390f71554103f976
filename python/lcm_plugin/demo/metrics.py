"""Distribution metrics for the demo table, chosen to measure the distillation rather than the sampler.

NOTES.md "Measuring LCM quality on a CPU": distance to real data rewards any few-step LCM sampling,
distilled or not, so every number here is against the *teacher's* many-step samples:
- Fréchet distance between Gaussian fits of simple image features (4x4 RGB thumbnails) of many
  samples, the FID recipe without an Inception network;
- for deterministic samplers, the distance of each sample to the teacher's 50-step ODE endpoint from
  the same noise and prompt (what consistency distillation trains a 1-step student to hit).
"""

from __future__ import annotations

import numpy as np

THUMBNAIL = 4


def thumbnail_features(images: np.ndarray, size: int = THUMBNAIL) -> np.ndarray:
    """uint8 images [N, H, W, 3] -> float64 [N, size * size * 3]: mean colour of each cell of a size x size grid."""
    n, height, width, channels = images.shape
    if height % size or width % size:
        raise ValueError(f"image size {height}x{width} is not a multiple of the {size}x{size} thumbnail grid")
    cells = images.reshape(n, size, height // size, size, width // size, channels).astype(np.float64)
    return cells.mean(axis=(2, 4)).reshape(n, -1)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance between Gaussians fitted to two feature sets [N, D]:
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).
    """
    from scipy import linalg

    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(features_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(features_b, rowvar=False))
    cross = linalg.sqrtm(cov_a @ cov_b)
    # sqrtm of a product of PSD matrices is real up to round-off; a tiny imaginary part is noise.
    trace = np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(np.real(cross))
    return float(np.sum((mu_a - mu_b) ** 2) + max(trace, 0.0))


def endpoint_distance(images: np.ndarray, endpoints: np.ndarray) -> float:
    """Mean over samples of the RMS pixel difference (0-255) between paired images [N, H, W, 3]."""
    diff = images.astype(np.float64) - endpoints.astype(np.float64)
    return float(np.sqrt((diff**2).reshape(len(diff), -1).mean(axis=1)).mean())
