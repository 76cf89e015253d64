"""The per-tensor formats `llama-quantize` picks for a preset (Q4_K_M, ...) on a Llama-family
shape, from the shape alone: what a published "Q4_K_M" speed was measured on, without weights.

A transcription of llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp, vendored in
llama-cpp-python 0.3.36) for dense Llama models quantized without an importance matrix and
without overrides. `tests/test_preset_rules.py` checks it against the types llama.cpp's own
quantizer writes (spaces/presets.py) on models of several shapes.
"""

from __future__ import annotations

from llmpareto.arch import Arch
from llmpareto.errors import UserError
from llmpareto.formats import effective_format, get_format
from llmpareto.recipe import Recipe

# preset -> the default type of its tensors (llama_ftype_get_default_type)
DEFAULT_TYPE = {"F16": "f16", "Q8_0": "q8_0", "Q5_1": "q5_1", "Q5_0": "q5_0", "Q4_1": "q4_1",
                "Q4_0": "q4_0", "Q6_K": "q6_K", "Q5_K_M": "q5_K", "Q5_K_S": "q5_K",
                "Q4_K_M": "q4_K", "Q4_K_S": "q4_K", "Q3_K_L": "q3_K", "Q3_K_M": "q3_K",
                "Q3_K_S": "q3_K", "Q2_K": "q2_K"}
RULE_PRESETS = tuple(DEFAULT_TYPE)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layers that get more bits: the first and last eighth, and every third."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _attn_v(preset: str, i: int, n: int, gqa: int, is_70b: bool, base: str) -> str:
    fmt = {"Q2_K": "q4_K" if gqa >= 4 else "q3_K",
           "Q3_K_M": "q5_K" if i < 2 else "q4_K",
           "Q3_K_L": "q5_K",
           "Q4_K_M": "q6_K" if use_more_bits(i, n) else base,
           "Q5_K_M": "q6_K" if use_more_bits(i, n) else base,
           "Q4_K_S": "q5_K" if i < 4 else base}.get(preset, base)
    # 70B: 8 query heads share each V head, so more bits on attn_v cost little
    return "q5_K" if is_70b and fmt in ("q3_K", "q4_K") else fmt


def _ffn_down(preset: str, i: int, n: int, base: str) -> str:
    return {"Q2_K": "q3_K",
            "Q3_K_M": "q5_K" if i < n // 16 else "q4_K",
            "Q3_K_L": "q5_K",
            "Q4_K_M": "q6_K" if use_more_bits(i, n) else base,
            "Q5_K_M": "q6_K" if use_more_bits(i, n) else base,
            "Q4_K_S": "q5_K" if i < n // 8 else base}.get(preset, base)


def _output(base: str, cols: int) -> str:
    """The output head (and a tied embedding, which llama.cpp quantizes as the output)."""
    if base == "f16":
        return base
    if cols % get_format(base).block_size:
        return "q8_0"
    return base if base == "q8_0" else "q6_K"


def preset_formats(arch: Arch, preset: str) -> dict[str, str]:
    """fqn -> the format llama.cpp stores each weight of `arch` in under `preset` (row
    fallbacks applied)."""
    if preset not in DEFAULT_TYPE:
        raise UserError(f"no per-tensor rules for llama.cpp preset {preset!r}; known: "
                        f"{', '.join(RULE_PRESETS)}")
    base = DEFAULT_TYPE[preset]
    n, gqa = arch.n_layers, arch.n_heads // max(arch.n_kv_heads, 1)
    is_70b = n == 80 and arch.n_heads != arch.n_kv_heads  # llama.cpp's LLM_TYPE_70B
    per_kind = {"self_attn.v_proj": lambda i: _attn_v(preset, i, n, gqa, is_70b, base),
                "mlp.down_proj": lambda i: _ffn_down(preset, i, n, base),
                "self_attn.o_proj": lambda i: {"Q2_K": "q3_K", "Q3_K_M": "q4_K",
                                               "Q3_K_L": "q5_K"}.get(preset, base)}
    out = {}
    for t in arch.linears:
        rule = per_kind.get(t.kind)
        out[t.fqn] = effective_format(rule(t.layer) if rule else base, t.cols)
    emb = arch.embedding
    tied = arch.lm_head is None
    out[emb.fqn] = effective_format(_output(base, emb.cols) if tied else base, emb.cols)
    if not tied:
        out[arch.lm_head.fqn] = effective_format(_output(base, arch.lm_head.cols),
                                                 arch.lm_head.cols)
    return out


def preset_recipe(arch: Arch, preset: str) -> Recipe:
    """The preset as a per-module recipe (for the cost model)."""
    return Recipe({fqn: {"format": fmt} for fqn, fmt in preset_formats(arch, preset).items()})
