"""GGUF files of a given Llama shape for timing only: every tensor in its format, filled with
one valid quantized pattern repeated, and a placeholder vocabulary of any size.

llama.cpp's decode time depends on shapes and formats, not on weight values, so a 7B-shaped
file is written in seconds (quantizing 7B random weights takes many minutes) and can carry a
real model's vocabulary (a large output head is part of a small model's per-token cost).
The files are never used for quality: their weights are a repeated block pattern.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmpareto.formats import get_format
from llmpareto.shapes import Shape


def _filled(fmt: str | None, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, cols) in `fmt`: 8 random rows quantized once, repeated down the tensor."""
    seed = (0.02 * rng.standard_normal((min(rows, 8), cols))).astype(np.float32)
    block = seed if fmt is None else get_format(fmt).quantize(seed)
    return np.ascontiguousarray(np.tile(block, (-(-rows // len(block)), 1))[:rows])


def write_timing_gguf(path: str | Path, shape: Shape, formats: dict[str, str | None],
                      seed: int = 0) -> Path:
    """Write `shape` with each tensor in `formats[fqn]` (None: f32), as llama.cpp loads it."""
    import gguf

    from llmpareto.families import gguf_name

    arch, rng = shape.arch(), np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name(f"llmpareto timing model {shape}")
    w.add_context_length(4096)
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.blocks)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_key_length(shape.hd)
    w.add_value_length(shape.hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(1e4)
    w.add_rope_dimension_count(shape.hd)
    w.add_vocab_size(shape.vocab)
    w.add_tokenizer_model("gpt2")  # placeholder tokens: timing feeds token ids directly
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<{i}>" for i in range(shape.vocab)])
    w.add_token_types([1] * shape.vocab)
    w.add_token_merges(["< 1"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in arch.tensors:
        fmt = formats.get(t.fqn)
        qtype = gguf.GGMLQuantizationType(get_format(fmt).gguf_type if fmt else 0)
        w.add_tensor(gguf_name(f"{t.fqn}.weight", shape.blocks),
                     _filled(fmt, t.rows, t.cols, rng), raw_dtype=qtype)
    norm = np.ones(shape.hidden, dtype=np.float32)
    for i in range(shape.blocks):
        for name in ("input_layernorm", "post_attention_layernorm"):
            w.add_tensor(gguf_name(f"model.layers.{i}.{name}.weight", shape.blocks), norm)
    w.add_tensor(gguf_name("model.norm.weight", shape.blocks), norm)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
