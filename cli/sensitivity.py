"""`llmpareto sensitivity RUN`: a read-only view of the per-key sensitivity profile a search
measured (KL increase over the reference per choice), as a table and a heat-map PNG."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmpareto.errors import UserError
from llmpareto.search.sensitivity_file import FILE, read_profile

ANNOTATE_ROWS = 30  # up to this many keys, each cell also shows its value
DECADES = 9  # colour range of the heat-map; tinier deltas are noise and share the floor colour


def load_sensitivity(run_dir: str | Path, path: str | Path | None = None) -> dict:
    """Read and check RUN/sensitivity.json (or `path`, when given); UserError if unusable."""
    run = Path(run_dir)
    if not run.exists():
        raise UserError(f"run directory {run} does not exist; give one written by "
                        "`llmpareto search`, e.g. runs/<study>")
    if path is None and not run.is_dir():
        raise UserError(f"{run} is a file, not a run directory; give the directory "
                        f"(e.g. runs/<study>), or read this file with --sensitivity {run}")
    file = run / FILE if path is None else Path(path)
    if not file.is_file():
        where = f"{run} has no {FILE}" if path is None else f"--sensitivity {file}: no " \
            "such file"
        raise UserError(f"{where}: it is written by searches with --strategy knapsack, evolve "
                        "or auto; run one, or pass --sensitivity FILE to read a profile kept "
                        "elsewhere")
    return read_profile(file)


def _label(choice: str | float) -> str:
    return choice if isinstance(choice, str) else str(choice)


def sensitivity_table(data: dict) -> pd.DataFrame:
    """Rows: keys in file order; columns: every choice (stringified, first-seen order);
    values: KL increase over the reference in nats, NaN where not measured or not a choice."""
    columns: dict[str, None] = {}
    rows = {}
    for key, choices in data["choices"].items():
        row = {}
        for choice, delta in zip(choices, data["delta_kl_nats"][key]):
            label = _label(choice)
            columns.setdefault(label)
            row[label] = math.nan if delta is None else float(delta)
        rows[key] = row
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(columns), dtype=float)
    table = table.reindex(list(rows))  # from_dict keeps file order; this also covers no keys
    table.index.name = "key"
    table.columns.name = "delta_kl_nats"
    return table


def top_keys(table: pd.DataFrame, n: int | None) -> pd.DataFrame:
    """The `n` keys with the largest maximum delta, largest first (all of them for None)."""
    if n is None:
        return table
    if n < 1:
        raise UserError(f"--top {n}: give a number of keys >= 1")
    worst = table.max(axis=1, skipna=True)  # all-NaN rows (nothing measured) sort last
    order = worst.sort_values(ascending=False, kind="stable", na_position="last").index
    return table.loc[order[:n]]


def _colour_values(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Values to colour on a log scale (deltas at or below the floor share its colour, +inf
    takes the top one), and the scale's (floor, top) in nats."""
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    top = float(positive.max()) if len(positive) else 1e-6
    # a decade under the smallest measured increase, so it does not look like no increase
    floor = max(float(positive.min()) / 10 if len(positive) else top / 10,
                top * 10.0 ** -DECADES)
    if floor >= top:
        top = floor * 10
    shown = np.where(np.isposinf(values), top, values)
    return np.where(np.isnan(shown), np.nan, np.maximum(shown, floor)), floor, top


def _annotate(ax: Any, raw: np.ndarray, shown: np.ndarray, floor: float, top: float) -> None:
    """Write each measured value in its cell, light on the dark end of the colour scale."""
    middle = math.sqrt(floor * top)
    for (i, j), v in np.ndenumerate(raw):
        if not math.isnan(v):
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] < middle else "black")


def _draw(table: pd.DataFrame, title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    n_rows, n_cols = table.shape
    values, floor, top = _colour_values(table.to_numpy(dtype=float))
    height_in = min(40.0, max(3.0, 1.2 + 0.16 * n_rows))  # 211 rows: ~35 in at 0.16 in a row
    font_pt = max(2.0, min(8.0, 0.75 * height_in * 72 / max(n_rows, 1)))
    longest = max((len(str(k)) for k in table.index), default=4)
    width_in = min(30.0, 2.5 + 0.6 * n_cols + longest * font_pt * 0.6 / 72)  # labels ~0.6 em
    fig, ax = plt.subplots(figsize=(width_in, height_in), dpi=100)
    # NaN: not a choice of that key, or not measured
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", interpolation="nearest",
                      cmap=cmap, norm=LogNorm(vmin=floor, vmax=top))
    ax.set_xticks(range(n_cols), [str(c) for c in table.columns], rotation=45, ha="right",
                  fontsize=8)
    ax.set_yticks(range(n_rows), [str(k) for k in table.index], fontsize=font_pt)
    if n_rows <= ANNOTATE_ROWS:
        _annotate(ax, table.to_numpy(dtype=float), values, floor, top)
    ax.set_xlabel("choice")
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("KL increase (nats)")
    fig.tight_layout()
    return fig


def plot_sensitivity(data: dict, path: str | Path, top: int | None = None) -> Path:
    """Write a heat-map PNG of the table (of its `top` keys when given); returns its path."""
    import matplotlib.pyplot as plt

    out = Path(path)
    if out.suffix.lower() != ".png":
        raise UserError(f"--plot {out}: give a .png file name")
    if not out.parent.is_dir():
        raise UserError(f"--plot {out}: folder {out.parent} does not exist; create it or "
                        "pass another --plot PATH")
    table = sensitivity_table(data)
    shown = top_keys(table, top)
    if shown.empty:
        raise UserError("the sensitivity profile lists no keys: nothing to plot; pass --no-plot")
    what = f"top {len(shown)} of {len(table)} keys" if len(shown) < len(table) else \
        f"{len(table)} keys"
    fig = _draw(shown, f"{data['space']}: KL increase over the reference ({what}, "
                       f"{int(data['tokens'])} tokens)")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".png.tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write the heat-map {out} ({exc.strerror}); pass another "
                        "--plot PATH or --no-plot") from None
    finally:
        plt.close(fig)
    return out


def _header(data: dict) -> str:
    ref = data["reference_kl_nats"]
    ref_s = "n/a" if ref is None else f"{ref:.3g}"
    return (f"space {data['space']}: KL increase over the reference, nats, on "
            f"{int(data['tokens'])} calibration tokens; reference_kl_nats {ref_s}; "
            f"{int(data['evaluations'])} evaluations in {float(data['seconds']):.1f} s")


def _render(table: pd.DataFrame, data: dict) -> str:
    """The table as text: 3 significant digits, "n/a" where a choice was not measured, blank
    where it is not a choice of that key."""
    text = table.apply(lambda col: col.map(lambda v: "n/a" if math.isnan(v) else f"{v:.3g}"))
    for key in text.index:
        own = {_label(c) for c in data["choices"][key]}
        text.loc[key, [c for c in text.columns if c not in own]] = ""
    return text.to_string()


def cmd_sensitivity(args: argparse.Namespace) -> int:
    data = load_sensitivity(args.run, args.sensitivity)
    table = top_keys(sensitivity_table(data), args.top)
    print(_header(data))
    if table.empty:
        print("(no keys in the profile)")
        return 0
    print(_render(table, data))
    if not args.no_plot:
        path = args.plot if args.plot else Path(args.run) / "sensitivity.png"
        print(f"heat-map: {plot_sensitivity(data, path, top=args.top)}")
    return 0


def add_sensitivity_command(sub) -> None:
    ps = sub.add_parser("sensitivity", help="show a run's per-key sensitivity profile (KL "
                        "increase per choice) as a table and a heat-map")
    ps.add_argument("run", help="run directory, e.g. runs/<study>")
    ps.add_argument("--top", type=int, metavar="N",
                    help="show only the N keys with the largest maximum KL increase, largest "
                         "first (default: all, in file order)")
    ps.add_argument("--plot", metavar="PATH", help="heat-map PNG (default: RUN/sensitivity.png)")
    ps.add_argument("--no-plot", action="store_true", help="do not write the heat-map")
    ps.add_argument("--sensitivity", metavar="FILE",
                    help="read this profile instead of RUN/sensitivity.json")
    ps.set_defaults(func=cmd_sensitivity)
