"""Model load time: the first start (GGUF conversion into a fresh cache) and a cached start."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rome_engine.loading import load_model


def run(*, first: bool = True) -> dict:
    out: dict[str, float] = {}
    if first:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            load_model(None, device="cpu", dtype="float32", cache_dir=Path(tmp))
            out["first_start_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_model(None, device="cpu", dtype="float32")
    out["cached_start_s"] = time.perf_counter() - t0
    return out
