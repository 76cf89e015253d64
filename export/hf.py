"""HF export: safetensors + config + tokenizer (float32, the dequantized weights the search
evaluated); a recipe that prunes is written in compressed-tensors' sparse format instead.

A per-block student (blocks of different MLP widths and KV groups) has no Hugging Face config
that says so: each block is padded with zeros up to the widest block (zero MLP channels add
silu(0) * 0 = 0; a zero KV group with zero query heads and zero output columns adds nothing),
so transformers computes the same outputs while the memory the cuts saved is not saved here.
The GGUF export holds the real per-block sizes."""

from __future__ import annotations

from pathlib import Path

from llmpareto.recipe import Recipe


def write_hf(folder: Path, built) -> str:
    """safetensors + config + tokenizer that AutoModelForCausalLM.from_pretrained loads offline;
    returns what was written: "dense", or the compressed-tensors sparsity format.

    Written by hand rather than save_pretrained, which refuses models that came through the
    GGUF loader; the weights are the dequantized ones the search evaluated.
    """
    from llmpareto.export.compressed import write_compressed
    from llmpareto.export.folder import write_folder
    from llmpareto.gguf_write import per_block_sizes

    model = built.model
    pruned = built.cache.pruned_modules()
    recipe = Recipe.from_dict({"modules": {
        k: ({"format": v, **_sparsity(built.cache.current_sparsity.get(k))} if v else None)
        for k, v in built.formats.items()}})
    padded = per_block_sizes(model) is not None
    if pruned:
        kind = write_compressed(folder, model, built.tokenizer, pruned,
                                transform=padder(model) if padded else None)
    else:
        kind = "dense"
        write_folder(folder, model, built.tokenizer, transform=padder(model) if padded else None)
    if padded:
        kind += ", padded per-block student"
    (folder / "recipe.json").write_text(recipe.to_json())
    return kind


def _sparsity(sp: tuple[str, float] | None) -> dict:
    if sp is None:
        return {}
    return {"pattern": sp[0]} if ":" in sp[0] else {"sparsity": sp[1]}


# projection -> (dimension padded: 0 rows, 1 columns; what it is counted in)
_PADDED = {"mlp.gate_proj": (0, "mlp"), "mlp.up_proj": (0, "mlp"), "mlp.down_proj": (1, "mlp"),
           "self_attn.q_proj": (0, "q"), "self_attn.k_proj": (0, "kv"),
           "self_attn.v_proj": (0, "kv"), "self_attn.o_proj": (1, "q")}


def pad_to(w, size: int, dim: int):
    """`w` with zeros appended along `dim` up to `size` (itself when already that size)."""
    import torch

    missing = size - w.shape[dim]
    if missing <= 0:
        return w
    shape = list(w.shape)
    shape[dim] = missing
    return torch.cat([w, w.new_zeros(shape)], dim=dim)


def padder(model):
    """The state-dict transform that pads every block to the config's (widest) sizes: MLP
    channels and whole KV groups (each with its query heads) appended as zeros at the end, so
    query head h still reads KV group h // (query heads per group)."""
    cfg = model.config
    hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    size = {"mlp": cfg.intermediate_size, "q": cfg.num_attention_heads * hd,
            "kv": cfg.num_key_value_heads * hd}

    def transform(state: dict) -> dict:
        out = {}
        for name, w in state.items():
            kind = next((k for k in _PADDED if name.endswith(f".{k}.weight")), None)
            if kind is not None:
                dim, what = _PADDED[kind]
                w = pad_to(w, size[what], dim)
            elif name.endswith(".bias"):
                kind = next((k for k in _PADDED if name.endswith(f".{k}.bias")), None)
                if kind is not None and _PADDED[kind][0] == 0:
                    w = pad_to(w, size[_PADDED[kind][1]], 0)
            out[name] = w.contiguous()
        return out
    return transform
