"""Shared fixtures: a tiny random Llama with a small BPE tokenizer, built locally (no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512)


def build_tiny_model(folder: Path, seed: int = 0, tie: bool = True) -> Path:
    """A random LlamaForCausalLM (safetensors) plus a 1024-token BPE trained on CPython docs."""
    import torch
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(**TINY, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:  # noqa: ANN001
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tiny_settings(tiny_model_dir, tmp_path) -> dict:  # noqa: ANN001
    """Keyword arguments for a fast search on the tiny model."""
    return dict(model=str(tiny_model_dir), runs_dir=str(tmp_path / "runs"), study="t",
                window=64, eval_tokens=256, calib_tokens=128, trials=10, progress=False,
                context=512)
