"""The swap gate: forward passes read the live weights; an edit's swap writes them, between passes.

Every top-level forward pass of the model (a decode step, a prefill, one batch
of a trace, a Score) holds a *read* lease for its own duration only, never for
a whole stream. Making a version live takes the *write* lease: new passes wait
while it is wanted, the running ones finish (one pass, milliseconds on a decode
step), the touched matrices are overwritten (a copy of tensors built before),
and the passes go on. A stream therefore never waits for another stream, and an
edit waits at most for the passes already in flight.

    gate = SwapGate()
    with gate.reading():        # one forward pass (the model's hooks do this, see versions.py)
        model(...)
    with gate.writing():        # the weight copy of a version swap
        weights.install(prepared)

Leases are per thread and reentrant for readers (a pass inside a pass on the
same thread holds one lease). Threading primitives, not asyncio: passes run on
worker threads and the batch scheduler's thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


class SwapGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writers_waiting = 0
        self._writing = False
        self._local = threading.local()
        self.last_wait_seconds = 0.0  # how long the last writer waited for the passes in flight

    @property
    def readers(self) -> int:
        """Forward passes running now."""
        return self._readers

    def acquire_read(self) -> None:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._writing or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1

    def release_read(self) -> None:
        depth = getattr(self._local, "depth", 0)
        if depth <= 0:
            return  # a pass that failed before its lease was taken
        self._local.depth = depth - 1
        if depth == 1:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Exclusive: no forward pass runs inside. Writers come first: new passes wait behind one."""
        if getattr(self._local, "depth", 0):
            raise RuntimeError("a forward pass cannot swap the weights it is reading")
        t0 = time.perf_counter()
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        self.last_wait_seconds = time.perf_counter() - t0
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()
