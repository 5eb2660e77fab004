"""The version gate: streams run on one version; an edit swaps weights between them.

A reader (a Generate stream, a Score, a Trace) holds a lease for its whole
run. A writer (an edit being activated) first closes the gate to new readers,
then waits for the running ones to finish, swaps the weights, and reopens.
New readers queue meanwhile; a writer that cannot drain the running streams
within its timeout gives up (UNAVAILABLE) and lets the queue through, so
neither side waits without bound.

    async with gate.read():          # a stream
        ...
    async with gate.write(timeout=30.0):
        swap_weights()
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from .errors import Unavailable


class VersionGate:
    def __init__(self) -> None:
        self._readers = 0
        self._waiting = 0
        self._writer = False
        self._cond: asyncio.Condition | None = None
        self.last_pause_seconds = 0.0  # how long the gate was closed to new readers by the last writer

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # created on the serving loop at first use
            self._cond = asyncio.Condition()
        return self._cond

    @property
    def readers(self) -> int:
        return self._readers

    @property
    def waiting(self) -> int:
        """Readers queued behind a writer."""
        return self._waiting

    @contextlib.asynccontextmanager
    async def read(self, timeout: float | None = None) -> AsyncIterator[None]:
        cond = self._condition()
        async with cond:
            self._waiting += 1
            try:
                await asyncio.wait_for(cond.wait_for(lambda: not self._writer), timeout)
            except TimeoutError:
                raise Unavailable(f"an edit is being applied; still waiting after {timeout:.0f} s: retry") from None
            finally:
                self._waiting -= 1
            self._readers += 1
        try:
            yield
        finally:
            async with cond:
                self._readers -= 1
                cond.notify_all()

    @contextlib.asynccontextmanager
    async def write(self, timeout: float) -> AsyncIterator[None]:
        cond = self._condition()
        t0 = time.perf_counter()
        async with cond:
            self._writer = True  # new readers queue from here on
            try:
                await asyncio.wait_for(cond.wait_for(lambda: self._readers == 0), timeout)
            except TimeoutError:
                self._writer = False
                cond.notify_all()
                raise Unavailable(
                    f"{self._readers} running streams did not finish within {timeout:.0f} s "
                    "(the edit_drain_timeout limit); nothing was changed: retry the edit"
                ) from None
        try:
            yield
        finally:
            async with cond:
                self._writer = False
                self.last_pause_seconds = time.perf_counter() - t0
                cond.notify_all()
