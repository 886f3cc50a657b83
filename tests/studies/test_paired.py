"""The paired comparison over seeds: the exact sign-flip test against a brute-force count."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from miles.studies.paired import (
    MAX_EXACT,
    paired_test,
    sign_flip_p,
    significance_level,
)


def brute_force(diffs: list[float]) -> float:
    observed = abs(sum(diffs))
    hits = sum(
        abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= observed - 1e-12
        for signs in itertools.product((1, -1), repeat=len(diffs))
    )
    return hits / 2 ** len(diffs)


def test_known_values() -> None:
    assert sign_flip_p([1.0, 2.0, 3.0, 4.0, 5.0]) == 2 / 32  # every seed agrees: the minimum
    assert sign_flip_p([-0.5, -0.1, -2.0, -0.3, -1.0]) == 2 / 32
    assert sign_flip_p([1.0, -1.0]) == 1.0
    assert sign_flip_p([0.0, 0.0, 0.0]) == 1.0
    # one small disagreeing seed: flipping it, or it and the others, ties or beats the observed
    assert sign_flip_p([3.0, 2.0, 4.0, 5.0, -0.5]) == 4 / 32
    assert math.isnan(sign_flip_p([]))


@pytest.mark.parametrize("seed", range(8))
def test_matches_a_brute_force_count(seed: int) -> None:
    rng = random.Random(seed)
    diffs = [round(rng.gauss(0.3, 1.0), 3) for _ in range(rng.randint(1, 9))]
    assert sign_flip_p(diffs) == brute_force(diffs)


def test_refusals() -> None:
    with pytest.raises(ValueError, match="n = 21"):
        sign_flip_p([1.0] * (MAX_EXACT + 1))
    with pytest.raises(ValueError, match="finite"):
        sign_flip_p([1.0, math.nan])


def test_marking_level_follows_what_the_seeds_can_reach() -> None:
    assert significance_level(5) == 0.0625  # 2 / 32: only unanimous seeds
    assert significance_level(6) == 0.05
    assert significance_level(4) == 0.05  # 2 / 16 = 0.125 can never reach it: nothing marked
    assert significance_level(0) == 0.05  # and a test with no pairs is never marked


def test_paired_test_pairs_by_seed_and_skips_missing() -> None:
    a = {0: 0.90, 1: 0.80, 2: 0.85, 3: 0.70, 4: 0.95, 5: 0.5}
    b = {0: 0.80, 1: 0.75, 2: 0.80, 3: 0.60, 4: 0.85, 6: 0.1}
    t = paired_test(a, b)
    assert t.seeds == (0, 1, 2, 3, 4) and t.n == 5
    assert t.mean == pytest.approx(0.08) and t.p == 2 / 32 and t.significant
    assert t.to_dict()["significant"] is True
    tie = paired_test({0: 0.5, 1: 0.6, 2: 0.4, 3: 0.5, 4: 0.5}, {s: 0.5 for s in range(5)})
    assert not tie.significant and tie.mean == pytest.approx(0.0)
    assert paired_test({}, {}).n == 0
