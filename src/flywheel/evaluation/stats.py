"""Paired bootstrap for "is the candidate round better than the baseline?".

Images of both rounds are generated from the same held-out prompts and seeds, so each (prompt, seed) key
gives a paired difference; resampling keys (not images) keeps the pairing. The verdict is a plain
word backed by the interval: better / worse / no_significant_change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Comparison:
    baseline: float
    candidate: float
    difference: float  # improvement: candidate - baseline, or baseline - candidate where lower is better
    low: float  # bootstrap percentile interval of the difference
    high: float
    n: int

    @property
    def verdict(self) -> str:
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "no_significant_change"


def paired_bootstrap(
    baseline: dict[str, float], candidate: dict[str, float], *, higher_is_better: bool = True,
    resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
) -> Comparison:
    """Compare per-key values present in both dicts (keys: 'prompt|seed'); NaNs are dropped pairwise."""
    keys = sorted(k for k in baseline.keys() & candidate.keys()
                  if np.isfinite(baseline[k]) and np.isfinite(candidate[k]))
    if not keys:
        nan = float("nan")
        return Comparison(nan, nan, nan, nan, nan, 0)
    b = np.array([baseline[k] for k in keys], dtype=np.float64)
    c = np.array([candidate[k] for k in keys], dtype=np.float64)
    diff = (c - b) if higher_is_better else (b - c)  # positive always means "candidate improved"
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(keys), size=(resamples, len(keys)))
    means = diff[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Comparison(float(b.mean()), float(c.mean()), float(diff.mean()), float(low), float(high), len(keys))
