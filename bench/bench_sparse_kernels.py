"""2:4 semi-structured sparsity vs dense f16 matmul at decode-like batch sizes (run it on a GPU).

    python3 bench/bench_sparse_kernels.py --out sparse24.csv

For weight shapes (out x in) of SmolLM2-135M and Llama-3-8B and batch sizes 1, 4, 16, 64, times
dense f16 ``torch.nn.functional.linear`` against the same weight pruned 2:4 (magnitude: keep the
2 largest of every 4 consecutive values along the input dim) and converted with
``torch.sparse.to_sparse_semi_structured`` -- once with the default backend (cuSPARSELt when
this torch build has it) and once with ``SparseSemiStructuredTensor._FORCE_CUTLASS = True``.

Decode reads every weight once from memory, so by default each timed sweep calls the matmul on
enough distinct copies of the weight that they do not fit in L2 (``--hot`` reuses one copy).
Two timing modes: ``eager`` (CUDA events around a sweep of Python calls: what an eager runtime
sees, CPU dispatch included) and ``graph`` (the same sweep captured in a CUDA graph and replayed:
GPU time only). Per-call time is the median over ``--reps`` sweeps divided by the sweep length.
The sparse result is checked against dense-of-pruned (relative max error below ``--tol``).

Only torch and the standard library.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys

SHAPES = {
    "smollm2-135m": [(576, 576), (1536, 576), (576, 1536)],
    "llama-3-8b": [(4096, 4096), (14336, 4096), (4096, 14336)],
}
BATCHES = (1, 4, 16, 64)
FIELDS = ("model", "shape", "batch", "backend", "mode", "cold", "copies",
          "dense_us", "sparse_us", "ratio", "rel_err", "note")


def prune_24(w):
    """Keep the 2 largest-magnitude values of every 4 consecutive ones along the last dim."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // 4, 4)
    idx = g.abs().topk(2, dim=-1).indices
    import torch

    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * mask).reshape(out_f, in_f)


def _time_eager(torch, fn, copies, x, reps, warmup):
    for _ in range(warmup):
        for w in copies:
            fn(x, w)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for w in copies:
            fn(x, w)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1000.0 / len(copies))
    return statistics.median(times)


def _time_graph(torch, fn, copies, x, reps, warmup):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            for w in copies:
                fn(x, w)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [fn(x, w) for w in copies]  # noqa: F841 (kept alive by the graph pool)
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1000.0 / len(copies))
    del g
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="CSV file to write (also printed)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--cold-bytes", type=float, default=200e6,
                   help="total dense weight bytes per sweep (beyond L2); default 200 MB")
    p.add_argument("--max-copies", type=int, default=512)
    p.add_argument("--hot", action="store_true", help="one weight copy (L2-resident when small)")
    p.add_argument("--tol", type=float, default=2e-2)
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--modes", default="eager,graph")
    a = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("CUDA not available; nothing to time", file=sys.stderr)
        return 2
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    cusparselt = getattr(torch.backends, "cusparselt", None)
    has_cslt = bool(cusparselt and cusparselt.is_available())
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": props.name,
        "capability": f"{props.major}.{props.minor}",
        "cusparselt": (cusparselt.version() if has_cslt else None),
    }
    for k, v in info.items():
        print(f"# {k}: {v}")

    torch.manual_seed(0)
    batches = [int(b) for b in a.batches.split(",")]
    modes = a.modes.split(",")
    backends = [("default", False), ("cutlass", True)]
    rows = []
    dense_linear = F.linear

    for model in a.models.split(","):
        for out_f, in_f in SHAPES[model]:
            w = (torch.randn(out_f, in_f, device=dev, dtype=torch.float16) * 0.02)
            wp = prune_24(w)
            nbytes = wp.numel() * wp.element_size()
            n = 1 if a.hot else max(1, min(a.max_copies, math.ceil(a.cold_bytes / nbytes)))
            dense_copies = [wp.clone() for _ in range(n)]
            dense_cache = {}
            for bname, force in backends:
                SparseSemiStructuredTensor._FORCE_CUTLASS = force
                try:
                    sp_copies = [to_sparse_semi_structured(c) for c in dense_copies]
                    impl = type(sp_copies[0]).__name__
                except Exception as exc:  # noqa: BLE001
                    for b in batches:
                        rows.append(dict(model=model, shape=f"{out_f}x{in_f}", batch=b,
                                         backend=bname, mode="-", cold=not a.hot, copies=n,
                                         note=f"convert failed: {type(exc).__name__}: {exc}"[:200]))
                    print(f"# {model} {out_f}x{in_f} {bname}: convert failed: {exc}", file=sys.stderr)
                    continue
                for b in batches:
                    x = torch.randn(b, in_f, device=dev, dtype=torch.float16)
                    note = impl
                    try:
                        ref = dense_linear(x, wp).float()
                        got = dense_linear(x, sp_copies[0]).float()
                        rel = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
                        if not rel < a.tol:
                            note += f"; MISMATCH rel_err={rel:.3g}"
                    except Exception as exc:  # noqa: BLE001
                        rows.append(dict(model=model, shape=f"{out_f}x{in_f}", batch=b,
                                         backend=bname, mode="-", cold=not a.hot, copies=n,
                                         note=f"{impl}; matmul failed: {type(exc).__name__}: {exc}"[:200]))
                        continue
                    for mode in modes:
                        timer = _time_eager if mode == "eager" else _time_graph
                        key = (b, mode)
                        try:
                            if key not in dense_cache:
                                dense_cache[key] = timer(torch, dense_linear, dense_copies, x,
                                                         a.reps, a.warmup)
                            d_us = dense_cache[key]
                            s_us = timer(torch, dense_linear, sp_copies, x, a.reps, a.warmup)
                            r = dict(dense_us=round(d_us, 3), sparse_us=round(s_us, 3),
                                     ratio=round(s_us / d_us, 4), note=note)
                        except Exception as exc:  # noqa: BLE001
                            r = dict(note=f"{note}; {mode} failed: {type(exc).__name__}: {exc}"[:200])
                        row = dict(model=model, shape=f"{out_f}x{in_f}", batch=b, backend=bname,
                                   mode=mode, cold=not a.hot, copies=n, rel_err=f"{rel:.2e}", **r)
                        rows.append(row)
                        print(",".join(str(row.get(f, "")) for f in FIELDS), flush=True)
                del sp_copies
                torch.cuda.empty_cache()
            SparseSemiStructuredTensor._FORCE_CUTLASS = False
            del dense_copies, dense_cache
            torch.cuda.empty_cache()

    if a.out:
        with open(a.out, "w", newline="") as fh:
            for k, v in info.items():
                fh.write(f"# {k}: {v}\n")
            wr = csv.DictWriter(fh, fieldnames=FIELDS)
            wr.writeheader()
            for row in rows:
                wr.writerow({f: row.get(f, "") for f in FIELDS})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
