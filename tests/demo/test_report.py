"""The demo's statistics: the Wilson interval of a stage's accuracy and the paired interval between two stages."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from internvl3_hf.demo.report import paired_difference, proportion_interval, rises

Z95 = statistics.NormalDist().inv_cdf(0.975)  # the normal quantile from the standard library, not the constant


def test_the_wilson_interval_matches_its_closed_form():
    # Wilson's interval is the set of p whose score test does not reject at 5 %: solve (p̂ - p)² n = z² p (1 - p)
    z = Z95
    for correct, total in ((7, 300), (134, 300), (300, 300), (0, 300), (5, 12)):
        p_hat = correct / total
        a, b, c = total + z**2, -(2 * total * p_hat + z**2), total * p_hat**2
        roots = sorted(((-b - math.sqrt(b * b - 4 * a * c)) / (2 * a), (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))
        share, low, high = proportion_interval([True] * correct + [False] * (total - correct))
        assert share == pytest.approx(p_hat)
        assert (low, high) == pytest.approx(roots, abs=1e-12)


def test_the_paired_interval_is_the_normal_interval_of_the_per_question_differences():
    rng = random.Random(0)
    before = [rng.random() < 0.45 for _ in range(300)]
    after = [ok if rng.random() < 0.8 else not ok for ok in before]  # the same questions, some answers changed
    differences = [int(a) - int(b) for a, b in zip(after, before)]
    mean = statistics.fmean(differences)
    half = Z95 * statistics.stdev(differences) / math.sqrt(len(differences))
    assert paired_difference(after, before) == pytest.approx((mean, mean - half, mean + half))
    # pairing: the same shift measured on the same questions is tighter than two independent intervals
    gained = before[:]
    for index in range(0, 300, 10):
        gained[index] = True
    mean, low, high = paired_difference(gained, before)
    assert low > 0 and rises(gained, before) and not rises(before, gained)
    assert high - low < proportion_interval(gained)[2] - proportion_interval(gained)[1]


def test_paired_results_need_the_same_questions():
    with pytest.raises(ValueError, match="same questions"):
        paired_difference([True, False], [True])
