"""Non-dominated set: property test against a brute-force definition."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from llmpareto.pareto import non_dominated


def brute_force(points):
    n = len(points)
    keep = []
    for i in range(n):
        if np.isnan(points[i]).any():
            keep.append(False)
            continue
        dominated = any(
            not np.isnan(points[j]).any()
            and np.all(points[j] <= points[i]) and np.any(points[j] < points[i])
            for j in range(n) if j != i
        )
        keep.append(not dominated)
    return np.array(keep, dtype=bool)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4).flatmap(lambda k: arrays(
    np.float64, st.tuples(st.integers(0, 30), st.just(k)),
    # a small value set forces ties and duplicates, where front code usually breaks
    elements=st.sampled_from([0.0, 1.0, 2.0, 3.5, 7.0, np.inf, np.nan]))))
def test_matches_brute_force(points):
    assert np.array_equal(non_dominated(points), brute_force(points))


def test_simple_case():
    pts = np.array([[1, 5], [2, 2], [5, 1], [3, 3], [2, 2]], dtype=float)
    assert non_dominated(pts).tolist() == [True, True, True, False, True]


def test_hypervolume_2d_against_optuna():
    from optuna._hypervolume import compute_hypervolume

    from llmpareto.pareto import hypervolume_2d

    rng = np.random.default_rng(3)
    for _ in range(20):
        pts = rng.random((12, 2))
        ref = (1.1, 1.2)
        assert hypervolume_2d(pts, ref) == pytest.approx(
            compute_hypervolume(pts[non_dominated(pts)], np.array(ref)), rel=1e-12)
    assert hypervolume_2d([[1.0, 2.0], [2.0, 1.0]], (3.0, 3.0)) == pytest.approx(3.0)
    assert hypervolume_2d([[4.0, 0.5]], (3.0, 3.0)) == 0.0  # beyond the reference
