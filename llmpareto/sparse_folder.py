"""Reading a sparse compressed-tensors folder (`sparse-24-bitmask`, `sparse-bitmask`): the
layout llmpareto's HF export writes for a pruned recipe (export.compressed), loaded back as a
transformers model with its weights decompressed (transformers 5 alone would leave them random).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmpareto.errors import UserError

SPARSE_FORMATS = {"sparse-24-bitmask": ("shape", "compressed", "bitmask"),
                  "sparse-bitmask": ("shape", "compressed", "bitmask", "row_offsets")}


def decompress(p: dict[str, torch.Tensor]) -> torch.Tensor:
    from compressed_tensors.utils import unpack_bitmasks

    shape = p["shape"].flatten().tolist()
    out = torch.zeros(shape, dtype=p["compressed"].dtype)
    out[unpack_bitmasks(p["bitmask"], shape)] = p["compressed"].flatten()
    return out


def sparsity_format_of(folder: Path) -> str | None:
    """The compressed-tensors sparsity format a HF folder's config.json declares, if any."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qc = cfg.get("quantization_config") or {}
    fmt = (qc.get("sparsity_config") or {}).get("format") if isinstance(qc, dict) else None
    return fmt if fmt not in (None, "dense") else None


def load_compressed(folder: Path, dtype: torch.dtype = torch.float32):
    """A transformers model from a sparse compressed-tensors folder (decompressed here:
    transformers 5 would leave those weights random)."""
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    folder = Path(folder)
    fmt = sparsity_format_of(folder)
    if fmt not in SPARSE_FORMATS:
        raise UserError(f"{folder}: sparsity format {fmt!r} is not supported; llmpareto reads "
                        f"{', '.join(SPARSE_FORMATS)}")
    names = SPARSE_FORMATS[fmt]
    state: dict[str, torch.Tensor] = {}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                prefix, _, leaf = key.rpartition(".")
                if leaf in names:
                    grouped.setdefault(prefix, {})[leaf] = f.get_tensor(key)
                else:
                    state[key] = f.get_tensor(key)
    for prefix, parts in grouped.items():
        if set(parts) != set(names):
            raise UserError(f"{folder}: {prefix} has {sorted(parts)} of the {fmt} tensors "
                            f"{list(names)}; the file is incomplete")
        state[f"{prefix}.weight"] = decompress(parts)
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    del config.quantization_config  # else transformers builds a quantizer for it
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
