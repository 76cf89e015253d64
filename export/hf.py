"""HF export: safetensors + config + tokenizer (float32, the dequantized weights the search
evaluated); a recipe that prunes is written in compressed-tensors' sparse format instead."""

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


def _sparsity(sp: tuple[str, float] | None) -> dict:
    if sp is None:
        return {}
    return {"pattern": sp[0]} if ":" in sp[0] else {"sparsity": sp[1]}
