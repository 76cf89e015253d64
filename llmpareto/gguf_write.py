"""The GGUF form of a model (what `pick` exports and llama.cpp's presets start from): one file,
each tensor in its recipe's format, written with the `gguf` package, for every family in
llmpareto.families.

The packed bytes are the very ones the search evaluated (the prepared-variant cache), so the
file dequantizes bit-identically to the searched model. From a GGUF source the file keeps the
source's architecture, metadata, tokenizer and tensor names, and only the tensors the recipe
changes are rewritten (types, data, a student's shapes and shape keys); every other tensor is
copied byte for byte. From a Hugging Face folder, names come from the `gguf` package's map for
the family's architecture, with what llama.cpp's converter does for that family (q/k row
permutation for LLaMA-style rotary, Gemma's 1 + w norms) and its metadata keys.

A per-block student (its blocks of different MLP widths and KV groups) is written as
llama.cpp's `deci` architecture: the Llama layout whose loader builds every block at its own
`feed_forward_length`, `attention.head_count` and `attention.head_count_kv` (arrays with one
value per block). llama.cpp reads those keys as arrays for every architecture, but its `llama`
loader sizes every block's tensors by the first block's numbers; `deci` (Puzzle's
Llama-3.1-Nemotron models) sizes each block by its own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from llmpareto import atomic
from llmpareto.errors import UserError
from llmpareto.families import Family, family_of, gguf_name
from llmpareto.formats import GGUF_FORMATS, get_format
from llmpareto.text import bos_token

__all__ = ["check_exportable", "gguf_name", "permute_rows", "unpermute_rows", "write_gguf"]

# Keys rewritten for the exported file (or set by GGUFWriter itself).
_OWN_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version",
             "general.name")
# Shape keys a student changes (after the architecture's prefix): written from its config.
_SHAPE_KEYS = ("block_count", "feed_forward_length", "attention.head_count",
               "attention.head_count_kv", "attention.key_length", "attention.value_length")
_SLIDING_KEYS = ("attention.sliding_window", "attention.sliding_window_pattern")
_BLOCK = re.compile(r"^blk\.(\d+)\.")
_HF_BLOCK = re.compile(r"\.layers\.(\d+)\.")
PER_BLOCK_ARCH = "deci"  # llama.cpp's Llama layout with per-block sizes


def per_block_sizes(model) -> dict[str, list[int]] | None:
    """Each kept block's MLP width and heads when they differ (compress.swap sets them)."""
    return getattr(model, "_llmpareto_blocks", None)


def _arch_for(model, arch: str) -> str:
    """The GGUF architecture written: a per-block student of a Llama-layout model as deci."""
    if per_block_sizes(model) is None:
        return arch
    if arch != "llama":
        raise UserError(f"GGUF export: a student with per-block sizes runs in llama.cpp only as "
                        f"the Llama layout ({PER_BLOCK_ARCH}); this model is {arch!r}: search it "
                        "with --student-granularity model")
    return PER_BLOCK_ARCH


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> GGUF row order of q/k projections (llama.cpp's rotary layout; convert_hf_to_gguf)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF -> HF row order (inverse of permute_rows)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def check_exportable(model) -> Family:
    """The family the GGUF is written for; one line before any work when there is none."""
    return family_of(getattr(model.config, "model_type", None),
                     "GGUF export (--format gguf)")


def _check_gguf_formats(formats: dict[str, str | None]) -> None:
    bad = sorted({f for f in formats.values() if f is not None and f not in GGUF_FORMATS})
    if bad:
        raise UserError(
            f"--format gguf: this recipe uses {', '.join(bad)}, which GGUF cannot hold (GGUF "
            f"holds {', '.join(GGUF_FORMATS)}); export it with --format hf instead"
        )


def _head_dim(cfg) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _swa_pattern(cfg) -> list[bool] | None:
    """Which blocks slide (llama.cpp's per-layer pattern; written even when none does, or
    llama.cpp would apply the family's default pattern)."""
    types = getattr(cfg, "layer_types", None)
    if not types:
        return None
    return [t == "sliding_attention" for t in types]


def _write_shape(writer, cfg, fam: Family, blocks: dict[str, list[int]] | None = None) -> None:
    """Shapes from the (possibly restructured) config, or per block (`blocks`: a per-block
    student); a student with fewer heads keeps its head size, which llama.cpp would otherwise
    derive as hidden / heads."""
    writer.add_block_count(cfg.num_hidden_layers)
    if blocks is not None:
        writer.add_feed_forward_length([int(v) for v in blocks["intermediate_size"]])
        writer.add_head_count([int(v) for v in blocks["num_attention_heads"]])
        writer.add_head_count_kv([int(v) for v in blocks["num_key_value_heads"]])
    else:
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(_head_dim(cfg))
    writer.add_value_length(_head_dim(cfg))
    pattern = _swa_pattern(cfg) if fam.kv_sliding else None
    window = getattr(cfg, "sliding_window", None)
    if pattern is not None and window:  # which blocks slide: a student keeps its own
        if not any(pattern):
            if fam.swa_optional:
                return  # no window: no sliding block
            # llama.cpp needs one sliding block here: a window as long as any text slides not
            pattern, window = [True] * len(pattern), cfg.max_position_embeddings
        writer.add_sliding_window(int(window))
        writer.add_sliding_window_pattern(pattern)


def _rope_theta(cfg, kind: str = "full_attention") -> float | None:
    rope = getattr(cfg, "rope_parameters", None) or {}
    if kind in rope and isinstance(rope[kind], dict):
        rope = rope[kind]
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    return None if theta is None else float(theta)


def _hf_metadata(writer, cfg, fam: Family, tokenizer, bos: bool,
                 blocks: dict[str, list[int]] | None = None) -> None:
    """What llama.cpp's converter writes for the family (conversion/*.py set_gguf_parameters)."""
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    _write_shape(writer, cfg, fam, blocks)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    theta = _rope_theta(cfg)
    if theta is not None:
        writer.add_rope_freq_base(theta)
    if fam.name in ("llama", "mistral", "phi3"):
        partial = float((getattr(cfg, "rope_parameters", None) or {})
                        .get("partial_rotary_factor", 1.0))
        writer.add_rope_dimension_count(int(partial * _head_dim(cfg)))
    if fam.name in ("gemma2", "gemma3"):
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            writer.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
        if getattr(cfg, "final_logit_softcapping", None) is not None:
            writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
        local = _rope_theta(cfg, "sliding_attention")
        if local is not None:
            writer.add_rope_freq_base_swa(local)
    if fam.name == "phi3":
        writer.add_sliding_window(int(getattr(cfg, "sliding_window", None) or 0))
    writer.add_vocab_size(cfg.vocab_size)
    _bpe_tokenizer(writer, tokenizer, cfg, bos)


def _bpe_tokenizer(writer, tokenizer, cfg, bos: bool) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UserError("GGUF export of a Hugging Face folder needs a BPE tokenizer; use --format hf")
    vocab = model["vocab"]
    tokens = [None] * max(cfg.vocab_size, len(vocab))
    for tok, idx in vocab.items():
        tokens[idx] = tok
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    toks = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(toks)
    writer.add_token_types([3 if i in special else (5 if tokens[i] is None else 1)
                            for i in range(len(toks))])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id),
                      ("eos_token_id", writer.add_eos_token_id)):
        if getattr(tokenizer, attr, None) is not None:
            add(int(getattr(tokenizer, attr)))
    writer.add_add_bos_token(bos)  # what the search's windows did: llama.cpp does the same


def write_gguf(path: Path, model, cache, formats: dict[str, str | None], source,
               tokenizer, bos: bool | None = None, all_f32: bool = False) -> Path:
    """Write `model` (its recipe already applied through `cache`) as one GGUF file (to a
    temporary name first: a killed export never leaves a GGUF that looks whole). `bos`: whether
    llama.cpp should put BOS first (a HF source; default: what the tokenizer does). `all_f32`:
    every weight of the model as float32, also those a GGUF source holds quantized (the file
    llama.cpp's presets are quantized from: llama-quantize refuses to requantize)."""
    fam = check_exportable(model)
    _check_gguf_formats(formats)
    if bos is None and not source.gguf_file:
        bos = bos_token(tokenizer, needs_bos=fam.needs_bos) is not None
    with atomic.atomic_path(path) as tmp:
        if source.gguf_file:
            _from_gguf(tmp, model, cache, formats, str(Path(source.directory) / source.gguf_file),
                       fam, all_f32)
        else:
            _from_hf(tmp, model, cache, formats, tokenizer, fam, bool(bos))
    return Path(path)


def _searched(model, cache, formats) -> dict[str, tuple]:
    """GGUF-independent view of every parameter: hf name -> (fqn, format or None, param)."""
    out, seen = {}, set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue  # a tied output head is the embedding itself
        seen.add(id(param))
        fqn = cache.fqn_of_param.get(id(param))  # a searched weight (not its module's bias)
        out[name] = (fqn or name.rsplit(".", 1)[0], formats.get(fqn) if fqn else None, param)
    return out


def _tensor_data(name: str, fqn: str, fmt: str | None, param, cache, model, fam: Family,
                 kinds: dict[str, str]):
    """(array, GGML type) of one parameter as llama.cpp stores it for the family."""
    import gguf

    cfg = model.config
    if fmt is not None:
        data = cache.get(fqn, fmt, cache.current_sparsity.get(fqn),  # zeros stored
                         cache.current_slice.get(fqn))  # a student's shape
        qtype = gguf.GGMLQuantizationType(get_format(fmt).gguf_type)
    else:
        data, qtype = param.detach().float().cpu().numpy(), gguf.GGMLQuantizationType.F32
        if fam.norm_shift and name.endswith("norm.weight"):
            data = data + np.float32(fam.norm_shift)
    kind = kinds.get(fqn)
    heads = {"self_attn.q_proj": cfg.num_attention_heads,
             "self_attn.k_proj": cfg.num_key_value_heads}
    blocks = per_block_sizes(model)
    m = _HF_BLOCK.search(name)
    if blocks is not None and m is not None:  # this block's own heads (new numbering)
        i = int(m.group(1))
        heads = {"self_attn.q_proj": blocks["num_attention_heads"][i],
                 "self_attn.k_proj": blocks["num_key_value_heads"][i]}
    if fam.permute_qk and kind in heads:  # packed rows move as a whole: permuting stays exact
        data = permute_rows(data, heads[kind])
    return np.ascontiguousarray(data), qtype


def _from_hf(path: Path, model, cache, formats, tokenizer, fam: Family, bos: bool) -> None:
    import gguf

    cfg = model.config
    n_blocks = cfg.num_hidden_layers
    arch = _arch_for(model, fam.gguf_arch)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    _hf_metadata(writer, cfg, fam, tokenizer, bos, per_block_sizes(model))
    _own_keys(writer, Path(str(getattr(cfg, "name_or_path", "") or "")).name)
    kinds = {t.fqn: t.kind for t in cache.arch.tensors}
    for name, (fqn, fmt, param) in _searched(model, cache, formats).items():
        data, qtype = _tensor_data(name, fqn, fmt, param, cache, model, fam, kinds)
        writer.add_tensor(gguf_name(name, n_blocks, arch), data, raw_dtype=qtype)
    _finish(writer)


def _own_keys(writer, name: str) -> None:
    """general.name (llama.cpp reads it: e.g. a name with "phi3" in it makes it look up
    Phi-3's special tokens), file type and quantization version."""
    import gguf

    writer.add_name(f"{name.removesuffix(' (llmpareto)') or 'model'} (llmpareto)")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)  # mixed per tensor; informative only
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _from_gguf(path: Path, model, cache, formats, source_path: str, fam: Family,
               all_f32: bool = False) -> None:
    """The source GGUF with only what the recipe changed rewritten (see the module doc)."""
    import gguf

    reader = gguf.GGUFReader(source_path)
    arch = str(reader.fields["general.architecture"].contents())
    cfg = model.config
    kept = getattr(model, "_llmpareto_layers", None) or list(range(cfg.num_hidden_layers))
    new_index = {old: new for new, old in enumerate(kept)}
    out_arch = _arch_for(model, arch)
    writer = gguf.GGUFWriter(str(path), arch=out_arch)
    rewritten = _SHAPE_KEYS + (_SLIDING_KEYS if fam.kv_sliding else ())
    for key, field in reader.fields.items():
        if key.startswith(_OWN_KEYS) or key.removeprefix(f"{arch}.") in rewritten:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if key.startswith(f"{arch}."):  # the architecture's own keys move with it
            key = f"{out_arch}.{key.removeprefix(f'{arch}.')}"
        writer.add_key_value(key, field.contents(), vtype, sub)
    _write_shape(writer, cfg, fam, per_block_sizes(model))
    named = reader.fields.get("general.name")
    _own_keys(writer, str(named.contents()) if named is not None else Path(source_path).stem)
    kinds = {t.fqn: t.kind for t in cache.arch.tensors}
    params = {gguf_name(name, len(kept), arch): (name, *rest)
              for name, rest in _searched(model, cache, formats).items()}
    for t in reader.tensors:
        name = t.name
        m = _BLOCK.match(name)
        if m is not None:
            if int(m.group(1)) not in new_index:
                continue  # a block the student dropped
            name = f"blk.{new_index[int(m.group(1))]}.{name[m.end():]}"
        hit = params.get(name)
        shape = tuple(int(d) for d in reversed(t.shape))  # gguf lists ne0 first
        if hit is not None:
            hf_name, fqn, fmt, param = hit
            if fmt is not None or tuple(param.shape) != shape or all_f32:
                data, qtype = _tensor_data(hf_name, fqn, fmt, param, cache, model, fam, kinds)
                writer.add_tensor(name, data, raw_dtype=qtype)
                continue
        # unchanged: the source's own bytes and type (norms, a tensor the recipe leaves alone,
        # tensors the model has no parameter for)
        data = np.asarray(t.data)
        writer.add_tensor(name, data, raw_shape=_raw_shape(t, data),
                          raw_dtype=gguf.GGMLQuantizationType(int(t.tensor_type)))
    _finish(writer)


def _raw_shape(t, data: np.ndarray) -> list[int] | None:
    """The shape add_tensor expects for the data of source tensor `t`: for a quantized (or
    bf16) tensor the reader gives bytes, and gguf takes their byte shape (None: the data's own)
    and turns it into elements; for f32/f16 the element shape (numpy order: outer first)."""
    return None if data.dtype == np.uint8 else [int(d) for d in reversed(t.shape)]
