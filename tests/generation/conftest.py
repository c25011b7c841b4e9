"""Shared fixtures for generation tests: the shipped tiny byte-level BPE tokenizer (no network)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import fast_xlstm

TINY_TOKENIZER_JSON = Path(fast_xlstm.__file__).parent / "assets" / "tiny" / "tokenizer.json"


@pytest.fixture
def tiny_tokenizer_dir(tmp_path: Path) -> Path:
    """A temporary model directory holding a copy of the shipped tiny tokenizer.json (vocab 1024)."""
    shutil.copy(TINY_TOKENIZER_JSON, tmp_path / "tokenizer.json")
    return tmp_path


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer_dir: Path):
    from fast_xlstm.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_tokenizer_dir)
