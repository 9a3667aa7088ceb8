"""Fixtures for the merge tests (helpers live in tiny_models.py)."""

import os

import pytest

from tests.merge.tiny_models import build_family, tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base sharded into several files with 3 fine-tuned copies (also sharded) and a tokenizer."""
    root = tmp_path_factory.mktemp("family")
    return build_family(root, n=3, max_shard_size="40KB")


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 4-layer base and 3 fine-tuned copies, sharded (layers at t = 0, 1/3, 2/3, 1)."""
    root = tmp_path_factory.mktemp("grammar")
    return build_family(root, n=3, max_shard_size="30KB", config=tiny_config(layers=4), tokenizer=False)
