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
    for fqn, fmt in formats.items():
        sparsity = pruned.get(fqn)
        if cache.current[fqn] == fmt and cache.current_sparsity[fqn] == sparsity:
            continue
        cache.weight(fqn).data = cache.dequantized(fqn, fmt, sparsity)
        cache.current[fqn], cache.current_sparsity[fqn] = fmt, sparsity
    return formats


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
