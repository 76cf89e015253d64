"""Llama-family shapes by their config numbers, and the public models the device profiles'
published measurements name, each with the config it was read from.

A `Shape` gives the cost model's `Arch` without torch or weights, so a profile can predict a
published 7B number on any machine, and `timing_gguf` can write a file of that shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmpareto.arch import Arch, Tensor2D
from llmpareto.errors import UserError

_PROJ = (("self_attn.q_proj", "q"), ("self_attn.k_proj", "kv"), ("self_attn.v_proj", "kv"),
         ("self_attn.o_proj", "o"), ("mlp.gate_proj", "ffn"), ("mlp.up_proj", "ffn"),
         ("mlp.down_proj", "down"))


@dataclass(frozen=True)
class Shape:
    """A Llama-family decoder's shapes (what llama.cpp's speed depends on)."""

    hidden: int
    ffn: int
    blocks: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False  # output head shares the embedding (one tensor in memory)
    head_dim: int = 0  # 0: hidden // heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def arch(self) -> Arch:
        """The cost model's description of this shape (no torch, no weights)."""
        h, q, kv = self.hidden, self.heads * self.hd, self.kv_heads * self.hd
        dims = {"q": (q, h), "kv": (kv, h), "o": (h, q), "ffn": (self.ffn, h),
                "down": (h, self.ffn)}
        linears = [Tensor2D(f"model.layers.{i}.{kind}", *dims[d], i, kind)
                   for i in range(self.blocks) for kind, d in _PROJ]
        return Arch(linears=linears,
                    embedding=Tensor2D("model.embed_tokens", self.vocab, h, None, "embed"),
                    lm_head=None if self.tied else Tensor2D("lm_head", self.vocab, h, None,
                                                            "lm_head"),
                    other_params=(2 * self.blocks + 1) * h, n_layers=self.blocks,
                    n_kv_heads=self.kv_heads, head_dim=self.hd, hidden_size=h,
                    vocab_size=self.vocab, n_heads=self.heads, layer_other_params=2 * h,
                    source_bytes_per_weight=2.0)

    @property
    def n_weights(self) -> int:
        return sum(t.numel for t in self.arch().tensors)


# name -> (shape, where its numbers come from). Qwen2.5 has q/k/v biases that this Llama
# shape leaves out (a few thousand weights a block: nothing a decode time can see).
KNOWN_SHAPES: dict[str, tuple[Shape, str]] = {
    "llama-2-7b": (Shape(4096, 11008, 32, 32, 32, 32000),
                   "https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json"),
    "codellama-7b": (Shape(4096, 11008, 32, 32, 32, 32016),
                     "https://huggingface.co/codellama/CodeLlama-7b-hf/blob/main/config.json"),
    "llama-1-30b": (Shape(6656, 17920, 60, 52, 52, 32000),
                    "https://huggingface.co/huggyllama/llama-30b/blob/main/config.json"),
    "llama-2-13b": (Shape(5120, 13824, 40, 40, 40, 32000),
                    "https://huggingface.co/meta-llama/Llama-2-13b-hf/blob/main/config.json"),
    "llama-2-70b": (Shape(8192, 28672, 80, 64, 8, 32000),
                    "https://huggingface.co/meta-llama/Llama-2-70b-hf/blob/main/config.json"),
    "llama-3-8b": (Shape(4096, 14336, 32, 32, 8, 128256),
                   "https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json"),
    "llama-3.2-1b": (Shape(2048, 8192, 16, 32, 8, 128256, tied=True),
                     "https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json"),
    "llama-3.2-3b": (Shape(3072, 8192, 28, 24, 8, 128256, tied=True),
                     "https://huggingface.co/meta-llama/Llama-3.2-3B/blob/main/config.json"),
    "tinyllama-1.1b": (Shape(2048, 5632, 22, 32, 4, 32000),
                       "https://huggingface.co/TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
    "qwen2.5-0.5b": (Shape(896, 4864, 24, 14, 2, 151936, tied=True),
                     "https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json"),
    "qwen2.5-3b": (Shape(2048, 11008, 36, 16, 2, 151936, tied=True),
                   "https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/config.json"),
    "smollm2-135m": (Shape(576, 1536, 30, 9, 3, 49152, tied=True),
                     "https://huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json"),
    "smollm2-360m": (Shape(960, 2560, 32, 15, 5, 49152, tied=True),
                     "https://huggingface.co/HuggingFaceTB/SmolLM2-360M/blob/main/config.json"),
    "smollm2-1.7b": (Shape(2048, 8192, 24, 32, 32, 49152, tied=True),
                     "https://huggingface.co/HuggingFaceTB/SmolLM2-1.7B/blob/main/config.json"),
    "llama-1-7b": (Shape(4096, 11008, 32, 32, 32, 32000),
                   "https://huggingface.co/huggyllama/llama-7b/blob/main/config.json"),
    "llama-3.1-8b": (Shape(4096, 14336, 32, 32, 8, 128256),
                     "https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json"),
    "qwen2.5-1.5b": (Shape(1536, 8960, 28, 12, 2, 151936, tied=True),
                     "https://huggingface.co/Qwen/Qwen2.5-1.5B/blob/main/config.json"),
    "qwen2.5-14b": (Shape(5120, 13824, 48, 40, 8, 152064),
                    ("https://huggingface.co/Qwen/Qwen2.5-14B/blob/main/config.json (also "
                    "DeepSeek-R1-Distill-Qwen-14B)")),
    "qwen2.5-32b": (Shape(5120, 27648, 64, 40, 8, 152064),
                    ("https://huggingface.co/Qwen/Qwen2.5-32B/blob/main/config.json (also "
                    "DeepSeek-R1-Distill-Qwen-32B)")),
    # q/k RMS norms, which this shape leaves out (256 weights a block)
    "qwen3-0.6b": (Shape(1024, 3072, 28, 16, 8, 151936, tied=True, head_dim=128),
                   "https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json"),
}

# GPU calibration (`profile-host --runtime llamacpp --gpu`): a GPU streams a 135M model's
# weights in microseconds, so per-weight rates need 0.2B-3B weights to separate from per-token
# and per-block costs. Random shapes, none of them a model a benchmark validates on. Measured on
# an H100 (2026-11-23): adding 4 wide blocks and 48 narrow ones to this set made the held-out
# error worse (MAPE 10.6% -> 14.6%): a GPU's per-block launch cost overlaps with weight
# streaming in large blocks, so it is not the additive constant the fit assumes.
GPU_CALIBRATION = (  # (hidden, ffn, blocks, heads, KV heads, vocab, tied, head dim)
    (1024, 2816, 16, 16, 8, 32000, False, 64), (1536, 4096, 24, 12, 4, 64000, True, 128),
    (2560, 6912, 24, 20, 4, 100000, False, 128), (3072, 8192, 28, 24, 8, 64000, False, 128),
    # small shapes (issue 27): a 135M and a 0.5B model's per-token and per-block costs on a GPU
    # are launch-bound, not bandwidth-bound; fitted on 0.25B-3B alone they are mispredicted
    (576, 1536, 30, 9, 3, 49152, True, 64), (896, 4864, 24, 14, 2, 151936, True, 64))
for _i, _spec in enumerate(GPU_CALIBRATION):  # named, so a GPU profile's fit rows check too
    KNOWN_SHAPES[f"gpu-calibration-{_i}"] = (
        Shape(*_spec), "llmpareto's GPU calibration shape (random weights, GPU_CALIBRATION)")


def known_shape(name: str) -> Shape:
    try:
        return KNOWN_SHAPES[name][0]
    except KeyError:
        raise UserError(f"unknown model shape {name!r}; known: {', '.join(KNOWN_SHAPES)}") \
            from None
