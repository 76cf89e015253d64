"""The one verb that puts a Recipe into a model: `apply(model, recipe, cache)`."""

from __future__ import annotations

import torch

from llmpareto.compress.cache import VariantCache
from llmpareto.recipe import Recipe


@torch.no_grad()
def apply(model: torch.nn.Module, recipe: Recipe, cache: VariantCache) -> dict[str, str | None]:
    """Set every searched tensor of `model` to its recipe format, in place.

    Only tensors whose effective format differs from what the model holds now are touched,
    and they are re-pointed at the cached variant rather than copied (a tied embedding and
    output head share one Parameter, so both follow). Returns fqn -> effective format
    (None: base weights).
    """
    if cache.model is not model:
        raise ValueError("this VariantCache was prepared for another model")
    formats = cache.arch.formats_for(recipe)
    for fqn, fmt in formats.items():
        if cache.current[fqn] == fmt:
            continue
        cache.weight(fqn).data = cache.dequantized(fqn, fmt)
        cache.current[fqn] = fmt
    return formats
