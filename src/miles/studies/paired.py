"""Paired comparisons over seeds: the mean difference, its spread and an exact sign-flip test.

Two methods trained with the same seeds start from the same weights and see the same batches, so
their per-seed differences are paired. Under the null hypothesis (no difference), each
difference is as likely to have either sign; the *exact* two-sided sign-flip permutation test
enumerates all ``2^n`` sign assignments and counts those whose mean difference is at least as far
from 0 as the observed one. No distribution is assumed and nothing is approximated.

With ``n`` seeds the smallest p-value the test can give is ``2 / 2^n`` (every seed agreeing in
sign): ``0.0625`` for 5 seeds, ``0.031`` for 6. :func:`significance_level` therefore marks a
result at ``max(0.05, 2 / 2^n)``: with 5 seeds, only a difference every seed agrees on; with fewer
than 5, nothing (``2 / 2^n`` would be 0.125 or more).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "LOWEST_LEVEL",
    "MAX_EXACT",
    "PairedTest",
    "paired_test",
    "sign_flip_p",
    "significance_level",
]

#: the largest number of pairs enumerated exactly (2^20 sign assignments)
MAX_EXACT = 20


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Exact two-sided p-value of the paired sign-flip permutation test on ``diffs``.

    ``p = #{s in {-1, 1}^n : |mean(s * d)| >= |mean(d)|} / 2^n``, ties included (a relative
    tolerance of 1e-9 absorbs rounding). NaN for no pairs.

    Raises:
        ValueError: more than :data:`MAX_EXACT` pairs (the enumeration would be too large) or a
            non-finite difference.
    """
    d = np.asarray(diffs, dtype=np.float64)
    n = d.size
    if n == 0:
        return math.nan
    if n > MAX_EXACT:
        raise ValueError(f"the exact test enumerates 2^n sign flips; n = {n} > {MAX_EXACT}")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"differences must be finite, got {d.tolist()}")
    signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1)
    sums = np.abs(signs @ d)
    observed = abs(float(d.sum()))
    tol = 1e-9 * max(float(np.abs(d).sum()), 1e-300)
    return float(np.count_nonzero(sums >= observed - tol)) / 2**n


#: the largest "smallest possible p" accepted as a marking level (5 pairs: 2 / 32)
LOWEST_LEVEL = 0.0625


def significance_level(n: int, alpha: float = 0.05) -> float:
    """The level a result is marked at: ``alpha``, raised to the smallest p ``n`` pairs can
    reach as long as that is at most :data:`LOWEST_LEVEL` (5 or more pairs); with fewer pairs
    nothing can be marked."""
    floor = 2.0 / 2**n if n > 0 else math.inf
    return max(alpha, floor) if floor <= LOWEST_LEVEL else alpha


@dataclass(frozen=True)
class PairedTest:
    """``a - b`` over paired seeds: mean, sample std, n, exact p and whether it is marked."""

    n: int
    mean: float
    std: float
    p: float
    level: float
    seeds: tuple[Any, ...]
    diffs: tuple[float, ...]

    @property
    def significant(self) -> bool:
        return self.n > 0 and self.p <= self.level

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"significant": self.significant}


def paired_test(a: dict[Any, float], b: dict[Any, float], *, alpha: float = 0.05) -> PairedTest:
    """Compare ``a[seed] - b[seed]`` over the seeds both have (missing values are left out)."""
    seeds = tuple(s for s in a if s in b and a[s] is not None and b[s] is not None)
    diffs = tuple(float(a[s]) - float(b[s]) for s in seeds)
    n = len(diffs)
    mean = sum(diffs) / n if n else math.nan
    std = float(np.std(diffs, ddof=1)) if n > 1 else (0.0 if n else math.nan)
    return PairedTest(n, mean, std, sign_flip_p(diffs), significance_level(n, alpha), seeds, diffs)
