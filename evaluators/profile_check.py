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
from llmpareto.preset_rules import RULE_PRESETS, preset_recipe
from llmpareto.recipe import Recipe
from llmpareto.shapes import known_shape
from llmpareto.stats import mape_pct, spearman


def predicted_tokens_per_s(profile: DeviceProfile, m: Measurement) -> float:
    """The profile's decode tokens/s for a measurement's model, format (or llama.cpp preset,
    mixed as llama-quantize mixes it) and KV length."""
    arch = known_shape(m.model).arch()
    recipe = preset_recipe(arch, m.format) if m.format in RULE_PRESETS else Recipe.uniform(m.format)
    w = Workload(prompt_tokens=128, context=m.context)
    return summarize(op_costs(arch, arch.formats_for(recipe), profile, w),
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


INTERCEPTS = ("token", "layer")  # a fixed cost per decoded token, or per block per token


def fit_bandwidth_and_overhead(profile: DeviceProfile,
                               intercept: str = "token") -> tuple[float, float, float]:
    """(eta_mem, overhead, mean |relative error| %) from the profile's fit rows:
    t = roofline time at eta_mem 1 / eta_mem + overhead (per token, or per block per token
    with `intercept="layer"`), relative least squares.
    Two numbers, so published rows of a few model sizes suffice; per-format kernel rates and a
    per-block cost need more rows than public sources give for most devices."""
    if intercept not in INTERCEPTS:
        raise ValueError(f"intercept {intercept!r}: one of {', '.join(INTERCEPTS)}")
    fit = [m for m in profile.measurements if m.role == "fit"]
    if len(fit) < 2:
        raise ValueError(f"{profile.name}: a fit needs 2 or more fit rows, has {len(fit)}")
    ideal = dataclasses.replace(profile, eta_mem=1.0, overhead_s_per_token=0.0,
                                overhead_s_per_layer=0.0, kernel_weights_per_s={},
                                attention_values_per_s=0.0)
    x = np.array([1.0 / predicted_tokens_per_s(ideal, m) for m in fit])
    z = np.array([1.0 if intercept == "token" else known_shape(m.model).blocks for m in fit])
    y = np.array([1.0 / m.tokens_per_s for m in fit])
    (a, b), *_ = np.linalg.lstsq(np.stack([x, z], 1) / y[:, None], np.ones_like(y),
                                 rcond=None)
    if a <= 0:
        raise ValueError(f"{profile.name}: the fit rows do not grow with model bytes")
    if a < 1.0 or b < 0.0:  # eta_mem <= 1, overhead >= 0: refit the other number alone
        a, b = max(a, 1.0), max(b, 0.0)
        if b == 0.0:
            a = max(1.0, float(np.sum(x / y) / np.sum((x / y) ** 2)))
        else:
            b = max(0.0, float(np.sum(z / y * (1 - a * x / y)) / np.sum((z / y) ** 2)))
    resid = float(np.mean(np.abs(a * x + b * z - y) / y)) * 100
    return float(1.0 / a), float(b), resid


def refit(profile: DeviceProfile, intercept: str = "token") -> DeviceProfile:
    """The profile with eta_mem and its overhead re-fitted on its fit rows (and per-format
    kernel rates and the attention rate dropped: a public-row fit cannot separate them), each
    re-fitted number's source saying so."""
    eta, overhead, resid = fit_bandwidth_and_overhead(profile, intercept)
    fit = [m for m in profile.measurements if m.role == "fit"]
    held = len(profile.measurements) - len(fit)
    dates = sorted({m.date for m in fit})
    why = (f"derived: relative least squares t = roofline bytes time / eta_mem + "
           f"{'per-token' if intercept == 'token' else 'per-block'} overhead over this "
           f"profile's {len(fit)} [[measurements]] with role 'fit' ({dates[0]} .. {dates[-1]}), "
           f"fit residual {resid:.1f}%, {held} held-out rows kept out; "
           f"`llmpareto devices {profile.name}` prints both")
    token, layer = (overhead, 0.0) if intercept == "token" else (0.0, overhead)
    sources = {k: v for k, v in profile.sources.items()
               if not k.startswith("kernel_weights_per_s.") and k != "attention_values_per_s"}
    sources.update({"eta_mem": why, "overhead_s_per_token": why})
    if layer:
        sources["overhead_s_per_layer"] = why
    else:
        sources.pop("overhead_s_per_layer", None)
    return dataclasses.replace(profile, eta_mem=eta, overhead_s_per_token=token,
                               overhead_s_per_layer=layer, kernel_weights_per_s={},
                               attention_values_per_s=0.0, sources=sources)
