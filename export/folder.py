"""A safetensors folder that transformers loads offline: weights, config.json, tokenizer
(shared by the dense HF export and the compressed-tensors one)."""

from __future__ import annotations

import json
from pathlib import Path


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
