"""Rank correlation and MAPE used by benchmarks and `llmpareto devices` (no scipy needed)."""

import pytest

from llmpareto.stats import mape_pct, spearman


def test_spearman_without_ties_is_one_minus_six_sum_d2():
    # d = (-1, 1, -1, 1, 0): rho = 1 - 6 * 4 / (5 * 24) = 0.8
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8, abs=1e-12)
    assert spearman([1, 2, 3], [10, 20, 300]) == pytest.approx(1.0, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=1e-12)


def test_spearman_gives_ties_their_average_rank():
    # ranks (1, 2, 3.5, 3.5) against (1, 2, 3, 4): Pearson of those ranks
    r = spearman([1, 2, 5, 5], [1, 2, 3, 4])
    assert r == pytest.approx(4.5 / (4.5 * 5) ** 0.5, abs=1e-12)


def test_mape_is_in_percent_of_the_measurement():
    assert mape_pct([110, 90, 100], [100, 100, 100]) == pytest.approx(20 / 3)
