import os

import pytest
import torch

# Keep the suite within the machine's two cores and independent of the user's cache.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own data cache (embedded datasets, reference classifiers)."""
    cache = tmp_path_factory.getbasetemp() / "smapctl-cache"
    monkeypatch.setenv("SMAPCTL_CACHE", str(cache))
