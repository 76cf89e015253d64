"""compressed-tensors export of a sparse recipe: `sparse-24-bitmask` when every pruned module is
2:4, `sparse-bitmask` otherwise; and the reader that turns such a folder back into a model.

The on-disk layout is the one compressed-tensors 0.14 wrote and vLLM (<= 0.19.0) and
llm-compressor read: per pruned Linear `<module>.compressed` (kept values, in the weight dtype),
`<module>.bitmask` (1 bit per weight, packed little-endian by compressed-tensors'
`pack_bitmasks`), `<module>.shape`, and for `sparse-bitmask` `<module>.row_offsets`; config.json
carries `quantization_config.sparsity_config` (compressed-tensors' own pydantic config).
compressed-tensors >= 0.15 dropped its sparse compressors and transformers 5 no longer reads
`sparsity_config` (such a folder would load with random weights), so the layout is written and
read here, with the library's bit packing and config classes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmpareto.errors import UserError
from llmpareto.sparse_folder import SPARSE_FORMATS, decompress  # noqa: F401 - re-exported


def compress_24(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """2:4 layout: kept values (rows, cols/2), bitmask (rows, ceil(cols/8)) uint8, shape (2, 1)."""
    from compressed_tensors.utils import pack_bitmasks

    rows, cols = w.shape
    groups = w.reshape(-1, 4)
    if cols % 4 or bool(((groups != 0).sum(1) > 2).any()):
        raise UserError("sparse-24-bitmask needs 2:4 weights (at most 2 non-zeros in every 4)")
    keep = _two_per_group(groups).reshape(rows, cols)
    return {"shape": torch.tensor([rows, cols]).reshape(-1, 1),
            "compressed": w[keep].reshape(rows, cols // 2).contiguous(),
            "bitmask": pack_bitmasks(keep)}


def _two_per_group(groups: torch.Tensor) -> torch.Tensor:
    """Exactly two kept per group of 4: its non-zeros, then zeros at its first positions (a
    group can hold fewer than two non-zeros where quantization rounded a weight to 0)."""
    nz = groups != 0
    order = torch.cumsum((~nz).int(), 1)  # 1, 2, ... over each group's zeros
    return nz | (~nz & (order <= 2 - nz.sum(1, keepdim=True)))


def compress_bitmask(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Unstructured layout: non-zeros (1-D, row-major), bitmask, row_offsets (rows,), shape (2,)."""
    from compressed_tensors.utils import pack_bitmasks

    keep = w != 0
    counts = keep.sum(-1)
    return {"shape": torch.tensor(list(w.shape)), "compressed": w[keep].contiguous(),
            "bitmask": pack_bitmasks(keep), "row_offsets": torch.cumsum(counts, 0) - counts}


def sparse_format(patterns: set[str]) -> str:
    return "sparse-24-bitmask" if patterns == {"2:4"} else "sparse-bitmask"


def write_compressed(folder: Path, model, tokenizer, pruned: dict[str, tuple[str, float]],
                     note: dict | None = None, transform=None) -> str:
    """Write `model` (float32 weights as the search evaluated them) with the Linears named in
    `pruned` (fqn -> (pattern, level)) compressed; every other module is dense and listed in
    `ignore`; `transform` rewrites the dense state dict first (export.hf.padder). Returns the
    sparsity format written."""
    import compressed_tensors
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    from llmpareto.export.folder import write_folder

    fmt = sparse_format({p for p, _ in pruned.values()})
    pack = compress_24 if fmt == "sparse-24-bitmask" else compress_bitmask

    def compress(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if transform is not None:
            state = transform(state)
        for fqn in pruned:
            state.update({f"{fqn}.{k}": v for k, v in pack(state.pop(f"{fqn}.weight")).items()})
        return state

    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((model.get_submodule(f).weight == 0).sum()) for f in pruned)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    cls = Sparse24BitMaskConfig if fmt == "sparse-24-bitmask" else BitmaskConfig
    sparsity = cls(targets=["Linear"], ignore=[n for n in linears if n not in pruned],
                   global_sparsity=zeros / total,
                   sparsity_structure="2:4" if fmt == "sparse-24-bitmask" else "unstructured")
    write_folder(folder, model, tokenizer, compress, {
        "architectures": [type(model).__name__], "torch_dtype": "float32",
        "quantization_config": {"quant_method": "compressed-tensors",
                                "version": compressed_tensors.__version__,
                                "sparsity_config": sparsity.model_dump(),
                                "transform_config": {},
                                **({"llmpareto": note} if note else {})}})
    return fmt
