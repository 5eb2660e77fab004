"""Edits under traffic: ApplyEdit time (C cached vs not is in the ROME section), the layer
file's size, RevertEdit latency, the edit's stored -> live time, and the pause a stream sees
while an edit is applied (``bench_versions`` measures that under 16 streams).

A client keeps back-to-back Generate streams running (like live traffic) while
another applies an edit; every token's arrival time is recorded. The pause is
the longest gap between two consecutive tokens (a stream's first token counts
from its request), compared with the longest gap before the edit started.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

from rome_engine.loading import LoadedModel, default_cache_dir
from romegw_client import Client
from romegw_server.main import ServerConfig, ServerThread, build_engine

EDIT = ("The Eiffel Tower is in", "The Eiffel Tower", " Rome")


def traffic(target: str, stop: threading.Event, stamps: list[float], max_new_tokens: int) -> None:
    with Client(target, timeout=600) as c:
        while not stop.is_set():
            stamps.append(time.perf_counter())  # the request
            for _ in c.generate("The history of Paris", max_new_tokens=max_new_tokens):
                stamps.append(time.perf_counter())


def max_gap(stamps: list[float], start: float, end: float) -> float:
    inside = [t for t in stamps if start <= t <= end]
    return max((b - a for a, b in zip(inside, inside[1:], strict=False)), default=float("nan"))


def run(loaded: LoadedModel, *, hparams: dict | None = None, reverts: int = 5, stream_tokens: int = 16) -> dict:
    with tempfile.TemporaryDirectory() as store:
        config = ServerConfig(host="127.0.0.1", port=0, edit_store=Path(store), cache_dir=default_cache_dir())
        engine = build_engine(loaded, config)
        with ServerThread(engine, config) as srv, Client(srv.target, timeout=1800) as c:
            # warm the ROME caches (C, prefixes) so the timed edit is the steady-state one
            c.apply_edit(*EDIT, hparams=hparams or {}, dry_run=True)
            stamps: list[float] = []
            stop = threading.Event()
            t = threading.Thread(target=traffic, args=(srv.target, stop, stamps, stream_tokens))
            t.start()
            time.sleep(3.0)
            t0 = time.perf_counter()
            r = c.apply_edit(*EDIT, hparams=hparams or {})
            t1 = time.perf_counter()
            live_seconds = engine.versions.last_swap_seconds
            time.sleep(2.0)
            stop.set()
            t.join()
            layer_bytes = next(Path(store, "layers").glob("*.safetensors")).stat().st_size
            revert_ms = []
            for i in range(reverts):
                s0 = time.perf_counter()
                c.revert_edit(to_version=0 if i % 2 == 0 else 1)
                revert_ms.append((time.perf_counter() - s0) * 1000)
            c.revert_edit(to_version=0)
        engine.close()
    return {
        "apply_seconds": t1 - t0,
        "compute_seconds": r.edit.compute_seconds,
        "layer_file_bytes": layer_bytes,
        "revert_ms_median": statistics.median(revert_ms),
        "revert_ms_max": max(revert_ms),
        "live_seconds": live_seconds,
        "stream_max_gap_before_s": max_gap(stamps, t0 - 3.0, t0),
        "stream_max_gap_during_edit_s": max_gap(stamps, t0, t1 + 0.5),
        "stream_median_gap_before_s": statistics.median(
            [b - a for a, b in zip(stamps, stamps[1:], strict=False) if b < t0] or [float("nan")]
        ),
    }
