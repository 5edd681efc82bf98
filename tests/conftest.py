"""Test setup: CPU-only machines run the Triton kernels through the interpreter.

``TRITON_INTERPRET`` must be set before triton is first imported, so it is set here, at collection.
"""

import math
import os
import sys

# Compiled graphs are cached on disk across runs, keyed without the custom ops' fake kernels: a stale
# entry from an older version of the library could pass or fail a test on its own. Tests compile afresh.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # the marker, not ``"gpu" in item.keywords``: keywords also hold the names of the folders
        # above the test (a checkout in a folder named "gpu" would skip every test)
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_launch_caches():
    """The launch descriptions cached per key hold the kernels and helpers as they were when made: every
    test starts from empty caches, so that one that replaces those (monkeypatch) is not served another
    test's. A test that replaces them after a call clears the caches itself (``tuning.clear_cache``)."""
    from qna_triton import _cache

    _cache.clear_all()
    yield
    _cache.clear_all()


@pytest.fixture
def nan_poison(monkeypatch):
    """Every float ``torch.empty`` is filled with NaN, so an element a kernel forgets to write fails."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(math.nan)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.fixture
def triton_backend(monkeypatch):
    """The op runs on the Triton kernels (the interpreter on a CPU)."""
    monkeypatch.setenv("QNA_TRITON_BACKEND", "triton")
