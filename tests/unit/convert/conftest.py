"""Fixtures shared by the conversion tests."""

from __future__ import annotations

import pytest
import tiny_hf as T


@pytest.fixture(scope="session")
def hf(tmp_path_factory):
    """Tiny HF models (Llama LLM, CLIP, a projector) with their tokenizer and image processor."""
    return T.make_hf_models(tmp_path_factory.mktemp("hf"), with_processors=True)
