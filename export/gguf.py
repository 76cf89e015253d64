"""GGUF export: one file, each tensor in its recipe's format, written with the `gguf` package.

The packed bytes are the very ones the search evaluated (the prepared-variant cache), so the
file dequantizes bit-identically to the searched model. Llama-family models only for now;
metadata and tokenizer are copied from a GGUF source, or built from a HF config + BPE
tokenizer.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from llmpareto.errors import UserError
from llmpareto.formats import GGUF_FORMATS, get_format

# Keys rewritten for the exported file (or set by GGUFWriter itself).
_OWN_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version",
             "general.name")


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> GGUF row order of q/k projections (llama.cpp's rotary layout; convert_hf_to_gguf)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF -> HF row order (inverse of permute_rows)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


@functools.cache
def _name_map(n_blocks: int):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)  # ~20 ms to build


def gguf_name(hf_name: str, n_blocks: int) -> str:
    name = _name_map(n_blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"GGUF export: no llama.cpp name for tensor {hf_name}")
    return name


def _check_gguf_formats(formats: dict[str, str | None]) -> None:
    bad = sorted({f for f in formats.values() if f is not None and f not in GGUF_FORMATS})
    if bad:
        raise UserError(
            f"--format gguf: this recipe uses {', '.join(bad)}, which GGUF cannot hold (GGUF "
            f"holds {', '.join(GGUF_FORMATS)}); export it with --format hf instead"
        )


# Shape keys a student changes: written from the (restructured) model's config instead.
_SHAPE_KEYS = ("llama.block_count", "llama.feed_forward_length", "llama.attention.head_count",
               "llama.attention.head_count_kv", "llama.attention.key_length",
               "llama.attention.value_length")


def _head_dim(cfg) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _write_shape(writer, cfg) -> None:
    """Shapes from the (possibly restructured) config; a student with fewer heads keeps its
    head size, which llama.cpp would otherwise derive as hidden / heads."""
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(_head_dim(cfg))
    writer.add_value_length(_head_dim(cfg))


def _copy_metadata(writer, source_gguf: str, cfg) -> None:
    import gguf

    reader = gguf.GGUFReader(source_gguf)
    for key, field in reader.fields.items():
        if key.startswith(_OWN_KEYS) or key in _SHAPE_KEYS:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
    _write_shape(writer, cfg)


def _hf_metadata(writer, cfg, tokenizer) -> None:
    if getattr(cfg, "model_type", "") != "llama":
        raise UserError(f"GGUF export supports llama-family models; this one is "
                        f"{getattr(cfg, 'model_type', '?')!r}: use --format hf")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    _write_shape(writer, cfg)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 1e4))))
    writer.add_rope_dimension_count(_head_dim(cfg))
    writer.add_vocab_size(cfg.vocab_size)
    _bpe_tokenizer(writer, tokenizer, cfg)


def _bpe_tokenizer(writer, tokenizer, cfg) -> None:
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
    writer.add_add_bos_token(False)


def write_gguf(path: Path, model, cache, formats: dict[str, str | None], source,
               tokenizer) -> Path:
    """Write `model` (its recipe already applied through `cache`) as one GGUF file (to a
    temporary name first: a killed export never leaves a GGUF that looks whole)."""
    from llmpareto import atomic

    _check_gguf_formats(formats)
    with atomic.atomic_path(path) as tmp:
        _write_gguf_file(tmp, model, cache, formats, source, tokenizer)
    return Path(path)


def _write_gguf_file(path: Path, model, cache, formats: dict[str, str | None], source,
                     tokenizer) -> None:
    import gguf

    cfg = model.config
    n_blocks = cfg.num_hidden_layers
    writer = gguf.GGUFWriter(str(path), arch="llama")
    if source.gguf_file:
        _copy_metadata(writer, str(Path(source.directory) / source.gguf_file), cfg)
    else:
        _hf_metadata(writer, cfg, tokenizer)
    writer.add_name(f"{getattr(cfg, 'name_or_path', '') or 'model'} (llmpareto)")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)  # mixed per tensor; informative only
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    heads = {"self_attn.q_proj": cfg.num_attention_heads,
             "self_attn.k_proj": cfg.num_key_value_heads}
    kinds = {t.fqn: t.kind for t in cache.arch.tensors}
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue  # a tied output head is the embedding itself
        seen.add(id(param))
        fqn = cache.fqn_of_param.get(id(param), name.rsplit(".", 1)[0])
        fmt = formats.get(fqn)
        if fqn in formats and fmt is not None:
            data = cache.get(fqn, fmt, cache.current_sparsity.get(fqn),  # zeros stored
                             cache.current_slice.get(fqn))  # a student's shape
            qtype = gguf.GGMLQuantizationType(get_format(fmt).gguf_type)
        else:
            data, qtype = param.detach().float().cpu().numpy(), gguf.GGMLQuantizationType.F32
        if kinds.get(fqn) in heads:  # packed rows move as a whole: permuting stays exact
            data = permute_rows(data, heads[kinds[fqn]])
        writer.add_tensor(gguf_name(name, n_blocks), np.ascontiguousarray(data), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
