"""Fixtures shared by the callback tests."""

import pytest


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """A random-init 2-layer Llama and a word-level tokenizer, saved (TRL builds its reference from it)."""
    from tests.callbacks.trl_helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
