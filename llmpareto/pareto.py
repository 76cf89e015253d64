"""Pareto math: the non-dominated subset of points, all objectives minimized."""

from __future__ import annotations

import numpy as np


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of rows of `points` (n x k, minimize every column) that no other row dominates.

    A row dominates another when it is <= in every column and < in at least one; exact
    duplicates do not dominate each other, so both stay on the front. NaN rows never qualify.
    """
    pts = np.asarray(points, dtype=float)
    n = len(pts)
    if n == 0:
        return np.zeros(0, dtype=bool)
    valid = ~np.isnan(pts).any(axis=1)
    mask = valid.copy()
    # Sort by the first objective so a candidate can only be dominated by rows before it
    # or equal on column 0; O(n^2 k) worst case, fine for thousands of trials.
    order = np.lexsort(pts.T[::-1])
    for i in order:
        if not mask[i]:
            continue
        others = pts[mask]
        dominated = np.all(others <= pts[i], axis=1) & np.any(others < pts[i], axis=1)
        if dominated.any():
            mask[i] = False
    return mask


def hypervolume_2d(points: np.ndarray, reference: tuple[float, float]) -> float:
    """Area dominated by `points` (n x 2, both minimized) and bounded by `reference`; points
    not better than the reference in both objectives add nothing."""
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    ref = np.asarray(reference, dtype=float)
    pts = pts[~np.isnan(pts).any(axis=1) & np.all(pts < ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    front = pts[non_dominated(pts)]
    front = front[np.argsort(front[:, 0])]
    xs = np.append(front[1:, 0], ref[0])
    return float(np.sum((xs - front[:, 0]) * (ref[1] - front[:, 1])))
