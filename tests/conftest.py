import os

import pytest
import torch

# The suite's models are tiny: one thread is faster than two (no OpenMP barriers), and it keeps
# subprocesses (CLI tests) from oversubscribing the machine's two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own data cache (embedded datasets, reference classifiers)."""
    cache = tmp_path_factory.getbasetemp() / "smapctl-cache"
    monkeypatch.setenv("SMAPCTL_CACHE", str(cache))
