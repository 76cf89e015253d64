"""Distillation: the survey's losses against hand computations, and the loop on a tiny Llama."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from llmpareto.compress.distill import (
    distill,
    feature_loss,
    kd_loss,
    kd_loss_topk,
    make_projections,
    quantized_state,
    ste_fake_quant,
    teacher_top_k,
    topk_targets,
)
from llmpareto.errors import UserError
from llmpareto.formats import get_format

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}


def tiny_llama(seed: int = 0, **config) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **config})).float()


def noisy_copy(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    student = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return student


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small gain nothing from threads, and a busy second core makes torch's
    spinning workers wait on each other (a 20-step run went from 0.2 s to 19 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def windows():
    return np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(8, 16), dtype=np.int64)


def test_kd_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    y = torch.randint(0, 7, (2, 5), generator=g)
    temp, alpha = 2.0, 0.3
    s64, t64 = s.double(), t.double()
    p_s = torch.exp(s64) / torch.exp(s64).sum(-1, keepdim=True)
    ce = -torch.log(p_s.gather(-1, y.unsqueeze(-1))).mean()
    q_t = torch.exp(t64 / temp) / torch.exp(t64 / temp).sum(-1, keepdim=True)
    q_s = torch.exp(s64 / temp) / torch.exp(s64 / temp).sum(-1, keepdim=True)
    kl = (q_t * (torch.log(q_t) - torch.log(q_s))).sum(-1).mean()
    expected = alpha * ce + (1 - alpha) * temp**2 * kl
    got = kd_loss(s, t, y, temperature=temp, alpha=alpha)
    assert abs(got.item() - expected.item()) < 1e-6


def test_kd_loss_ignores_masked_tokens():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 4, 5, generator=g), torch.randn(1, 4, 5, generator=g)
    y = torch.tensor([[1, 2, -100, -100]])
    full = kd_loss(s[:, :2], t[:, :2], y[:, :2], alpha=0.4)
    assert torch.allclose(kd_loss(s, t, y, alpha=0.4), full, atol=1e-7)


def test_kl_part_vanishes_when_student_equals_teacher():
    logits = torch.randn(3, 6, 11, generator=torch.Generator().manual_seed(2)) * 5
    y = torch.zeros(3, 6, dtype=torch.long)
    assert abs(kd_loss(logits, logits.clone(), y, temperature=3.0, alpha=0.0).item()) < 1e-7
    assert kd_loss(logits, logits + 1.0, y, alpha=0.0).item() < 1e-6  # shift-invariant
    assert kd_loss(logits, -logits, y, alpha=0.0).item() > 0.1


def test_feature_loss_identity_and_learned_projections():
    h = [torch.randn(2, 3, 8) for _ in range(3)]
    same = make_projections(8, 8, 2)
    assert not any(p.requires_grad for p in same.parameters())
    assert feature_loss(h, h, same, [(1, 1), (2, 2)]).item() < 1e-12
    assert feature_loss(h, h, None, [(1, 2)]).item() > 0.1
    wide = make_projections(8, 16, 1)
    assert all(p.requires_grad for p in wide.parameters())
    t = [torch.randn(2, 3, 16)]
    loss = feature_loss(h, t, wide, [(2, 0)])
    loss.backward()
    assert wide[0].weight.grad.abs().sum() > 0


def test_ste_forward_is_on_grid_and_gradient_passes_through():
    w = (0.1 * torch.randn(4, 64, generator=torch.Generator().manual_seed(3))).requires_grad_()
    fmt = get_format("q4_0")
    q = ste_fake_quant(w, "q4_0")
    expected = fmt.dequantize(fmt.quantize(w.detach().numpy()), (4, 64))
    assert np.array_equal(q.detach().numpy(), expected)
    upstream = torch.randn(4, 64)
    (q * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_distill_shifts_logits_for_next_token_prediction(teacher, windows):
    student = noisy_copy(teacher)
    ids = torch.from_numpy(windows)
    with torch.no_grad():
        s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
    expected = kd_loss(s[:, :-1], t[:, :-1], ids[:, 1:], temperature=2.0, alpha=0.5)
    out = distill(student, teacher, windows, steps=1, lr=0.0, batch_size=len(windows))
    assert abs(out["losses"][0] - expected.item()) < 1e-5


def test_distillation_lowers_the_loss_and_reuses_teacher_logits(teacher, windows):
    student = noisy_copy(teacher)
    out = distill(student, teacher, windows, steps=20, lr=1e-3, batch_size=4)
    losses = out["losses"]
    assert len(losses) == 20 and out["resumed_from"] == 0
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    # 8 windows in batches of 4: the teacher runs for the first epoch's 2 batches only
    assert out["teacher_forwards"] == 2
    assert out["teacher_cache_bytes"] == 8 * 15 * TINY["vocab_size"] * 4
    again = distill(noisy_copy(teacher), teacher, windows, steps=20, lr=1e-3,
                    cache_teacher=False)
    assert again["teacher_forwards"] == 20 and again["teacher_cache_bytes"] == 0
    assert np.allclose(again["losses"], losses, atol=1e-5)


def test_top_k_soft_targets_are_exact_with_the_whole_vocabulary_and_a_lower_bound_below():
    """kd_loss_topk with k = vocab equals kd_loss (float32, 1e-5); with k < vocab its KL part is
    the KL of the merged distributions: <= the full KL (merging never raises a KL), equal to
    a hand computation of the (k + 1)-bucket KL, and rising towards the full KL as k grows."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 300, generator=g) * 2, torch.randn(2, 5, 300, generator=g) * 2
    y = torch.randint(0, 300, (2, 5), generator=g)
    full = kd_loss(s, t, y, temperature=2.0, alpha=0.0)
    exact = kd_loss_topk(s, *topk_targets(t, 300, 2.0), y, temperature=2.0, alpha=0.0)
    assert abs(float(exact) - float(full)) < 1e-5 * float(full)
    got = [float(kd_loss_topk(s, *topk_targets(t, k, 2.0), y, 2.0, 0.0)) for k in (4, 32, 128)]
    assert got[0] < got[1] < got[2] < float(full)
    # the merged KL by hand, k = 32, float64
    k = 32
    pt, ps = torch.softmax(t.double() / 2, -1), torch.softmax(s.double() / 2, -1)
    top = pt.topk(k, -1).indices
    a, b = pt.gather(-1, top), ps.gather(-1, top)
    ra, rb = 1 - a.sum(-1), 1 - b.sum(-1)
    hand = 4 * ((a * (a / b).log()).sum(-1) + ra * (ra / rb).log()).mean()
    assert abs(got[1] - float(hand)) < 1e-4 * float(hand)
    # the hard-label part is unchanged
    both = kd_loss_topk(s, *topk_targets(t, 300, 2.0), y, 2.0, 0.5)
    assert abs(float(both) - float(kd_loss(s, t, y, 2.0, 0.5))) < 1e-5 * float(both)
    # a teacher whose top k hold (almost) all its mass: the rest bucket drops out
    peaked = torch.full((1, 1, 300), -1e4)
    peaked[..., :3] = torch.tensor([3.0, 2.0, 1.0])
    idx, log_p, log_rest = topk_targets(peaked, 3, 1.0)
    assert float(log_rest.max()) < -1e3
    assert torch.isneginf(topk_targets(t, 300, 2.0)[2]).all()  # nothing left: exactly -inf
    loss = kd_loss_topk(s[:1, :1], idx, log_p, log_rest, y[:1, :1], 1.0, 0.0)
    assert torch.isfinite(loss) and abs(float(loss) - float(
        kd_loss(s[:1, :1], peaked, y[:1, :1], 1.0, 0.0))) < 1e-4


def test_distillation_keeps_top_k_teacher_targets_in_far_less_memory(teacher, windows):
    """top_k=16 on a 128-token vocabulary: the cache holds (int32 index, float32
    log-probability) per kept token plus the rest's mass, the loss still falls; "auto" keeps
    everything up to a 65,536-token vocabulary and 1024 of a 262k one."""
    student = noisy_copy(teacher)
    out = distill(student, teacher, windows, steps=20, lr=1e-3, batch_size=4, top_k=16)
    assert out["teacher_cache_bytes"] == 8 * 15 * (16 * 8 + 4)
    assert np.mean(out["losses"][-3:]) < np.mean(out["losses"][:3])
    assert teacher_top_k(49152) is None and teacher_top_k(262144) == 1024
    assert teacher_top_k(128, 16) == 16 and teacher_top_k(128, 500) is None


def test_feature_distillation_into_a_narrower_student(teacher, windows):
    student = tiny_llama(5, hidden_size=16, num_hidden_layers=1)
    out = distill(student, teacher, windows, steps=15, lr=3e-3, feature_weight=1.0)
    assert np.mean(out["losses"][-3:]) < np.mean(out["losses"][:3])


def test_killed_distillation_resumes_from_its_checkpoint(teacher, windows, tmp_path):
    ckpt = tmp_path / "distill.pt"
    kw = {"lr": 1e-3, "batch_size": 3, "checkpoint_every": 5, "seed": 7}
    first = distill(noisy_copy(teacher), teacher, windows, steps=5, checkpoint=ckpt, **kw)
    assert ckpt.exists() and first["resumed_from"] == 0
    resumed_student = noisy_copy(teacher, seed=99)  # its own weights are replaced on resume
    resumed = distill(resumed_student, teacher, windows, steps=10, checkpoint=ckpt, **kw)
    straight_student = noisy_copy(teacher)
    straight = distill(straight_student, teacher, windows, steps=10, **kw)
    assert resumed["resumed_from"] == 5
    assert np.allclose(resumed["losses"], straight["losses"], atol=1e-6)
    for (name, a), b in zip(resumed_student.state_dict().items(),
                            straight_student.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    with pytest.raises(UserError, match="other settings"):
        distill(noisy_copy(teacher), teacher, windows, steps=12, checkpoint=ckpt,
                **{**kw, "lr": 5e-4})


def test_qat_keeps_the_student_on_its_format_grid(teacher, windows):
    name = "model.layers.0.mlp.down_proj"
    student = noisy_copy(teacher)
    before = student.get_submodule(name).weight.detach().clone()
    qat = distill(student, teacher, windows, steps=5, lr=1e-3, qat_formats={name: "q4_0"})
    plain = distill(noisy_copy(teacher), teacher, windows, steps=1, lr=1e-3)
    assert qat["losses"][0] != pytest.approx(plain["losses"][0], abs=1e-7)  # forward is quantized
    after = student.get_submodule(name).weight.detach()
    assert not torch.allclose(before, after)  # weight_decay=0: only the STE gradient moves it
    q = quantized_state(student, {name: "q4_0"})[f"{name}.weight"].numpy()
    fmt = get_format("q4_0")
    assert np.array_equal(fmt.dequantize(fmt.quantize(q), q.shape), q)
    assert not np.array_equal(q, after.numpy())


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps must be at least 1, got 0"),
    ({"windows": np.zeros((0, 16), dtype=np.int64)}, r"shape \(0, 16\)"),
    ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
    ({"alpha": 1.5}, r"alpha must be in \[0, 1\], got 1.5"),
    ({"qat_formats": {"model.nope": "q4_0"}}, "model.nope"),
    ({"qat_formats": {"model.layers.0.mlp.down_proj": "q3_9"}}, "q3_9"),
])
def test_bad_input_is_a_user_error(teacher, windows, kwargs, match):
    args = {"windows": windows, "steps": 2, **kwargs}
    with pytest.raises(UserError, match=match):
        distill(copy.deepcopy(teacher), teacher, **args)
