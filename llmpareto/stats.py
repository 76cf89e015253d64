"""Agreement of predictions with measurements (Spearman rank correlation, MAPE): numpy and
pandas only, so benchmarks and `llmpareto devices` need no scipy."""

from __future__ import annotations

import numpy as np
import pandas as pd


def spearman(a, b) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks (ties share a rank)."""
    ra = pd.Series(np.asarray(a, dtype=float)).rank()
    rb = pd.Series(np.asarray(b, dtype=float)).rank()
    return float(ra.corr(rb))


def mape_pct(predicted, measured) -> float:
    """Mean absolute percentage error of `predicted` against `measured`, in percent."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    return float(100 * np.mean(np.abs(p - m) / m))
