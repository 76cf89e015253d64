"""Shared fixtures: a tiny random Llama with a small BPE tokenizer, built locally (no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmpareto.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tiny_settings(tiny_model_dir, tmp_path) -> dict:
    """Keyword arguments for a fast search on the tiny model."""
    return {"model": str(tiny_model_dir), "runs_dir": str(tmp_path / "runs"), "study": "t",
            "window": 64, "eval_tokens": 256, "calib_tokens": 128, "trials": 10,
            "progress": False, "context": 512}
