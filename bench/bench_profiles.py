"""Device profiles against the decode speeds they carry: for every shipped profile, predicted vs
measured tokens/s of its [[measurements]], the rows it was fitted on and the held-out rows
apart (MAPE, Spearman). Analytic only, seconds on any machine.

    python3 -m llmpareto.bench.bench_profiles [--rows]
"""

from __future__ import annotations

import argparse

import pandas as pd


def main() -> None:
    from llmpareto.device_profiles import list_profiles, load_profile
    from llmpareto.evaluators.profile_check import check_rows, summary

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", action="store_true", help="print every measurement row too")
    args = ap.parse_args()
    out = []
    for name in list_profiles():
        p = load_profile(name)
        rows = check_rows(p)
        if args.rows and rows:
            print(f"\n{name} ({p.runtime}):")
            print(pd.DataFrame(rows).drop(columns=["source"]).to_string(
                index=False, float_format=lambda v: f"{v:.4g}"))
        s = summary(rows)
        out.append({"device": name, **{f"{role} {k}": v[k] for role in ("fit", "held-out")
                                        for v in [s.get(role, {})] for k in
                                        ("rows", "mape_%", "spearman") if k in v}})
    print(pd.DataFrame(out).to_string(index=False, float_format=lambda v: f"{v:.3g}",
                                      na_rep="-"))
    print("\nprofiles with no rows carry no published llama.cpp decode number for their device and "
          "runtime configuration; `llmpareto devices NAME --refit token|layer` re-fits a profile "
          "on its fit rows")


if __name__ == "__main__":
    main()
