"""The one verb that puts a Recipe into a model: `apply(model, recipe, cache)`."""

from __future__ import annotations

import torch

from llmpareto.compress.cache import VariantCache
from llmpareto.recipe import Recipe


@torch.no_grad()
def apply(model: torch.nn.Module, recipe: Recipe, cache: VariantCache) -> dict[str, str | None]:
    """Set every searched tensor of `model` to its recipe format (and sparsity), in place.

    Only tensors whose effective format differs from what the model holds now are touched,
    and they are re-pointed at the cached variant rather than copied (a tied embedding and
    output head share one Parameter, so both follow). Returns fqn -> effective format
    (None: base weights).
    """
    if cache.model is not model:
        raise ValueError("this VariantCache was prepared for another model")
    _set_layers(model, recipe.structure.get("layers"), cache)
    formats = cache.arch.formats_for(recipe)
    pruned = cache.arch.sparsity_for(recipe)
    slices = cache.slices(recipe.structure)
    for fqn, fmt in formats.items():
        sparsity, sl = pruned.get(fqn), slices.get(fqn)
        now = cache.current_slice[fqn]
        if (cache.current[fqn] == fmt and cache.current_sparsity[fqn] == sparsity
                and (now and now[0]) == (sl and sl[0])):
            continue
        w = cache.dequantized(fqn, fmt, sparsity, sl)
        cache.weight(fqn).data = w
        mod = cache.modules[fqn]
        if isinstance(mod, torch.nn.Linear):  # a narrower student: the module says so too
            mod.out_features, mod.in_features = w.shape
        if fqn in cache.base_bias:
            b = cache.base_bias[fqn]
            mod.bias.data = b if sl is None or sl[1] is None else \
                b.index_select(0, sl[1].to(b.device))
        cache.current[fqn], cache.current_sparsity[fqn], cache.current_slice[fqn] = \
            fmt, sparsity, sl
    _set_config(model, recipe.structure, cache)
    return formats


def _set_config(model: torch.nn.Module, structure: dict, cache: VariantCache) -> None:
    """The config says what the student is: MLP width and attention heads (the export and
    the KV cache read it). A per-block student's config holds its widest block (what the
    padded HF export writes) and `model._llmpareto_blocks` each kept block's own sizes."""
    from llmpareto.structure import is_per_block, mlp_width, per_block

    cfg, base = model.config, cache.base_config
    for k, v in base.items():
        setattr(cfg, k, v)
    model._llmpareto_blocks = None
    n = cache.n_layers or cache.arch.n_layers
    inter, kv = base.get("intermediate_size"), base.get("num_key_value_heads")
    ratios = per_block(structure, "mlp_ratio", n, None)
    heads = per_block(structure, "heads", n, None)
    widths = [inter if r is None or inter is None else mlp_width(inter, r)
              for r in ratios.values()]
    kv_heads = [kv if h is None else h for h in heads.values()]
    if inter is not None and any(r is not None for r in ratios.values()):
        cfg.intermediate_size = max(widths)
    if kv is not None and any(h is not None for h in heads.values()):
        per = base["num_attention_heads"] // kv
        cfg.num_key_value_heads, cfg.num_attention_heads = max(kv_heads), max(kv_heads) * per
        # the head size stays: said outright where a config would derive it as hidden / heads
        cfg.head_dim = cache.arch.head_dim
    if is_per_block(structure):
        per = base["num_attention_heads"] // kv if kv else 1
        model._llmpareto_blocks = {"intermediate_size": widths, "num_key_value_heads": kv_heads,
                                   "num_attention_heads": [h * per for h in kv_heads]}


def _set_layers(model: torch.nn.Module, layers: list[int] | None, cache: VariantCache) -> None:
    """Keep only the listed transformer blocks (None: all), renumbered for the KV cache."""
    if not cache.all_layers:
        if layers is not None:
            raise ValueError("this model has no model.layers to drop blocks from")
        return
    kept = list(range(cache.n_layers)) if layers is None else layers
    current = getattr(model, "_llmpareto_layers", list(range(cache.n_layers)))
    if kept == current:
        return
    model.model.layers = torch.nn.ModuleList(cache.all_layers[i] for i in kept)
    for new, block in enumerate(model.model.layers):
        if hasattr(getattr(block, "self_attn", None), "layer_idx"):
            block.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(kept)
    if cache.layer_types:
        model.config.layer_types = [cache.layer_types[i] for i in kept]
    model._llmpareto_layers = kept
