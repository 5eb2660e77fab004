"""Peak resident memory of a real server process against the size of the model's weights.

Starts ``rome-gateway serve`` on the embedded model (float32, CPU) as its own
process, drives it with concurrent Generate streams, an edit and its revert,
then reads the kernel's high-water mark of its resident set (VmHWM).

    python bench/bench_memory.py
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_edits import EDIT
from bench.common import served
from rome_engine.loading import LoadedModel, load_model
from romegw_client import Client


def weight_bytes(loaded: LoadedModel) -> int:
    """Bytes of the parameters and buffers (tied matrices counted once)."""
    tensors = {id(t): t for t in [*loaded.model.parameters(), *loaded.model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def run(loaded: LoadedModel, *, streams: int = 8, tokens: int = 32, hparams: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory() as store, served("--edit-store", str(Path(store) / "edits")) as (target, proc):
        rss_ready = proc_status_kib(proc.pid, "VmRSS") * 1024

        def one(i: int) -> None:
            with Client(target, timeout=600) as s:
                s.generate_text(f"Story number {i}: once upon a time", max_new_tokens=tokens)

        with Client(target, timeout=1800) as c:
            threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
            for t in threads:
                t.start()
            c.apply_edit(*EDIT, hparams=hparams or {})
            for t in threads:
                t.join()
            c.revert_edit(to_version=0)
        peak = proc_status_kib(proc.pid, "VmHWM") * 1024
    weights = weight_bytes(loaded)
    return {"weight_bytes": weights, "rss_ready_bytes": rss_ready, "peak_rss_bytes": peak, "ratio": peak / weights}


def main() -> int:
    loaded = load_model(None, device="cpu", dtype="float32")
    r = run(loaded)
    mib = 2**20
    print(f"weights {r['weight_bytes'] / mib:.0f} MiB; server RSS when ready {r['rss_ready_bytes'] / mib:.0f} MiB, "
          f"peak {r['peak_rss_bytes'] / mib:.0f} MiB = {r['ratio']:.2f}x the weights")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
