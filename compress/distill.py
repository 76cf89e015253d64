"""Knowledge distillation of a compressed causal-LM student from its teacher (survey's losses).

Pure loss functions (`kd_loss`, `feature_loss`, `ste_fake_quant`) next to one training loop,
`distill`, that reuses teacher outputs, checkpoints atomically and resumes the same batch order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmpareto.compress.dequant import dequantize_torch
from llmpareto.errors import UserError
from llmpareto.formats import effective_format, get_format

CHECKPOINT_VERSION = 1


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 2.0, alpha: float = 0.5,
            ignore_index: int = -100) -> torch.Tensor:
    """alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T)).

    Logits are (batch, seq, vocab) and already aligned with `labels` (batch, seq): position i
    predicts labels[:, i]. Shifting for next-token prediction is the caller's job (`distill`
    does it). Both parts are means over tokens whose label is not `ignore_index`; T^2 keeps
    the soft-target gradient's scale independent of T (Hinton et al. 2015).
    """
    vocab = student_logits.shape[-1]
    s, t = (x.float().reshape(-1, vocab) for x in (student_logits, teacher_logits))
    y = labels.reshape(-1)
    keep = y != ignore_index
    n = keep.sum().clamp(min=1)
    ce = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="sum") / n
    log_s = F.log_softmax(s / temperature, dim=-1)
    log_t = F.log_softmax(t / temperature, dim=-1)
    # log_t - log_s is exactly 0 where the logits agree, so then the KL part is exactly 0
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    kl = torch.where(keep, kl, torch.zeros_like(kl)).sum() / n
    return alpha * ce + (1 - alpha) * temperature**2 * kl


def topk_targets(teacher_logits: torch.Tensor, k: int, temperature: float = 2.0,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's soft targets kept small: per position the `k` most likely tokens at
    `temperature` (indices), their log-probabilities, and the log of the mass left to the rest
    of the vocabulary (-inf when none is left). A 262k vocabulary's full targets take 1 MB a
    token in float32; k = 1024 takes 8 KB."""
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    k = min(k, log_t.shape[-1])
    top, idx = log_t.topk(k, dim=-1)
    return idx.to(torch.int32), top, _log_rest(log_t, idx)


def _log_rest(log_p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability outside `idx`, summed from the entries themselves (not 1 - the
    top's sum, which rounds to a spurious tail or to -inf): -inf exactly when nothing is left."""
    return torch.logsumexp(log_p.scatter(-1, idx.long(), -torch.inf), dim=-1)


def kd_loss_topk(student_logits: torch.Tensor, idx: torch.Tensor, log_p: torch.Tensor,
                 log_rest: torch.Tensor, labels: torch.Tensor, temperature: float = 2.0,
                 alpha: float = 0.5, ignore_index: int = -100) -> torch.Tensor:
    """kd_loss with the teacher given as `topk_targets`: the KL part is the KL between the two
    distributions with every token outside the teacher's top k merged into one "rest" bucket.
    Exact when k is the vocabulary (or the rest holds no mass); otherwise a lower bound of the
    full KL (merging outcomes never raises a KL), tight when the teacher's tail is small."""
    vocab = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, vocab)
    k = idx.shape[-1]
    idx, log_p, log_rest = idx.reshape(-1, k).long(), log_p.reshape(-1, k).float(), \
        log_rest.reshape(-1).float()
    y = labels.reshape(-1)
    keep = y != ignore_index
    n = keep.sum().clamp(min=1)
    ce = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="sum") / n
    log_s = F.log_softmax(s / temperature, dim=-1)
    log_s_top = log_s.gather(-1, idx)
    kl = (log_p.exp() * (log_p - log_s_top)).sum(-1)
    rest = log_rest > -torch.inf
    log_s_rest = _log_rest(log_s, idx)
    kl = kl + torch.where(rest, log_rest.exp() * (log_rest - log_s_rest), torch.zeros_like(kl))
    kl = torch.where(keep, kl, torch.zeros_like(kl)).sum() / n
    return alpha * ce + (1 - alpha) * temperature**2 * kl


def teacher_top_k(vocab: int, asked: int | str | None = "auto") -> int | None:
    """How many of the teacher's log-probabilities a distillation keeps per token: None (all)
    for vocabularies up to 65,536 with "auto", else the top 1024 plus the rest's mass."""
    if asked == "auto":
        return None if vocab <= 65536 else 1024
    return None if asked is None or int(asked) >= vocab else int(asked)


def make_projections(student_width: int, teacher_width: int, n: int) -> torch.nn.ModuleList:
    """n bias-free Linear maps student -> teacher width: learned where the widths differ;
    identity and frozen where they agree (the student's own states must then match)."""
    layers = torch.nn.ModuleList(
        torch.nn.Linear(student_width, teacher_width, bias=False) for _ in range(n))
    if student_width == teacher_width:
        for layer in layers:
            torch.nn.init.eye_(layer.weight)
            layer.weight.requires_grad_(False)
    return layers


def feature_loss(student_hidden: Sequence[torch.Tensor],
                 teacher_hidden: Sequence[torch.Tensor],
                 projections: torch.nn.ModuleList | None,
                 layer_map: list[tuple[int, int]]) -> torch.Tensor:
    """Mean over (student index, teacher index) pairs of MSE(projections[k](h_s), h_t); pair k
    uses projections[k] (None: no projection, the widths must already agree)."""
    if not layer_map:
        raise UserError("feature_loss needs at least one (student, teacher) layer pair")
    total = torch.zeros(())
    for k, (i, j) in enumerate(layer_map):
        h = student_hidden[i].float()
        if projections is not None:
            h = projections[k](h)
        total = total + F.mse_loss(h, teacher_hidden[j].float())
    return total / len(layer_map)


def fake_quant(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """`weight` quantized to `fmt` (its llama.cpp fallback where rows don't fit) and
    dequantized: the exact values an export in that format holds. No gradient."""
    w = weight.detach().float().cpu()
    shape = (w.shape[0], w.shape[1])
    fmt = effective_format(fmt, shape[1])
    packed = get_format(fmt).quantize(w.numpy())
    q = dequantize_torch(fmt, packed, shape)
    if q is None:
        q = torch.from_numpy(get_format(fmt).dequantize(packed, shape))
    return q.to(device=weight.device, dtype=weight.dtype)


def ste_fake_quant(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """Straight-through estimator: the value is fake_quant(weight, fmt), the gradient passes to
    `weight` unchanged. Written q + (w - w) rather than w + (q - w) so the forward value is
    exactly on the grid (w - w.detach() is an exact zero; w + (q - w) can be off by an ulp)."""
    return fake_quant(weight, fmt) + (weight - weight.detach())


def _qat_weights(student: torch.nn.Module,
                 qat_formats: dict[str, str] | None) -> dict[str, tuple[torch.Tensor, str]]:
    """module name -> (its 2-D weight Parameter, format), checked."""
    out = {}
    for name, fmt in (qat_formats or {}).items():
        get_format(fmt)
        w = getattr(dict(student.named_modules()).get(name), "weight", None)
        if not isinstance(w, torch.nn.Parameter) or w.dim() != 2:
            raise UserError(f"qat_formats names {name!r}, which is not a module of the student "
                            "with a 2-D weight; use module names such as "
                            "model.layers.0.mlp.down_proj")
        out[name] = (w, fmt)
    return out


def quantized_state(student: torch.nn.Module, qat_formats: dict[str, str]) -> dict:
    """{'<module>.weight': float32 weights on the format's grid} for each module in
    qat_formats: what an export of the trained student in those formats holds."""
    return {f"{name}.weight": fake_quant(w, fmt)
            for name, (w, fmt) in _qat_weights(student, qat_formats).items()}


def _batch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Window indices of `step`: a fresh permutation per epoch, a function of (seed, step)
    alone so a resumed run sees the same batches as an uninterrupted one."""
    pos = np.arange(step * batch_size, (step + 1) * batch_size)
    perms = {e: np.random.default_rng([seed, e]).permutation(n) for e in set(pos // n)}
    return np.array([perms[p // n][p % n] for p in pos])


class _TeacherCache:
    """Teacher logits (and mapped hidden states) per window index, computed without gradients
    and kept on the host while they fit in `budget_bytes`; a window past it is recomputed.
    One window costs 4 * ((len - 1) * vocab + len * hidden * mapped layers) bytes; with
    `top_k` the logits are kept as `topk_targets` instead: 8 * (len - 1) * (top_k + 1)."""

    def __init__(self, teacher: torch.nn.Module, layers: list[int], budget_bytes: int,
                 top_k: int | None = None, temperature: float = 2.0):
        self.teacher, self.layers, self.budget = teacher, layers, budget_bytes
        self.top_k, self.temperature = top_k, temperature
        self.entries: dict[int, list[torch.Tensor]] = {}
        self.nbytes = self.forwards = 0

    @torch.no_grad()
    def get(self, windows: torch.Tensor, idx: np.ndarray, device) -> list[torch.Tensor]:
        missing = sorted({int(i) for i in idx} - set(self.entries))
        fresh = {}
        if missing:
            dev = next(self.teacher.parameters()).device
            out = self.teacher(input_ids=windows[missing].to(dev), use_cache=False,
                               output_hidden_states=bool(self.layers))
            self.forwards += 1
            logits = out.logits[:, :-1].float()
            soft = [logits] if self.top_k is None else \
                list(topk_targets(logits, self.top_k, self.temperature))
            parts = soft + [out.hidden_states[j] for j in self.layers]
            for r, i in enumerate(missing):
                fresh[i] = [p[r].detach().cpu() for p in parts]
                size = sum(p.numel() * p.element_size() for p in fresh[i])
                if self.nbytes + size <= self.budget:
                    self.entries[i] = fresh[i]
                    self.nbytes += size
        rows = [self.entries.get(int(i)) or fresh[int(i)] for i in idx]
        return [torch.stack(col).to(device) for col in zip(*rows)]


def _layer_pairs(student, teacher, layer_map: list[tuple[int, int]] | None) -> list[tuple]:
    """`layer_map` checked, or by default each student block's output paired with the
    teacher block at the same relative depth (indices into hidden_states; 0: embeddings)."""
    ns, nt = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    if layer_map is None:
        return [(i, round(i * nt / ns)) for i in range(1, ns + 1)]
    bad = [p for p in layer_map if not (0 <= p[0] <= ns and 0 <= p[1] <= nt)]
    if bad or not layer_map:
        raise UserError(f"layer_map pairs {bad or layer_map} are out of range: student hidden "
                        f"states are 0..{ns}, teacher's 0..{nt}")
    return [tuple(p) for p in layer_map]


def _check(steps, windows, temperature, alpha, batch_size, checkpoint_every) -> None:
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    shape = getattr(windows, "shape", None)
    if not isinstance(windows, np.ndarray) or windows.ndim != 2 or min(shape) < 1 or shape[1] < 2:
        raise UserError(f"windows must be a non-empty (n_windows, window_len >= 2) array of "
                        f"token ids, got shape {shape}; pass calibration text windows")
    if not temperature > 0:
        raise UserError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise UserError(f"alpha must be in [0, 1], got {alpha}")
    if min(batch_size, checkpoint_every) < 1:
        raise UserError(f"batch_size and checkpoint_every must be >= 1, got {batch_size} and "
                        f"{checkpoint_every}")


def _save(path: Path, step: int, student, projections, opt, losses: list, cfg: dict) -> None:
    """{version, step, student, projections, optimizer, rng, losses, config} to `path`."""
    from llmpareto import atomic

    with atomic.atomic_path(path) as tmp:  # a kill leaves the old checkpoint or the new
        torch.save({"version": CHECKPOINT_VERSION, "step": step,
                    "student": student.state_dict(), "projections": projections.state_dict(),
                    "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                    "losses": losses, "config": cfg}, tmp)


def _resume(path: Path | None, config: dict, steps: int) -> dict | None:
    """The checkpoint at `path` if there is one, written with the same `config`."""
    if path is None or not path.exists():
        return None
    state = torch.load(path, weights_only=True)
    if state.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} is not a distillation checkpoint of version "
                        f"{CHECKPOINT_VERSION}; delete it to start afresh")
    differ = [k for k in config if state["config"].get(k) != config[k]]
    if differ:
        raise UserError(f"{path} was written with other settings ({', '.join(differ)}); "
                        "use the same settings or delete the checkpoint")
    if state["step"] > steps:
        raise UserError(f"{path} is at step {state['step']}, past steps={steps}; "
                        "raise steps or delete the checkpoint")
    return state


def _student_loss(student, projections, qat, ids, teacher_out, cfg) -> torch.Tensor:
    """One batch's loss: kd_loss on next-token-shifted logits, plus the feature loss."""
    kwargs = {"input_ids": ids, "use_cache": False, "output_hidden_states": bool(cfg["layer_map"])}
    if qat:  # the fake-quantized weights stand in for the Parameters during this call only
        fake = {f"{n}.weight": ste_fake_quant(w, fmt) for n, (w, fmt) in qat.items()}
        out = torch.func.functional_call(student, fake, (), kwargs)
    else:
        out = student(**kwargs)
    if cfg.get("top_k") is None:
        t_logits, *t_hidden = teacher_out
        loss = kd_loss(out.logits[:, :-1], t_logits, ids[:, 1:], cfg["temperature"],
                       cfg["alpha"])
    else:
        idx, log_p, log_rest, *t_hidden = teacher_out
        loss = kd_loss_topk(out.logits[:, :-1], idx, log_p, log_rest, ids[:, 1:],
                            cfg["temperature"], cfg["alpha"])
    if cfg["layer_map"]:
        pairs = [(i, k) for k, (i, _) in enumerate(cfg["layer_map"])]
        loss = loss + cfg["feature_weight"] * feature_loss(out.hidden_states, t_hidden,
                                                           projections, pairs)
    return loss


def _setup(student, teacher, n_pairs: int, cfg: dict, state: dict | None) -> tuple:
    """Projections, trained parameters, optimizer, start step, losses (resumed if `state`)."""
    device = next(student.parameters()).device
    projections = make_projections(student.config.hidden_size, teacher.config.hidden_size,
                                   n_pairs).to(device)
    params = [p for p in student.parameters() if p.requires_grad and p.is_floating_point()]
    params += [p for p in projections.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if state is None:
        return projections, params, opt, 0, []
    student.load_state_dict(state["student"])
    projections.load_state_dict(state["projections"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return projections, params, opt, state["step"], list(state["losses"])


def distill(student: torch.nn.Module, teacher: torch.nn.Module, windows: np.ndarray,
            steps: int, lr: float = 1e-4, batch_size: int = 4, temperature: float = 2.0,
            alpha: float = 0.5, feature_weight: float = 0.0,
            layer_map: list[tuple[int, int]] | None = None,
            qat_formats: dict[str, str] | None = None, checkpoint: Path | None = None,
            checkpoint_every: int = 50, progress: bool = False, seed: int = 0,
            cache_teacher: bool = True, teacher_cache_bytes: int = 2**30,
            weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
            keep_zero: dict[str, torch.Tensor] | None = None,
            top_k: int | str | None = "auto") -> dict:
    """Train `student` in place (AdamW on its parameters that require grad) to match `teacher`
    on token `windows` (n_windows, window_len) for `steps` steps of `batch_size` windows.

    Loss: kd_loss on next-token-shifted logits, plus feature_weight * feature_loss over
    `layer_map` (hidden-state indices; default: each student block to the teacher block at
    the same depth). `qat_formats` {module name: format} fake-quantizes those weights in
    every forward (STE); export them with the same formats (see quantized_state). Resumes
    from `checkpoint` when it exists and writes it every `checkpoint_every` steps and at the
    end. Teacher outputs are cached up to `teacher_cache_bytes` of host memory.
    `keep_zero` {module name: bool mask of kept weights}: a pruned module stays pruned (its
    weights are multiplied by the mask after every step). `top_k`: the teacher's soft
    targets kept as its top k log-probabilities plus the rest's mass (`kd_loss_topk`; None: all
    of them; "auto": all up to a 65,536-token vocabulary, else 1024, `teacher_top_k`).
    """
    _check(steps, windows, temperature, alpha, batch_size, checkpoint_every)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    qat = _qat_weights(student, qat_formats)
    pairs = _layer_pairs(student, teacher, layer_map) if feature_weight > 0 else []
    cfg = {"lr": lr, "batch_size": batch_size, "temperature": temperature, "alpha": alpha,
           "feature_weight": feature_weight, "qat_formats": dict(qat_formats or {}),
           "layer_map": [list(p) for p in pairs], "weight_decay": weight_decay,
           "max_grad_norm": max_grad_norm, "seed": seed, "windows_shape": list(windows.shape),
           "top_k": teacher_top_k(int(getattr(getattr(teacher, "config", None), "vocab_size",
                                                  0) or 0), top_k)}
    state = _resume(checkpoint, cfg, steps)
    ids_all = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
    device = next(student.parameters()).device
    cache = _TeacherCache(teacher.eval(), [j for _, j in pairs],
                          teacher_cache_bytes if cache_teacher else 0, cfg["top_k"], temperature)
    named = dict(student.named_parameters())
    masks = {named[f"{m}.weight"]: mask for m, mask in (keep_zero or {}).items()}
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(seed)
        projections, params, opt, start, losses = _setup(student, teacher, len(pairs), cfg,
                                                         state)
        from tqdm.auto import tqdm

        was_training = student.training
        student.train()
        bar = tqdm(total=steps, initial=start, disable=not progress, desc="distill", unit="step")
        t0 = time.perf_counter()
        for step in range(start, steps):
            idx = _batch_indices(seed, step, batch_size, len(ids_all))
            loss = _student_loss(student, projections, qat, ids_all[idx].to(device),
                                 cache.get(ids_all, idx, device), cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            with torch.no_grad():
                for param, mask in masks.items():
                    param.mul_(mask)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                _save(checkpoint, step + 1, student, projections, opt, losses, cfg)
        bar.close()
        student.train(was_training)
    ran = steps - start
    return {"steps": steps, "losses": losses, "resumed_from": start,
            "seconds_per_step": (time.perf_counter() - t0) / ran if ran else 0.0,
            "teacher_cache_bytes": cache.nbytes, "teacher_forwards": cache.forwards}
