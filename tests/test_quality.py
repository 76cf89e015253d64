"""Quality metrics hold their mathematical properties on every CPU: KL(base || candidate) is
exactly 0 for the base model itself and never negative, whatever the rounding."""

from __future__ import annotations

import numpy as np
import torch

from llmpareto.evaluators import Candidate, KLEvaluator
from llmpareto.evaluators.quality import kl_per_token, log_probs64
from llmpareto.models import load_model, resolve_model
from llmpareto.recipe import Recipe


def _tiny(tiny_model_dir):
    model, _ = load_model(resolve_model(str(tiny_model_dir)))
    windows = np.random.default_rng(0).integers(0, model.config.vocab_size, (3, 32))
    return model, windows


def test_kl_of_the_base_model_against_itself_is_exactly_zero(tiny_model_dir):
    model, windows = _tiny(tiny_model_dir)
    kl = KLEvaluator(windows, batch_size=2)
    kl.set_base(model)
    assert kl.evaluate(Candidate(Recipe.uniform("f16"), {}, model)) == {"kl_nats": 0.0}
    logits = torch.randn(5, 7, 300) * 20
    assert torch.equal(kl_per_token(log_probs64(logits), logits.clone()),
                       torch.zeros(5, 7, dtype=torch.float64))


def test_kl_is_never_negative_over_near_identical_candidates():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(8, 16, 2000, generator=gen) * 8
    for scale in (0.0, 1e-9, 1e-7, 1e-6, 1e-5, 1e-3):
        for _ in range(16):
            noise = torch.randn(base.shape, generator=gen) * scale
            kl = kl_per_token(log_probs64(base), base + noise)  # float32 rounding of base + tiny noise
            assert kl.dtype == torch.float64 and bool((kl >= 0).all()), scale
    # one ulp away in every logit: still >= 0, and tiny
    kl = kl_per_token(log_probs64(base), torch.nextafter(base, torch.full_like(base, np.inf)))
    assert bool((kl >= 0).all()) and float(kl.max()) < 1e-9


def test_kl_matches_a_float64_reference_when_it_is_large_enough():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(4, 3000, generator=gen) * 4
    cand = base + torch.randn(base.shape, generator=gen) * 0.3
    p = torch.softmax(base.double(), -1)
    ref = (p * (torch.log_softmax(base.double(), -1) - torch.log_softmax(cand.double(), -1))
           ).sum(-1)
    torch.testing.assert_close(kl_per_token(log_probs64(base), cand), ref, rtol=1e-9, atol=0)


def test_kl_of_a_model_a_rounding_away_is_never_negative(tiny_model_dir):
    model, windows = _tiny(tiny_model_dir)
    kl = KLEvaluator(windows, batch_size=3)
    kl.set_base(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    values = []
    with torch.no_grad():
        for i in range(8):  # candidates that differ from the base by float rounding only
            for n, p in model.named_parameters():
                p.copy_(base[n] * (1 + 1e-7 * torch.randn(p.shape, generator=gen)))
            values.append(kl.evaluate(Candidate(Recipe.uniform("f16"), {}, model))["kl_nats"])
        for n, p in model.named_parameters():
            p.copy_(base[n])
    assert all(v >= 0 for v in values) and max(values) < 1e-6, values
