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

Backends besides the two above: ``cslt_raw`` calls ``torch._cslt_sparse_mm`` directly on a
pre-padded input (no tensor-subclass dispatch), ``cslt_raw_search`` does the same with the
algorithm ``torch._cslt_sparse_mm_search`` picks. ``--fp8`` adds fp8 (e4m3) W8A8 rows: dense
``torch._scaled_mm`` vs 2:4 ``torch._cslt_sparse_mm``. ``--sizes`` records how many bytes
``torch._cslt_compress`` stores per weight (kept values + metadata) for f16/bf16/int8/fp8.

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
FIELDS = ("model", "shape", "batch", "backend", "mode", "cold", "copies", "dense_us",
          "sparse_us", "ratio", "rel_err", "note")


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


def _profile(torch, label, dense_fn, w, x, sparse_fn, sw, xs, out, calls=20):
    """Per-kernel GPU time (us per call) of `calls` dense and sparse calls, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    for name, fn, ww, xx in (("dense", dense_fn, w, x), ("sparse", sparse_fn, sw, xs)):
        fn(xx, ww)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn(xx, ww)
            torch.cuda.synchronize()
        out.append(f"## {label} {name}")
        for ev in prof.key_averages():
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if t and ev.count >= calls:
                out.append(f"  {t / calls:9.2f} us/call  x{ev.count // calls}  {ev.key[:110]}")


def _packed_sizes(torch, dev, out):
    """Bytes torch._cslt_compress stores per 2:4 weight, in bits per original weight."""
    for model, shapes in SHAPES.items():
        for out_f, in_f in shapes:
            w = prune_24(torch.randn(out_f, in_f, device=dev))
            for dt in (torch.float16, torch.bfloat16, torch.int8, torch.float8_e4m3fn):
                try:
                    wd = (w * 50).round().clamp(-127, 127).to(dt) if dt == torch.int8 else w.to(dt)
                    c = torch._cslt_compress(wd)
                    nb = c.numel() * c.element_size()
                    out.append(
                        f"{model},{out_f}x{in_f},{str(dt).split('.')[-1]},{nb},"
                        f"{8 * nb / (out_f * in_f):.4f},{wd.element_size() * 8}"
                    )
                except Exception as exc:  # noqa: BLE001
                    out.append(f"{model},{out_f}x{in_f},{dt},fail: {exc}"[:200])


def _fp8_rows(torch, dev, a, rows):
    """fp8 e4m3 W8A8: dense torch._scaled_mm vs 2:4 torch._cslt_sparse_mm (searched alg), graph mode."""
    one = torch.ones((), device=dev)
    for model in a.models.split(","):
        for out_f, in_f in SHAPES[model]:
            nbytes = out_f * in_f
            n = max(1, min(a.max_copies, math.ceil(a.cold_bytes / nbytes)))
            ws = [
                prune_24(torch.randn(out_f, in_f, device=dev) * 0.05).to(torch.float8_e4m3fn)
                for _ in range(n)
            ]
            ps = [torch._cslt_compress(w) for w in ws]
            for b in [int(v) for v in a.batches.split(",")]:
                mp = max(16, b + (-b) % 16)  # _scaled_mm wants multiples of 16
                x = torch.zeros(mp, in_f, device=dev)
                x[:b] = torch.randn(b, in_f, device=dev)
                x = x.to(torch.float8_e4m3fn)
                xt = x.t()
                row = {
                    "model": model,
                    "shape": f"{out_f}x{in_f}",
                    "batch": b,
                    "backend": "fp8_cslt_search",
                    "mode": "graph",
                    "cold": True,
                    "copies": n,
                }
                try:

                    def dense(xx, w):
                        return torch._scaled_mm(
                            xx, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16
                        )

                    alg = int(torch._cslt_sparse_mm_search(ps[0], xt, out_dtype=torch.bfloat16))

                    def sparse(xx, pk, _alg=alg):
                        return torch._cslt_sparse_mm(pk, xx, out_dtype=torch.bfloat16, alg_id=_alg)

                    ref = dense(x, ws[0]).float()[:b]
                    got = sparse(xt, ps[0]).float().t()[:b]
                    rel = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
                    d_us = _time_graph(torch, dense, ws, x, a.reps, a.warmup)
                    s_us = _time_graph(torch, sparse, ps, xt, a.reps, a.warmup)
                    row.update(
                        dense_us=round(d_us, 3),
                        sparse_us=round(s_us, 3),
                        ratio=round(s_us / d_us, 4),
                        rel_err=f"{rel:.2e}",
                        note=f"dense=torch._scaled_mm M={mp}; alg_id={alg}",
                    )
                except Exception as exc:  # noqa: BLE001
                    row.update(note=f"fp8 failed: {type(exc).__name__}: {exc}"[:200])
                rows.append(row)
                print(",".join(str(row.get(f, "")) for f in FIELDS), flush=True)
            del ws, ps
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="CSV file to write (also printed)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--cold-bytes",
        type=float,
        default=200e6,
        help="total dense weight bytes per sweep (beyond L2); default 200 MB",
    )
    p.add_argument("--max-copies", type=int, default=512)
    p.add_argument("--hot", action="store_true", help="one weight copy (L2-resident when small)")
    p.add_argument("--tol", type=float, default=2e-2)
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--modes", default="eager,graph")
    p.add_argument(
        "--backends",
        default="default,cutlass,cslt_raw,cslt_raw_search",
        help="default: to_sparse_semi_structured (cuSPARSELt if available); cutlass: "
        "same with _FORCE_CUTLASS; cslt_raw: torch._cslt_sparse_mm on a pre-padded "
        "input (alg 0); cslt_raw_search: same with torch._cslt_sparse_mm_search's alg",
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="also time fp8 W8A8: torch._scaled_mm vs 2:4 torch._cslt_sparse_mm",
    )
    p.add_argument("--sizes", help="write torch._cslt_compress sizes (bits per weight) to this CSV")
    p.add_argument(
        "--profile",
        help="write per-kernel GPU times (torch.profiler) at the first "
        "batch size to this text file",
    )
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
    backends = [b for b in a.backends.split(",") if b]
    rows, profiles = [], []
    dense_linear = F.linear

    for model in a.models.split(",") if backends else []:
        for out_f, in_f in SHAPES[model]:
            w = torch.randn(out_f, in_f, device=dev, dtype=torch.float16) * 0.02
            wp = prune_24(w)
            nbytes = wp.numel() * wp.element_size()
            n = 1 if a.hot else max(1, min(a.max_copies, math.ceil(a.cold_bytes / nbytes)))
            dense_copies = [wp.clone() for _ in range(n)]
            dense_cache = {}
            for bname in backends:

                def failed(b, note, bname=bname, out_f=out_f, in_f=in_f, n=n, model=model):
                    return {"model": model, "shape": f"{out_f}x{in_f}", "batch": b,
                            "backend": bname, "mode": "-", "cold": not a.hot, "copies": n,
                            "note": note[:200]}

                SparseSemiStructuredTensor._FORCE_CUTLASS = bname == "cutlass"
                raw = bname.startswith("cslt_raw")
                try:
                    if raw:
                        sp_copies = [torch._cslt_compress(c) for c in dense_copies]
                        impl = "torch._cslt_sparse_mm"
                    else:
                        sp_copies = [to_sparse_semi_structured(c) for c in dense_copies]
                        impl = type(sp_copies[0]).__name__
                except Exception as exc:  # noqa: BLE001
                    for b in batches:
                        rows.append(failed(b, f"convert failed: {type(exc).__name__}: {exc}"))
                    print(
                        f"# {model} {out_f}x{in_f} {bname}: convert failed: {exc}", file=sys.stderr
                    )
                    continue
                for b in batches:
                    x = torch.randn(b, in_f, device=dev, dtype=torch.float16)
                    note = impl
                    fn, xs = dense_linear, x
                    try:
                        ref = dense_linear(x, wp).float()
                        if raw:
                            # what the subclass does, minus its dispatch: pad the batch to a
                            # multiple of 8 once, pass the transposed (column-major) activation
                            pad = (-b) % 8
                            xs = torch.nn.functional.pad(x, (0, 0, 0, pad)).t()
                            alg = 0
                            if bname == "cslt_raw_search":
                                alg = int(torch._cslt_sparse_mm_search(sp_copies[0], xs))
                                note += f"; alg_id={alg}"

                            def fn(xx, pk, _alg=alg):
                                return torch._cslt_sparse_mm(pk, xx, alg_id=_alg)

                            got = fn(xs, sp_copies[0])[:, :b].t().float()
                        else:
                            got = dense_linear(x, sp_copies[0]).float()
                        rel = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
                        if not rel < a.tol:
                            note += f"; MISMATCH rel_err={rel:.3g}"
                    except Exception as exc:  # noqa: BLE001
                        rows.append(failed(b, f"{impl}; matmul failed: {type(exc).__name__}: {exc}"))
                        continue
                    if a.profile and b == batches[0]:
                        _profile(
                            torch,
                            f"{model} {out_f}x{in_f} b={b} {bname}",
                            dense_linear,
                            dense_copies[0],
                            x,
                            fn,
                            sp_copies[0],
                            xs,
                            profiles,
                        )
                    for mode in modes:
                        timer = _time_eager if mode == "eager" else _time_graph
                        key = (b, mode)
                        try:
                            if key not in dense_cache:
                                dense_cache[key] = timer(
                                    torch, dense_linear, dense_copies, x, a.reps, a.warmup
                                )
                            d_us = dense_cache[key]
                            s_us = timer(torch, fn, sp_copies, xs, a.reps, a.warmup)
                            r = {
                                "dense_us": round(d_us, 3),
                                "sparse_us": round(s_us, 3),
                                "ratio": round(s_us / d_us, 4),
                                "note": note,
                            }
                        except Exception as exc:  # noqa: BLE001
                            r = {
                                "note": f"{note}; {mode} failed: {type(exc).__name__}: {exc}"[:200]
                            }
                        row = dict(
                            model=model,
                            shape=f"{out_f}x{in_f}",
                            batch=b,
                            backend=bname,
                            mode=mode,
                            cold=not a.hot,
                            copies=n,
                            rel_err=f"{rel:.2e}",
                            **r,
                        )
                        rows.append(row)
                        print(",".join(str(row.get(f, "")) for f in FIELDS), flush=True)
                del sp_copies
                torch.cuda.empty_cache()
            SparseSemiStructuredTensor._FORCE_CUTLASS = False
            del dense_copies, dense_cache
            torch.cuda.empty_cache()

    if a.fp8:
        _fp8_rows(torch, dev, a, rows)
    if a.sizes:
        sizes = ["model,shape,dtype,packed_bytes,bits_per_orig_weight,dense_bits"]
        _packed_sizes(torch, dev, sizes)
        print("\n".join(sizes))
        with open(a.sizes, "w") as fh:
            fh.write("\n".join(sizes) + "\n")
    if a.profile:
        with open(a.profile, "w") as fh:
            fh.write("\n".join(profiles) + "\n")
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
