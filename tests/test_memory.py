"""engine/memory.py: what a run's summary measures about memory."""

from __future__ import annotations

import weakref

import pytest
import torch

from deltatune.engine import memory


class _Referent:
    pass


def test_live_tensor_mb_counts_each_storage_once_and_survives_dead_weak_proxies():
    """torch.compile leaves weak proxies whose referent is gone; asking one for its class raises. The scan
    must skip them (it did not: every compiled run failed writing its summary)."""
    referent = _Referent()
    proxy = weakref.proxy(referent)
    del referent  # the proxy is now dead, and still reachable from gc.get_objects() through this frame
    before = memory.live_tensor_mb()
    big = torch.ones(2**20, dtype=torch.float32)  # 4 MB
    views = [big[:10], big.view(1024, 1024)]  # share its storage: counted once
    assert memory.live_tensor_mb() - before == pytest.approx(4.0, abs=0.5)
    assert proxy is not None and views
