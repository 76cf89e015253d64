"""Tiny random Llama models with a small BPE tokenizer, built locally (no hub, no download).

Used by the tests and as calibration models for `profile-host --runtime llamacpp`, whose
sizes are deliberately unlike any real model a benchmark validates against.
"""

from __future__ import annotations

from pathlib import Path

TINY = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
        "max_position_embeddings": 512}


def build_tokenizer(folder: Path, vocab_size: int, add_bos: bool = False):
    """A byte-level BPE trained on the CPython docs (<unk> 0, <s> 1 = BOS, </s> 2 = EOS),
    saved in `folder`; `add_bos`: it puts BOS before every text, as Llama 3 or Gemma do."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(folder: Path, seed: int = 0, tie: bool = True, **config) -> Path:
    """A random LlamaForCausalLM (safetensors) plus a BPE trained on the CPython docs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {**TINY, **config}
    build_tokenizer(folder, cfg["vocab_size"])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=tie, bos_token_id=1,
                                         eos_token_id=2))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


# One tiny random model per family (llmpareto.families), shaped to show what differs: config
# class, config keys, and whether its tokenizer puts BOS first. initializer_range 0.2 makes
# the logits far from uniform (std ~1.5), so a wrong tensor in an export cannot hide. Where
# transformers' GGUF loader reads no key for a number (Qwen3's head size, Gemma's query scale,
# Phi-3's padding id), the tiny model uses what the loader assumes, as the released models do.
_BASE = {**TINY, "initializer_range": 0.2, "bos_token_id": 1, "eos_token_id": 2}
FAMILY_MODELS: dict[str, tuple[str, dict, bool]] = {
    # name: (transformers config class, config, tokenizer adds BOS)
    "llama3-tied": ("LlamaConfig", {"tie_word_embeddings": True}, True),
    "llama2-untied": ("LlamaConfig", {"tie_word_embeddings": False}, True),
    "qwen2.5": ("Qwen2Config", {"tie_word_embeddings": True}, False),
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True, "head_dim": 128}, False),
    "gemma2": ("Gemma2Config", {"head_dim": 256, "query_pre_attn_scalar": 256,
                                "sliding_window": 16, "attn_logit_softcapping": 50.0,
                                "final_logit_softcapping": 30.0, "pad_token_id": 0,
                                "layer_types": ["sliding_attention", "full_attention"]}, True),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 256, "query_pre_attn_scalar": 256,
                                    "sliding_window": 16, "pad_token_id": 0,
                                    "num_hidden_layers": 6}, True),  # 5 sliding, 1 full
    "phi3": ("Phi3Config", {"tie_word_embeddings": False, "vocab_size": 32064}, True),
    "mistral": ("MistralConfig", {"tie_word_embeddings": False, "sliding_window": None}, True),
}


def build_family_model(name: str, folder: Path, seed: int = 0, **config) -> Path:
    """The tiny random model of FAMILY_MODELS[name] (safetensors) with its tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cls, extra, add_bos = FAMILY_MODELS[name]
    cfg = getattr(transformers, cls)(**{**_BASE, **extra, **config})
    # a larger model vocabulary than the tokenizer's (Phi-3's 32064) leaves ids unused, as in
    # the released models; training a 32k BPE would only cost time
    build_tokenizer(folder, min(cfg.vocab_size, TINY["vocab_size"]), add_bos)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
