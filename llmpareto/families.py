"""Model families: what differs between the architectures llmpareto searches and exports, as
data (one entry per family, like the formats registry), read by Arch and the cost model, the
spaces' structure checks, `apply` and the exporters. No torch here.

A family is found from the Hugging Face `model_type` (a GGUF source's architecture reaches
transformers' GGUF loader, which gives the same model_type).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from llmpareto.errors import UserError

CUTS = ("layers", "mlp_ratio", "heads")  # the structural cuts a student may take


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # Hugging Face config.model_type values
    gguf_arch: str  # llama.cpp's general.architecture
    # llama.cpp's converter permutes q/k rows into its rotary layout (LLaMA, Mistral) or not
    # (NEOX-style rotary: Qwen, Gemma, Phi-3)
    permute_qk: bool = False
    # added to every RMSNorm weight on export: Gemma computes x * (1 + w), llama.cpp x * w
    norm_shift: float = 0.0
    # llama.cpp and the model's own tokenizer always put BOS first (a tokenizer without a BOS
    # token cannot run this family); other families follow their tokenizer's add_bos_token
    needs_bos: bool = False
    cuts: tuple[str, ...] = CUTS
    # projections stored as one tensor: kind -> what it holds, in row order
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # llama.cpp keeps only the last `sliding_window` tokens of a sliding layer in its KV cache
    # (Gemma 2/3: true; Mistral runs as `llama` in llama.cpp, which caches every token)
    kv_sliding: bool = False
    # llama.cpp runs the family with no sliding block when no window is given (Gemma 3); else
    # a student that keeps no sliding block gets a window as long as its context (Gemma 2)
    swa_optional: bool = False
    traits: tuple[str, ...] = ()  # what else differs, for docs/families.md's table and `describe`
    why_not: dict[str, str] = field(default_factory=dict)  # cut -> why this family refuses it

    def check_cuts(self, structure: dict, what: str = "recipe structure {cut!r}") -> None:
        """One line for a structural cut this family cannot take (`what` names where it came
        from: a recipe's structure, or a --student-* flag)."""
        for cut in CUTS:
            v = structure.get(cut)
            if v is None or cut in self.cuts:
                continue
            if cut == "mlp_ratio" and v == 1:
                continue
            raise UserError(f"{what.format(cut=cut)}: the {self.name} family cannot take this "
                            f"cut ({self.why_not.get(cut, 'not supported')}); allowed cuts: "
                            f"{', '.join(self.cuts) or 'none'}")


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", ("llama",), "llama", permute_qk=True,
           traits=("tied or untied head", "Llama 2: no BOS rule of its own; Llama 3 adds BOS")),
    Family("mistral", ("mistral",), "llama", permute_qk=True,
           traits=("runs as llama in llama.cpp (no sliding window there)",)),
    Family("qwen2", ("qwen2",), "qwen2", cuts=("layers", "mlp_ratio"),
           traits=("q/k/v biases", "no BOS"),
           why_not={"heads": "llama.cpp builds a qwen2 block's q and output projections as "
                             "hidden x hidden; cut layers or MLP width instead"}),
    Family("qwen3", ("qwen3",), "qwen3",
           traits=("q/k norms", "head size set apart from hidden/heads", "no BOS")),
    Family("gemma2", ("gemma2",), "gemma2", norm_shift=1.0, needs_bos=True, kv_sliding=True,
           traits=("embedding scaled by sqrt(hidden)", "attention and final logit soft-capping",
                   "sliding-window layers (every other)", "post-norms", "tied head")),
    Family("gemma3", ("gemma3_text", "gemma3"), "gemma3", norm_shift=1.0, needs_bos=True,
           kv_sliding=True, swa_optional=True,
           traits=("embedding scaled by sqrt(hidden)", "q/k norms",
                   "sliding-window layers (5 of 6)", "262k vocabulary", "post-norms",
                   "tied head")),
    Family("phi3", ("phi3",), "phi3", cuts=("layers", "mlp_ratio"),
           fused={"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")},
           traits=("fused qkv and gate/up projections",),
           why_not={"heads": "q, k and v are one fused tensor whose split llama.cpp and "
                             "transformers fix at load; cut layers or MLP width instead"}),
)}
_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())


def family_of(model_type: str | None, what: str = "this model") -> Family:
    """The family of a Hugging Face model_type, or one line naming what is supported."""
    fam = _BY_MODEL_TYPE.get(model_type or "")
    if fam is None:
        raise UserError(f"{what}: architecture {model_type!r} is not a family llmpareto "
                        f"supports; supported families (model_type): {supported()}")
    return fam


def gguf_arch_known(arch: str) -> bool:
    """Whether llama.cpp knows a GGUF architecture (the gguf package lists llama.cpp's)."""
    import gguf

    return arch in set(gguf.MODEL_ARCH_NAMES.values())


def family_of_gguf(arch: str, path: str) -> Family:
    """The family of a GGUF file's general.architecture, or one line saying why not."""
    if not gguf_arch_known(arch):
        raise UserError(f"GGUF file {path}: architecture {arch!r} is not one llama.cpp knows; "
                        f"give a GGUF of a supported family: {supported()}")
    found = [f for f in FAMILIES.values() if f.gguf_arch == arch]
    if not found:
        raise UserError(f"GGUF file {path}: architecture {arch!r} (known to llama.cpp) is not a "
                        f"family llmpareto supports; supported families (model_type): "
                        f"{supported()}")
    return found[0]


# ------------------------------------------------------------------ GGUF names (llama.cpp's)

@functools.cache
def _name_map(gguf_arch: str, n_blocks: int):
    import gguf

    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch)
    return gguf.get_tensor_name_map(arch, n_blocks)  # ~20 ms to build


def gguf_name(hf_name: str, n_blocks: int, gguf_arch: str = "llama") -> str:
    """llama.cpp's name of a Hugging Face tensor (`model.layers.0.self_attn.q_proj.weight` ->
    `blk.0.attn_q.weight`) in the `gguf` package's map for the architecture."""
    name = _name_map(gguf_arch, n_blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"GGUF export: no llama.cpp name for tensor {hf_name} in architecture "
                        f"{gguf_arch!r}")
    return name


def gguf_arch_of(arch) -> str:
    """The GGUF architecture of an Arch (llama for a model no family describes: the shapes of
    the timing and calibration files llmpareto writes itself)."""
    return FAMILIES[arch.family].gguf_arch if getattr(arch, "family", None) else "llama"
