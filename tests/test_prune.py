"""Pruning math (compress/prune.py): exact ratios, exact N:M, Wanda differs from magnitude,
SparseGPT's reconstruction beats both, zeros survive symmetric quantization."""

import numpy as np
import pytest
import torch

from llmpareto.compress.calibration import collect_input_stats
from llmpareto.compress.prune import PRUNERS, InputStats, prune
from llmpareto.errors import UserError
from llmpareto.formats import get_format


def _layer(rows=64, cols=256, tokens=512, seed=0):
    """A weight and correlated inputs whose columns differ in scale, as LLM activations do."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols ** 0.5
    x = (torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ (torch.eye(cols) + mix))
    x *= torch.exp(torch.randn(cols, generator=g, dtype=torch.float64))  # outlier columns
    stats = InputStats.empty(cols)
    stats.add(x)
    return w.float(), x, stats


@pytest.mark.parametrize("method", sorted(PRUNERS))
@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.7])
def test_unstructured_ratio_is_exact_per_module(method, sparsity):
    w, _, stats = _layer(rows=48, cols=200)
    out = prune(w, method, sparsity, "unstructured", stats)
    assert int((out == 0).sum()) == round(sparsity * w.numel())
    per_row = (out == 0).sum(1)
    assert int(per_row.max() - per_row.min()) <= 1  # spread evenly over rows


@pytest.mark.parametrize("method", sorted(PRUNERS))
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_nm_keeps_exactly_n_in_every_m(method, n, m):
    w, _, stats = _layer()
    out = prune(w, method, 0.0, f"{n}:{m}", stats)
    kept = (out != 0).reshape(w.shape[0], -1, m).sum(2)
    assert bool((kept == n).all())


def test_wanda_and_magnitude_choose_different_weights():
    w = torch.tensor([[1.0, 0.5, 0.9, 0.4]])
    stats = InputStats(torch.diag(torch.tensor([1.0, 100.0, 1.0, 1.0], dtype=torch.float64)), 8)
    mag = prune(w, "magnitude", 0.5, "unstructured")
    wan = prune(w, "wanda", 0.5, "unstructured", stats)
    assert (mag == 0).tolist() == [[False, True, False, True]]  # the two smallest |w|
    assert (wan == 0).tolist() == [[False, False, True, True]]  # 0.5's column is 10x the norm


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_the_layer_output_better_than_wanda_and_magnitude(pattern):
    w, x, stats = _layer()
    ref = x @ w.double().T
    err = {m: float(torch.linalg.norm(x @ prune(w, m, 0.5, pattern, stats).double().T - ref))
           for m in PRUNERS}
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


def test_zeros_survive_symmetric_formats_and_not_asymmetric_ones():
    w, _, stats = _layer(rows=32, cols=256)
    pruned = prune(w, "wanda", 0.5, "unstructured", stats).numpy()
    zeros = pruned == 0
    for fmt in ("q4_0", "q8_0"):
        f = get_format(fmt)
        back = f.dequantize(f.quantize(pruned), pruned.shape)
        assert bool((back[zeros] == 0).all()), fmt  # d * 0 is exactly 0
    f = get_format("q4_1")  # d * q + min: 0 lands on the grid only by chance
    back = f.dequantize(f.quantize(pruned), pruned.shape)
    assert float((back[zeros] == 0).mean()) < 0.5


def test_input_stats_hooks_match_the_inputs(tiny_model_dir):
    from llmpareto.models import load_model, resolve_model

    model, _ = load_model(resolve_model(str(tiny_model_dir)))
    windows = np.random.default_rng(0).integers(0, model.config.vocab_size, (3, 16))
    fqn = "model.layers.1.mlp.down_proj"
    stats = collect_input_stats(model, windows, [fqn], batch_size=2)[fqn]
    diag = collect_input_stats(model, windows, [fqn], diag_only=True)[fqn]
    seen = []
    h = model.get_submodule(fqn).register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(windows), use_cache=False)
    h.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1]).double()
    assert stats.tokens == diag.tokens == 48
    torch.testing.assert_close(stats.xtx, x.T @ x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(diag.col_norm, stats.col_norm, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args, match", [
    (("magnitude", 1.0, "unstructured"), r"outside \[0, 1\)"),
    (("magnitude", -0.1, "unstructured"), r"outside \[0, 1\)"),
    (("magnitude", 0.0, "4:4"), "N < M"), (("magnitude", 0.0, "2:3"), "multiple of 3"),
    (("wanda", 0.5, "unstructured"), "--calib-tokens"),
    (("sparsegpt", 0.5, "unstructured"), "--calib-tokens"), (("obs", 0.5, "unstructured"), "available"),
])
def test_bad_pruning_input_is_named(args, match):
    with pytest.raises(UserError, match=match):
        prune(torch.ones(4, 8), *args)


def test_owl_outlier_ratio_and_allocation():
    from llmpareto.compress.prune import outlier_ratio, owl_levels

    x = torch.ones(1010, dtype=torch.float64)
    x[:10] = 100.0  # mean 1.98: exactly the 10 big ones are above 5 x mean
    assert outlier_ratio([x[:500], x[500:].reshape(10, 51)]) == pytest.approx(10 / 1010)
    levels = owl_levels([0.01, 0.02, 0.04], [1, 1, 2], target=0.5, lam=0.08)
    assert (levels[0] * 1 + levels[1] * 1 + levels[2] * 2) / 4 == pytest.approx(0.5, abs=1e-12)
    assert levels[0] > levels[1] > levels[2]  # more outliers: pruned less
    assert levels[0] - levels[2] == pytest.approx(0.16, abs=1e-12)  # a band of 2 x lambda
    assert owl_levels([0.3, 0.3], [5, 7], 0.4) == [0.4, 0.4]


def test_owl_baselines_snap_to_the_grid_at_the_same_mean(tiny_model_dir):
    from llmpareto.arch import Arch
    from llmpareto.models import load_model, resolve_model
    from llmpareto.spaces import build_space

    model, _ = load_model(resolve_model(str(tiny_model_dir)))
    arch = Arch.from_model(model)
    grid = [round(0.05 * i, 2) for i in range(15)]
    space = build_space("sparsity", arch, levels=grid, granularity="module")
    assert not any(label.startswith("OWL") for label, _ in space.baselines())
    ratios = {k: 0.001 * (i % 5) for i, k in enumerate(space.groups)}
    space.set_outliers(ratios)
    owl = dict(space.baselines())["OWL 50% wanda"]
    sizes = {k: sum(t.numel for t in ts) for k, ts in space.groups.items()}
    mean = sum(owl[k] * n for k, n in sizes.items()) / sum(sizes.values())
    assert abs(mean - 0.5) <= 0.025 and set(owl.values()) <= set(grid)
    low, high = min(ratios, key=ratios.get), max(ratios, key=ratios.get)
    assert owl[low] > owl[high]  # fewer outliers, pruned more
