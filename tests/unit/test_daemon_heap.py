"""A daemon that serves moves what its start made out of the collector's generations, so a
collection during a Request walks only what came after (a full one over a daemon's heap takes
10-20 ms)."""

from __future__ import annotations

import gc

import pytest

from nsm.daemon import settle_heap

pytestmark = pytest.mark.timeout(30)


def test_settle_heap_freezes_what_is_alive() -> None:
    kept = [[i] for i in range(10_000)]  # a started daemon's long-lived objects
    try:
        settle_heap()
        assert gc.get_freeze_count() >= len(kept)
    finally:
        gc.unfreeze()
