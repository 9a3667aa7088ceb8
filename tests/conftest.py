import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Tell process launchers (tests/distributed/harness.py) whether the test being set up is marked slow."""
    os.environ["ROBUSTFT_TEST_SLOW"] = "1" if item.get_closest_marker("slow") else "0"
