"""The cost model's Arch from a config.json's numbers, without torch: what each supported
family's blocks hold (llmpareto.families), so `llmpareto cost` can cost a 70B config in
milliseconds. Checked against transformers' own (meta-device) models in the tests.
"""

from __future__ import annotations

from typing import Any

from llmpareto.arch import Arch, Tensor2D
from llmpareto.errors import UserError
from llmpareto.families import _BY_MODEL_TYPE

# Config defaults of the transformers classes where a config.json may leave a key out.
_TIED = {"gemma2": True, "gemma3": True}
_SLIDING = {"gemma2": 2, "gemma3": 6}  # every n-th block is full, the others slide
_WINDOW = {"gemma2": 4096, "gemma3": 4096}


def _layer_types(cfg: dict, family: str, n: int) -> list[str]:
    types = cfg.get("layer_types")
    if types:
        return list(types)
    every = _SLIDING.get(family)
    if every is None:
        return ["full_attention"] * n
    if family == "gemma2":  # transformers: sliding on even blocks
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]


def arch_from_config(cfg: dict[str, Any]) -> Arch | None:
    """The Arch of a supported family's config dict; None for another family (the caller
    builds it with transformers instead)."""
    if cfg.get("model_type") == "gemma3" and "text_config" in cfg:  # the multimodal wrapper
        cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
    fam = _BY_MODEL_TYPE.get(cfg.get("model_type") or "")
    if fam is None:
        return None
    try:
        h, n, ffn = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), \
            int(cfg["intermediate_size"])
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        hd = int(cfg.get("head_dim") or h // heads)
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"config.json of a {fam.name} model lacks a usable {exc} entry") from None
    q, kvd = heads * hd, kv * hd
    if fam.fused:  # Phi-3: one q/k/v tensor, one gate/up tensor (in its modules' order)
        kinds = [("self_attn.o_proj", h, q), ("self_attn.qkv_proj", q + 2 * kvd, h),
                 ("mlp.gate_up_proj", 2 * ffn, h), ("mlp.down_proj", h, ffn)]
    else:
        kinds = [("self_attn.q_proj", q, h), ("self_attn.k_proj", kvd, h),
                 ("self_attn.v_proj", kvd, h), ("self_attn.o_proj", h, q),
                 ("mlp.gate_proj", ffn, h), ("mlp.up_proj", ffn, h), ("mlp.down_proj", h, ffn)]
    linears = [Tensor2D(f"model.layers.{i}.{kind}", rows, cols, i, kind)
               for i in range(n) for kind, rows, cols in kinds]
    per_layer = 2 * h  # input and post-attention norms
    if fam.name in ("gemma2", "gemma3"):
        per_layer = 4 * h  # pre- and post-norms around attention and MLP
    if fam.name in ("qwen3", "gemma3"):
        per_layer += 2 * hd  # q and k norms
    if fam.name == "qwen2":
        per_layer += q + 2 * kvd  # q, k and v biases
    tied = bool(cfg.get("tie_word_embeddings", _TIED.get(fam.name, False)))
    windows = [0] * n
    if fam.kv_sliding:
        window = int(cfg.get("sliding_window") or _WINDOW[fam.name])
        windows = [window if t == "sliding_attention" else 0
                   for t in _layer_types(cfg, fam.name, n)]
    return Arch(linears=linears,
                embedding=Tensor2D("model.embed_tokens", vocab, h, None, "embed"),
                lm_head=None if tied else Tensor2D("lm_head", vocab, h, None, "lm_head"),
                other_params=n * per_layer + h, n_layers=n, n_kv_heads=kv, head_dim=hd,
                hidden_size=h, vocab_size=vocab, n_heads=heads, layer_other_params=per_layer,
                family=fam.name, kv_windows=windows)
