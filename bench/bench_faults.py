"""Benchmark for issue 15: faults injected at random, outcomes counted.

Drives the real CLI in subprocesses on the tiny random model (llmpareto.tiny): SIGKILLs of a
local search at random moments of every phase (model load, preparation, a trial, writing the
outputs, near the end) each followed by `--resume`; SIGKILLs of `pick` and `distill` followed
by a re-run; SIGKILLs of an RDB worker (a throwaway PostgreSQL server) followed by another
worker; SIGKILLs of a Ray worker node (a real two-node cluster on loopback); a full disk under
the run directory (a small tmpfs where this user may mount one, else RLIMIT_FSIZE in the
child); damaged study.db, GGUF, recipe JSON and device profiles. Prints the table of issue 15
and the seed that repeats the run.

Run: python3 -m llmpareto.bench.bench_faults [--local 20 --rdb 5 --ray 5 --disk 3 --seed S]
(the harness is llmpareto.tests.faults.harness: an editable install, `pip install -e .`)
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path


def chains(n: int, rng: random.Random) -> list[list[str]]:
    """`n` kill points as searches of up to 5 kills each, in run order, every phase used."""
    out = []
    for i in range((n + 4) // 5):
        size = min(5, n - 5 * i)
        last = "outputs" if i % 2 == 0 else "end"
        template = ["load", "prepare", "trial", "trial", last]
        keep = sorted(rng.sample(range(5), size)) if size < 5 else list(range(5))
        out.append([template[j] for j in keep])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local", type=int, default=20, help="local search kill points")
    ap.add_argument("--rdb", type=int, default=5, help="RDB worker kills")
    ap.add_argument("--ray", type=int, default=5, help="Ray worker-node kills")
    ap.add_argument("--disk", type=int, default=3, help="full-disk sizes")
    ap.add_argument("--pick", type=int, default=1, help="pick kills")
    ap.add_argument("--distill", type=int, default=1, help="distill kills")
    ap.add_argument("--no-inputs", action="store_true", help="skip the damaged-input cases")
    ap.add_argument("--trials", type=int, default=10, help="trials per search")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", help="work folder (default: a temporary one, removed after)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    try:
        from llmpareto.tests.faults import harness as h
    except ImportError as exc:
        sys.exit(f"bench_faults: cannot import llmpareto.tests.faults.harness ({exc}); install "
                 "llmpareto from its source tree with `pip install -e .`")
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="llmpareto-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LLMPARETO_CACHE", str(work / "cache"))  # never the user's cache
    print(f"seed {seed} (--seed {seed} repeats it); work folder {work}", flush=True)
    t0 = time.time()
    rng = random.Random(seed)
    model = h.tiny_model(work / "model")
    outcomes: list = []
    skipped: list[str] = []
    first = None
    for i, phases in enumerate(chains(args.local, rng)):
        h.log(f"local search {i}: kills at {phases}")
        s = h.search_settings(model, work / "runs", f"k{i}", rng, args.trials)
        outcomes += h.kill_chain(phases, model, work / "runs", f"k{i}",
                                 random.Random(rng.random()), trials=args.trials,
                                 settings={"seed": s["seed"]})
        first = first or s
    if first is None and (args.pick or args.distill or not args.no_inputs):
        first = h.search_settings(model, work / "runs", "base", rng, args.trials)
        r = h.run_cli(h.search_argv(first))
        if r.returncode:
            sys.exit(f"the base search failed: {r.stderr[-2000:]}")
    first_run = Path(first["runs_dir"]) / first["study"] if first else None
    for i in range(args.pick):
        shutil.copytree(first_run, work / f"pick{i}" / "run")
        outcomes.append(h.kill_pick(work / f"pick{i}" / "run", work / f"pick{i}" / "out", rng))
    for i in range(args.distill):
        shutil.copytree(first_run, work / f"distill{i}" / "run")
        outcomes.append(h.kill_distill(work / f"distill{i}" / "run", rng))
    mode = "tmpfs" if h.tmpfs_works(work) else "rlimit"
    bands = h.DISK_BANDS[mode]
    for i in range(args.disk):
        lo, hi = bands[i % len(bands)] if args.disk > 1 else bands[1]
        size = rng.randint(lo, hi) * 1024
        outcomes.append(h.disk_full(model, work / f"disk{i}", "d", size, rng, mode=mode,
                                    trials=args.trials))
    if args.rdb:
        try:
            pg = h.PgServer()
        except h.SkipFault as why:
            skipped.append(f"RDB worker kills: {why}")
        else:
            try:
                for i in range(args.rdb):
                    outcomes.append(h.kill_rdb_worker(pg, model, work / "rdb", f"rdb{i}", rng,
                                                      trials=args.trials))
            finally:
                pg.stop()
    if args.ray:
        try:
            cluster = h.RayCluster(work / "ray")
        except h.SkipFault as why:
            skipped.append(f"Ray node kills: {why}")
        else:
            try:
                for i in range(args.ray):
                    outcomes.append(h.kill_ray_node(cluster, model, work / "rayruns", f"ray{i}",
                                                    rng))
            finally:
                cluster.stop()
    refusals: list = []
    if not args.no_inputs:
        refusals += _damaged_inputs(h, model, work, first, rng)
    print(f"\n## Faults injected at random (seed {seed}, {time.time() - t0:.0f} s)\n")
    print(h.table(outcomes))
    if refusals:
        print("\n## Damaged inputs (a clear refusal: exit 2, one `llmpareto: error:` line, no "
              "traceback)\n")
        print("| input | refused clearly | message or problem |")
        print("|---|---|---|")
        for o in refusals:
            msg = (o.problems[0] if o.problems else o.detail.split("; ")[-1])[:160]
            print(f"| {o.fault}: {o.detail.split(';')[0]} | {'yes' if o.ok else 'NO'} | "
                  f"{msg.replace('|', '/')} |")
    for s in skipped:
        print(f"skipped: {s}")
    bad = [o for o in outcomes if not o.ok]
    for o in bad:
        print(f"FAILED: {o.line()}")
    print(f"\nseed {seed}; {len(outcomes)} faults, {len(bad)} not recovered; "
          f"{sum(not o.ok for o in refusals)} of {len(refusals)} damaged inputs not refused "
          "clearly")
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)


def _damaged_inputs(h, model, work, first: dict, rng) -> list:
    out = []
    for kind in ("truncated", "flipped"):
        dst = work / f"db-{kind}" / "runs"
        shutil.copytree(Path(first["runs_dir"]) / first["study"], dst / first["study"])
        out.append(h.damage_study_db({**first, "runs_dir": str(dst)}, kind, rng))
    gguf = next((work.glob("pick*/out/model.gguf")), None)
    if gguf is not None:
        for kind in ("truncated", "tensor-count", "huge-shape"):
            bad = work / f"{kind}.gguf"
            what = h.damage_gguf(gguf, bad, kind)
            s = h.search_settings(bad, work / "gguf-runs", kind, rng, 4)
            out.append(h.refuse(f"damaged GGUF ({kind})", what, h.search_argv(s),
                                must_name=str(bad)))
    for name in h.BAD_RECIPES:
        out.append(h.bad_recipe(model, work, name))
    for key in h.WRONG_UNITS:
        p = h.wrong_units_profile(work, key)
        out.append(h.refuse(f"device profile wrong units: {key}",
                            f"{key} = {h.WRONG_UNITS[key][0]}", [*h.CLI, "devices", str(p)],
                            must_name=key))
    return out


if __name__ == "__main__":
    main()
