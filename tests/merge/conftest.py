"""Fixtures for the merge tests (helpers live in tiny_models.py)."""

import os

import pytest

from tests.merge.tiny_models import build_family

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base sharded into several files with 3 fine-tuned copies (also sharded) and a tokenizer."""
    root = tmp_path_factory.mktemp("family")
    return build_family(root, n=3, max_shard_size="40KB")
