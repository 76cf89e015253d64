"""How a Recipe is applied to a model: `apply(model, recipe, cache)` swaps prepared tensors.

The tensor math lives in pure functions (llmpareto.formats for quantization); this package
holds the prepared-variant cache and the glue that puts variants into a torch model.
"""

from llmpareto.compress.cache import VariantCache
from llmpareto.compress.swap import apply

__all__ = ["VariantCache", "apply"]
