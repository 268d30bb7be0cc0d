"""Statistics for the evaluation: trapezoid AUC, the detector's ROC-AUC, bootstrap resampling over examples,
CI helpers.

Everything is deterministic given a seed: the bootstrap generator is numpy's PCG64 seeded from a hash
of (config seed, purpose), so a resumed evaluation reproduces its confidence intervals bit for bit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch


def trapezoid_auc(x: Sequence[float], y) -> np.ndarray | float:
    """Area under y(x) by the trapezoid rule over the last axis of y (x ascending).

    Unnormalised (the reference's convention): a constant score s over [0, 0.16] has AUC 0.16 s.
    A single point has area 0.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or y.shape[-1] != x.shape[0]:
        raise ValueError(f"trapezoid_auc: x has {x.shape}, y has {y.shape}")
    if np.any(np.diff(x) < 0):
        raise ValueError("trapezoid_auc: x must be ascending")
    if x.shape[0] < 2:
        out = np.zeros(y.shape[:-1])
    else:
        out = (np.diff(x) * (y[..., 1:] + y[..., :-1]) / 2.0).sum(axis=-1)
    return float(out) if out.ndim == 0 else out


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """ROC-AUC of `scores` for the `positive` entries (Mann–Whitney, ties counted half); None unless both
    classes occur. Non-finite scores rank highest (a non-finite entry is always gated)."""
    import torch  # here, not at the top: the other statistics are numpy's, read by commands without torch

    positive = positive.to(torch.bool).flatten()
    p, n = int(positive.sum()), int((~positive).sum())
    if not p or not n:
        return None
    s = torch.nan_to_num(scores.double().flatten(), nan=float("inf"))
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # ranks (0-based) of each distinct value's first entry
    mid = first.double() + (counts.double() - 1) / 2 + 1  # average 1-based rank of ties
    ranks = mid[inverse]
    return float((ranks[positive].sum() - p * (p + 1) / 2) / (p * n))


def bootstrap_indices(n: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """[samples, n] example indices drawn with replacement."""
    if n <= 0:
        raise ValueError("bootstrap over zero examples")
    return rng.integers(0, n, size=(samples, n))


def resampled_means(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Means over resampled rows: x [n, ...], idx [B, n] -> [B, ...]."""
    return x[idx].mean(axis=1)


def percentile_ci(samples, alpha: float = 0.05, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval (alpha/2, 1 - alpha/2) of bootstrap samples along `axis`."""
    s = np.asarray(samples, dtype=np.float64)
    lo, hi = np.percentile(s, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=axis)
    return lo, hi


def mean_ci(values: Sequence[float], seed: int = 0, samples: int = 2000, alpha: float = 0.05) -> list[float] | None:
    """Percentile bootstrap CI of the mean of a few independent units (runs, pairs), resampled with
    replacement; None below two units."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    means = resampled_means(x, bootstrap_indices(x.size, samples, np.random.default_rng(seed)))
    lo, hi = percentile_ci(means, alpha)
    return [float(lo), float(hi)]


def wilson_ci(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (well behaved at 0 and n)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(point_a: float, point_b: float, samples_a, samples_b, n: int,
                      alpha: float = 0.05) -> dict:
    """Paired bootstrap summary of a − b, where both sample arrays come from the same resamples."""
    d = np.asarray(samples_a, dtype=np.float64) - np.asarray(samples_b, dtype=np.float64)
    lo, hi = percentile_ci(d, alpha)
    return {"diff": float(point_a - point_b), "ci_low": float(lo), "ci_high": float(hi), "n": int(n),
            "samples": int(d.shape[0]), "frac_samples_le_0": float(np.mean(d <= 0))}


def ratio_ci(num_point: float, den_point: float, num_samples, den_samples, alpha: float = 0.05) -> dict:
    """Point value and percentile CI of num / den over paired resamples (resamples with den = 0 left out;
    null where the point denominator is 0)."""
    if den_point == 0:
        return {"value": None, "ci_low": None, "ci_high": None}
    n, d = np.asarray(num_samples, dtype=np.float64), np.asarray(den_samples, dtype=np.float64)
    ok = d != 0
    r = n[ok] / d[ok]
    if not r.size:
        return {"value": float(num_point / den_point), "ci_low": None, "ci_high": None}
    lo, hi = np.percentile(r, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"value": float(num_point / den_point), "ci_low": float(lo), "ci_high": float(hi)}


def to_list(a) -> list:
    """Plain Python floats (JSON) from an array."""
    return [float(v) for v in np.asarray(a, dtype=np.float64).ravel()]
