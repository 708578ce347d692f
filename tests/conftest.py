"""Shared fixtures: a fresh RunEngine per test and document collectors."""

from __future__ import annotations

import asyncio
import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def RE(request):
    """A RunEngine on a fresh event loop, torn down after the test (as in bluesky's tests)."""
    from bluesky import RunEngine

    loop = asyncio.new_event_loop()
    loop.set_debug(False)
    re = RunEngine({}, call_returns_result=True, loop=loop)

    def clean_event_loop():
        if re.state not in ("idle", "panicked"):
            try:
                re.halt()
            except Exception:  # pragma: no cover - best effort teardown
                pass
        loop.call_soon_threadsafe(loop.stop)
        re._th.join()
        loop.close()

    request.addfinalizer(clean_event_loop)
    return re


@pytest.fixture
def docs():
    """A list collecting (name, doc) pairs; subscribe ``docs.append`` wrapped as below."""

    class Collector(list):
        __hash__ = object.__hash__  # RE.subscribe needs a hashable callable

        def __call__(self, name, doc):
            self.append((name, doc))

        def of(self, name):
            return [d for n, d in self if n == name]

    return Collector()
