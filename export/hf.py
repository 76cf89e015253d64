"""HF export: safetensors + config + tokenizer that transformers loads offline (float32, the
dequantized weights the search evaluated)."""

from __future__ import annotations

import json
from pathlib import Path

from llmpareto.recipe import Recipe


def write_hf(folder: Path, built) -> None:
    """safetensors + config + tokenizer that AutoModelForCausalLM.from_pretrained loads offline.

    Written by hand rather than save_pretrained, which refuses models that came through the
    GGUF loader; the weights are the dequantized ones the search evaluated.
    """
    from safetensors.torch import save_file

    model = built.model
    folder.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: the loader points it at the embedding
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)  # the GGUF loader's note: these weights are plain
    cfg["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    built.tokenizer.save_pretrained(folder)
    (folder / "recipe.json").write_text(Recipe.to_json(Recipe.from_dict(
        {"modules": {k: ({"format": v} if v else None) for k, v in built.formats.items()}})))
