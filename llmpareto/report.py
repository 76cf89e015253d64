"""Plot data for a front, computed apart from drawing (as optuna's _get_pareto_front_info)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from llmpareto import atomic


class FrontPlotInfo(NamedTuple):
    x_name: str
    y_name: str
    feasible_xy: np.ndarray  # (n, 2) feasible, completed trials not on the front
    infeasible_xy: np.ndarray  # (n, 2) over budget (quality not measured: x only, y = nan)
    front_xy: np.ndarray  # (n, 2) sorted by x
    baselines: list[tuple[str, float, float]]  # (label, x, y)
    recovered_xy: np.ndarray = np.zeros((0, 2))  # the front after recovery, sorted by x


def front_plot_info(trials: pd.DataFrame, front: pd.DataFrame, x: str, y: str,
                    y_limit: float | None = None) -> FrontPlotInfo:
    """What the plot shows; with `y_limit` (the quality floor), trials above it are left out
    (the plot says how many)."""
    done = trials[trials["state"] == "COMPLETE"]
    if y_limit is not None:
        done = done[~(pd.to_numeric(done[y], errors="coerce") > y_limit)]
        front = front[~(pd.to_numeric(front[y], errors="coerce") > y_limit)]
    on_front = done["trial"].isin(front["trial"])
    feas = done[done["feasible"] & ~on_front]
    infeas = done[~done["feasible"]]
    fr = front.sort_values(x)
    base = done[done["baseline"].fillna("").astype(str) != ""]
    return FrontPlotInfo(
        x, y,
        np.array(feas[[x, y]], dtype=float),
        np.array(infeas[[x, y]], dtype=float),
        np.array(fr[[x, y]], dtype=float),
        [(str(r["baseline"]), float(r[x]), float(r[y])) for _, r in base.iterrows()],
    )


PRESET_PREFIX = "llama.cpp "  # baseline labels of llama.cpp's presets (spaces/presets.py)


def _short(label: str) -> str:
    """A baseline's label on the plot: `q4_K` for a uniform format, `Q4_K_M` for a preset."""
    return label.removeprefix("uniform ").removeprefix(PRESET_PREFIX).removesuffix(" imatrix")


def plot_front(info: FrontPlotInfo, path: str, title: str = "", note: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 1e6 if info.x_name.endswith("_bytes") else 1.0  # bytes are read as MB
    info = info._replace(
        feasible_xy=info.feasible_xy / [scale, 1], infeasible_xy=info.infeasible_xy / [scale, 1],
        front_xy=info.front_xy / [scale, 1], recovered_xy=info.recovered_xy / [scale, 1],
        baselines=[(lbl, bx / scale, by) for lbl, bx, by in info.baselines])
    fig, ax = plt.subplots(figsize=(7, 4.7), dpi=120)
    if len(info.feasible_xy):
        ax.scatter(*info.feasible_xy.T, s=14, c="0.6", label="feasible trials")
    finite = info.infeasible_xy[np.isfinite(info.infeasible_xy).all(axis=1)] if len(
        info.infeasible_xy) else info.infeasible_xy
    if len(finite):
        ax.scatter(*finite.T, s=14, marker="x", c="tab:red", label="over budget")
    if len(info.front_xy):
        ax.plot(*info.front_xy.T, "-o", c="tab:blue", ms=5, drawstyle="steps-post",
                label="Pareto front" + (" before recovery" if len(info.recovered_xy) else ""))
    if len(info.recovered_xy):
        ax.plot(*info.recovered_xy.T, "-^", c="tab:green", ms=5, drawstyle="steps-post",
                label="Pareto front after recovery")
    shown = [(lbl, bx, by) for lbl, bx, by in info.baselines if np.isfinite(bx) and np.isfinite(by)]
    kinds = {"uniform format": (lambda lbl: not lbl.startswith(PRESET_PREFIX), "s", "k", (4, 4)),
             "llama.cpp preset": (lambda lbl: lbl.startswith(PRESET_PREFIX), "D", "tab:orange",
                                  (5, -10))}
    for name, (match, marker, colour, offset) in kinds.items():
        pts = [(lbl, bx, by) for lbl, bx, by in shown if match(lbl)]
        if not pts:
            continue
        ax.scatter([p[1] for p in pts], [p[2] for p in pts], marker=marker, s=30,
                   facecolors="none", edgecolors=colour, label=name)
        for lbl, bx, by in pts:
            ax.annotate(_short(lbl), (bx, by), fontsize=7, color=colour, xytext=offset,
                        textcoords="offset points")
    ax.set_xlabel(f"{info.x_name} / 1e6 (MB)" if scale != 1.0 else info.x_name)
    ax.set_ylabel(info.y_name)
    ys = np.concatenate([info.front_xy[:, 1], info.feasible_xy[:, 1]]) if len(
        info.front_xy) else info.feasible_xy[:, 1]
    ys = ys[np.isfinite(ys)]
    notes = [note] if note else []
    if len(ys) and ys.max() > 5 * np.median(ys):
        # one broken candidate (e.g. ternary without ternary training) would flatten the rest
        top = 3 * np.median(ys)
        ax.set_ylim(ys.min() * 0.95, top)
        notes.append(f"{int((ys > top).sum())} point(s) above {top:.3g} not shown")
    ax.set_title(title or "Pareto front", fontsize=11)
    if notes:
        ax.text(0.5, 1.005, "; ".join(notes), fontsize=7, transform=ax.transAxes, ha="center",
                va="bottom", color="0.3")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
