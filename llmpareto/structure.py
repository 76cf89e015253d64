"""Structural cuts as numbers: which MLP width a ratio keeps, and what a recipe's `structure`
may say for a model of n blocks and k KV groups. Pure (no torch): the cost model and the
spaces read it; compress.restructure slices the weights.
"""

from __future__ import annotations

from llmpareto.errors import UserError

MLP_ALIGN = 32  # kept width is a multiple of the GGUF block size, so every format fits


def mlp_width(intermediate: int, ratio: float) -> int:
    """Channels kept for `ratio` of `intermediate`: a multiple of MLP_ALIGN, at least one."""
    if intermediate <= MLP_ALIGN:
        return intermediate
    k = round(ratio * intermediate / MLP_ALIGN) * MLP_ALIGN
    return int(min(intermediate, max(MLP_ALIGN, k)))


def check_structure(structure: dict, n_layers: int, n_kv_heads: int) -> None:
    """One clear error for a structure no student of this model can have."""
    if "layers" in structure and structure["layers"] is not None:
        check_layers(structure["layers"], n_layers)
    ratio = structure.get("mlp_ratio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not 0 < ratio <= 1):
        raise UserError(f"recipe structure 'mlp_ratio' must be in (0, 1] (a student is never "
                        f"wider than its teacher); got {ratio!r}")
    heads = structure.get("heads")
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int)
                              or not 1 <= heads <= n_kv_heads):
        raise UserError(f"recipe structure 'heads' is the KV heads kept per block, each with its "
                        f"query heads (whole attention groups): an integer in 1..{n_kv_heads}; "
                        f"got {heads!r}")


def check_layers(layers: list, n_layers: int) -> None:
    if (not isinstance(layers, list) or not layers or any(not isinstance(i, int) for i in layers)
            or sorted(set(layers)) != layers or layers[0] < 0 or layers[-1] >= n_layers):
        raise UserError(f"recipe structure 'layers' must be a non-empty, increasing list of "
                        f"block indices in 0..{n_layers - 1}; got {layers!r}")
