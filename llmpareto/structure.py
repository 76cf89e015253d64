"""Structural cuts as numbers: which MLP width a ratio keeps, and what a recipe's `structure`
may say for a model of n blocks and k KV groups. Pure (no torch): the cost model and the
spaces read it; compress.restructure slices the weights.

`mlp_ratio` and `heads` are either one value (every kept block alike: a homogeneous student,
what one Hugging Face config can say) or a list with one value per kept block, in the order
of `layers` (a per-block student: llama.cpp builds each block at its own size, see
llmpareto.gguf_write). A per-block ratio must keep a whole number of MLP_ALIGN channels.
"""

from __future__ import annotations

from typing import Any

from llmpareto.errors import UserError

MLP_ALIGN = 32  # kept width is a multiple of the GGUF block size, so every format fits
PER_BLOCK_KEYS = ("mlp_ratio", "heads")  # the cuts that may differ from block to block


def mlp_width(intermediate: int, ratio: float) -> int:
    """Channels kept for `ratio` of `intermediate`: a multiple of MLP_ALIGN, at least one."""
    if intermediate <= MLP_ALIGN:
        return intermediate
    k = round(ratio * intermediate / MLP_ALIGN) * MLP_ALIGN
    return int(min(intermediate, max(MLP_ALIGN, k)))


def aligned_ratios(intermediate: int, ratios) -> list[float]:
    """Each ratio moved to the width mlp_width keeps, as an exact fraction of `intermediate`
    (what a per-block list holds: k * MLP_ALIGN / intermediate)."""
    return [mlp_width(intermediate, r) / intermediate for r in ratios]


def is_per_block(structure: dict | None) -> bool:
    """Whether a structure gives any cut block by block (a list)."""
    return any(isinstance((structure or {}).get(k), (list, tuple)) for k in PER_BLOCK_KEYS)


def cut_key(structure: dict | None) -> tuple:
    """A hashable key of what a structure narrows (MLP widths, KV groups): equal keys cut the
    same tensors alike. A per-block list is read against the kept blocks, so those join it."""
    s = {k: v for k, v in (structure or {}).items() if k in PER_BLOCK_KEYS}
    if is_per_block(structure) and (structure or {}).get("layers") is not None:
        s["layers"] = structure["layers"]
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in s.items()))


def kept_blocks(structure: dict | None, n_layers: int) -> list[int]:
    layers = (structure or {}).get("layers")
    return list(range(n_layers)) if layers is None else list(layers)


def per_block(structure: dict | None, key: str, n_layers: int, default: Any) -> dict[int, Any]:
    """block index (the teacher's numbering) -> the value of cut `key` for every kept block;
    `default` where the structure leaves the cut out."""
    kept = kept_blocks(structure, n_layers)
    v = (structure or {}).get(key)
    if isinstance(v, (list, tuple)):
        return dict(zip(kept, v))
    return dict.fromkeys(kept, default if v is None else v)


def check_structure(structure: dict, n_layers: int, n_kv_heads: int,
                    intermediate: int | None = None) -> None:
    """One clear error for a structure no student of this model can have (`intermediate`:
    the teacher's MLP width, to check per-block ratios keep whole MLP_ALIGN channels)."""
    if "layers" in structure and structure["layers"] is not None:
        check_layers(structure["layers"], n_layers)
    n_kept = len(kept_blocks(structure, n_layers))
    for key in PER_BLOCK_KEYS:
        v = structure.get(key)
        if isinstance(v, list) and len(v) != n_kept:
            raise UserError(f"recipe structure {key!r} has {len(v)} values but the student "
                            f"keeps {n_kept} blocks: give one value, or one per kept block in "
                            f"the order of 'layers'")
    ratio = structure.get("mlp_ratio")
    for i, r in _items(ratio):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise UserError(f"recipe structure 'mlp_ratio'{i} must be in (0, 1] (a student is "
                            f"never wider than its teacher); got {r!r}")
        if isinstance(ratio, list) and intermediate and intermediate > MLP_ALIGN:
            _check_aligned(i, r, intermediate)
    for i, h in _items(structure.get("heads")):
        if isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= n_kv_heads:
            raise UserError(f"recipe structure 'heads'{i} is the KV heads kept in a block, each "
                            f"with its query heads (whole attention groups): an integer in "
                            f"1..{n_kv_heads}; got {h!r}")


def _items(v) -> list[tuple[str, Any]]:
    if v is None:
        return []
    return [(f"[{i}]", x) for i, x in enumerate(v)] if isinstance(v, list) else [("", v)]


def _check_aligned(where: str, ratio: float, intermediate: int) -> None:
    width = ratio * intermediate
    k = mlp_width(intermediate, ratio)
    if abs(width - k) > 1e-6 * intermediate:
        lo = max(MLP_ALIGN, int(width // MLP_ALIGN) * MLP_ALIGN)
        hi = min(intermediate, lo + MLP_ALIGN)
        raise UserError(f"recipe structure 'mlp_ratio'{where} = {ratio!r} keeps {width:g} of "
                        f"{intermediate} MLP channels, not a multiple of {MLP_ALIGN}: a "
                        f"per-block ratio keeps whole {MLP_ALIGN}-channel groups, e.g. "
                        f"{lo / intermediate!r} ({lo}) or {hi / intermediate!r} ({hi})")


def check_layers(layers: list, n_layers: int) -> None:
    if (not isinstance(layers, list) or not layers or any(not isinstance(i, int) for i in layers)
            or sorted(set(layers)) != layers or layers[0] < 0 or layers[-1] >= n_layers):
        raise UserError(f"recipe structure 'layers' must be a non-empty, increasing list of "
                        f"block indices in 0..{n_layers - 1}; got {layers!r}")
