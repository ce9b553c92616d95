"""Test-wide set-up. Tests never touch the network, and never write into the user's caches.

Set before anything imports `datasets` / `huggingface_hub`, which read these once at import time.
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="rufus-tests-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (long end-to-end checks) run only when -m selects them: `pytest -m slow`."""
    markexpr = config.option.markexpr or ""
    if "slow" in markexpr and "not slow" not in markexpr:
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The default tiny random Llama + tokenizer (`make_tiny_model_dir` with no options), built once.

    Shared by every test in the session, so treat the directory as read-only: write outputs under
    the test's own tmp_path. Tests that need another architecture, size or seed build their own.
    """
    from tests.helpers import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def small_base(tmp_path_factory):
    """A small playground base model (~20 s to build), shared by the pipeline tests."""
    from rufus.playground import base
    from tests.helpers import SMALL_BASE

    return base.build_base_model(tmp_path_factory.mktemp("base") / "model", seed=0, **SMALL_BASE)
