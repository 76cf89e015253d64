"""Tiny random Llama models with a small BPE tokenizer, built locally (no hub, no download).

Used by the tests and as calibration models for `profile-host --runtime llamacpp`, whose
sizes are deliberately unlike any real model a benchmark validates against.
"""

from __future__ import annotations

from pathlib import Path

TINY = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
        "max_position_embeddings": 512}


def build_tiny_model(folder: Path, seed: int = 0, tie: bool = True, **config) -> Path:
    """A random LlamaForCausalLM (safetensors) plus a BPE trained on the CPython docs."""
    from pydoc_data.topics import topics

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = {**TINY, **config}
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg["vocab_size"], show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=tie, bos_token_id=1,
                                         eos_token_id=2))
    model.save_pretrained(folder, safe_serialization=True)
    return folder
