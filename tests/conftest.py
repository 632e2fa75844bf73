"""Fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import pytest

from relax_pl.testing import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Qwen2 with its tokenizer, saved as a Hugging Face folder (seed 0); tests only read it."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2", kind="qwen2", seed=0)
