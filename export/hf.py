"""HF export: safetensors + config + tokenizer (float32, the dequantized weights the search
evaluated); a recipe that prunes is written in compressed-tensors' sparse format instead."""

from __future__ import annotations

import json
from pathlib import Path

from llmpareto.recipe import Recipe


def write_hf(folder: Path, built) -> str:
    """safetensors + config + tokenizer that AutoModelForCausalLM.from_pretrained loads offline;
    returns what was written: "dense", or the compressed-tensors sparsity format.

    Written by hand rather than save_pretrained, which refuses models that came through the
    GGUF loader; the weights are the dequantized ones the search evaluated.
    """
    from llmpareto.export.compressed import write_compressed

    model = built.model
    pruned = built.cache.pruned_modules()
    recipe = Recipe.from_dict({"modules": {
        k: ({"format": v, **_sparsity(built.cache.current_sparsity.get(k))} if v else None)
        for k, v in built.formats.items()}})
    if pruned:
        kind = write_compressed(folder, model, built.tokenizer, pruned)
    else:
        kind = "dense"
        write_folder(folder, model, built.tokenizer)
    (folder / "recipe.json").write_text(recipe.to_json())
    return kind


def write_folder(folder: Path, model, tokenizer, transform=None,
                 config: dict | None = None) -> None:
    """model.safetensors (float32; a tied head left to the loader), config.json and the
    tokenizer; `transform` may rewrite the state dict, `config` adds config.json entries."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: the loader points it at the embedding
    if transform is not None:
        state = transform(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)  # the GGUF loader's note: these weights are plain
    cfg["dtype"] = "float32"
    cfg.update(config or {})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tokenizer.save_pretrained(folder)


def _sparsity(sp: tuple[str, float] | None) -> dict:
    if sp is None:
        return {}
    return {"pattern": sp[0]} if ":" in sp[0] else {"sparsity": sp[1]}
