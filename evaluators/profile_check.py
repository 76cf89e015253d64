"""How well a device profile predicts the decode speeds it carries ([[measurements]]): fit and
held-out rows apart, and the two-number fit (eta_mem, per-token overhead) used to re-fit a
profile from published rows. Analytic only: shapes, not weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llmpareto.budget import Workload
from llmpareto.device_profiles.schema import DeviceProfile, Measurement
from llmpareto.evaluators.cost import op_costs, summarize
from llmpareto.recipe import Recipe
from llmpareto.shapes import known_shape
from llmpareto.stats import mape_pct, spearman


def predicted_tokens_per_s(profile: DeviceProfile, m: Measurement) -> float:
    """The profile's decode tokens/s for a measurement's model, format and KV length."""
    arch = known_shape(m.model).arch()
    w = Workload(prompt_tokens=128, context=m.context)
    return summarize(op_costs(arch, arch.formats_for(Recipe.uniform(m.format)), profile, w),
                     arch, profile, w)["decode_tokens_per_s"]


def check_rows(profile: DeviceProfile) -> list[dict]:
    """Predicted vs measured for every [[measurements]] row, fit rows first."""
    rows = []
    for m in sorted(profile.measurements, key=lambda m: m.role != "fit"):
        pred = predicted_tokens_per_s(profile, m)
        rows.append({"role": m.role, "model": m.model, "format": m.format, "test": m.test,
                     "measured_tokens_per_s": m.tokens_per_s, "predicted_tokens_per_s": pred,
                     "error_%": 100 * (pred - m.tokens_per_s) / m.tokens_per_s,
                     "date": m.date, "source": m.source})
    return rows


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per role: rows, MAPE (%) and Spearman of predicted vs measured tokens/s."""
    out = {}
    for role in ("fit", "held-out"):
        got = [r for r in rows if r["role"] == role]
        if got:
            pred = [r["predicted_tokens_per_s"] for r in got]
            meas = [r["measured_tokens_per_s"] for r in got]
            out[role] = {"rows": len(got), "mape_%": mape_pct(pred, meas),
                         "spearman": spearman(pred, meas) if len(got) > 2 else float("nan")}
    return out


def fit_bandwidth_and_overhead(profile: DeviceProfile) -> tuple[float, float, float]:
    """(eta_mem, overhead_s_per_token, mean |relative error| %) from the profile's fit rows:
    t = roofline time at eta_mem 1 / eta_mem + per-token overhead, relative least squares.
    Two numbers, so published rows of a few model sizes suffice; per-format kernel rates and a
    per-block cost need more rows than public sources give for most devices."""
    fit = [m for m in profile.measurements if m.role == "fit"]
    if len(fit) < 2:
        raise ValueError(f"{profile.name}: a fit needs 2 or more fit rows, has {len(fit)}")
    ideal = dataclasses.replace(profile, eta_mem=1.0, overhead_s_per_token=0.0,
                                overhead_s_per_layer=0.0, kernel_weights_per_s={},
                                attention_values_per_s=0.0)
    x = np.array([1.0 / predicted_tokens_per_s(ideal, m) for m in fit])
    y = np.array([1.0 / m.tokens_per_s for m in fit])
    (a, b), *_ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1) / y[:, None],
                                 np.ones_like(y), rcond=None)
    if a <= 0:
        raise ValueError(f"{profile.name}: the fit rows do not grow with model bytes")
    a, b = max(a, 1.0), max(b, 0.0)  # eta_mem <= 1, overhead >= 0
    resid = float(np.mean(np.abs(a * x + b - y) / y)) * 100
    return 1.0 / a, float(b), resid
