"""Seconds per single-fact edit with the server's default method (or ``--method``), at few and at
many active edits.

The path ApplyEdit takes (``EditManager``: compute the layer on the live weights, store it as
the next version, make it live), on the embedded model with C, the eigenbasis and the prefixes
cached, with the default method (``auto``: the null-space projected mode). First ``--edits``
CounterFact records are edited on top of 10 active edits; then the store is filled up to
``--active`` active layers and the next ``--edits`` records are edited on top of those. The
filler layers are copies of a real projected layer under new ids, their factors scaled down
1000x (the weights stay sane) and their keys replaced by random vectors of the real keys'
norms, so that the earlier-edit statistic the projected mode builds has full rank, as 1,000
real edits' keys would (a gated filler keeps its gate: each pass pays for its column). The
first edit on top of the fillers is timed apart: it folds all their keys into the basis once
(as the first edit after a restart or a revert does).

    python bench/bench_edit_time.py --edits 8 --active 1000 --out edit_time.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import machine, percentile, print_table, write_json  # noqa: E402
from rome_engine.delta import LowRankFactor  # noqa: E402
from rome_engine.edit_store import EditLayer, EditStore  # noqa: E402
from rome_engine.editing import EditManager, method_compute  # noqa: E402
from rome_engine.evaluation import CounterFactRecord, load_counterfact  # noqa: E402
from rome_engine.loading import default_cache_dir, load_model  # noqa: E402
from rome_engine.methods import METHODS, default_method  # noqa: E402
from rome_engine.rome import EditRequest  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact-train.json"


def edit(manager: EditManager, method: str, rec: CounterFactRecord) -> dict[str, float]:
    """One edit through the ApplyEdit path: seconds computing, storing, making it live."""
    req = EditRequest(rec.prompt, rec.subject, rec.target_new)
    t0 = time.perf_counter()
    layer = manager.compute_layer([req], method, author="bench", comment="")
    t1 = time.perf_counter()
    entry = manager.store_layer(layer)
    t2 = time.perf_counter()
    manager.activate(entry.active, entry.version)
    t3 = time.perf_counter()
    return {"seconds": t3 - t0, "compute": t1 - t0, "store": t2 - t1, "activate": t3 - t2}


def fillers(real: EditLayer, n: int, seed: int = 0) -> list[EditLayer]:
    """``n`` stand-ins for earlier edits (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        factors = tuple(LowRankFactor(f.param, f.u * 1e-3, f.v.clone(), f.threshold) for f in real.factors)
        keys = {p: torch.randn(k.shape, generator=g) * (k.norm() / k.numel() ** 0.5) for p, k in real.keys.items()}
        header = dataclasses.replace(real.header, edit_id=str(uuid.uuid4()))
        out.append(EditLayer(header, factors, keys))
    return out


def stats(rows: list[dict[str, float]]) -> dict[str, float]:
    s = [r["seconds"] for r in rows]
    return {
        "median": statistics.median(s), "p95": percentile(s, 95), "n": len(s),
        **{f"{k}_median": statistics.median(r[k] for r in rows) for k in ("compute", "store", "activate")},
    }  # fmt: skip


def run(records: list[CounterFactRecord], n_edits: int, active: int, method: str = "") -> dict:
    loaded = load_model(None, device="cpu", dtype="float32")
    method = method or default_method(loaded)
    with tempfile.TemporaryDirectory() as tmp:
        manager = EditManager(loaded, EditStore(tmp, loaded.model_id), compute=method_compute(default_cache_dir()))
        manager.restore()
        warm = [edit(manager, method, rec) for rec in records[:10]]  # caches; 10 active edits from here
        few = [edit(manager, method, rec) for rec in records[10 : 10 + n_edits]]
        real = manager.version_layers(manager.head_version)[-1]
        fill = fillers(real, active - len(manager.active))
        entries = manager.store_layers(fill, op="import")
        manager.activate(entries[-1].active, entries[-1].version)
        # the first edit on top of them folds every earlier key into the basis once, as the first
        # edit after a restart or a revert does; the following ones extend it by one edit each
        cold = edit(manager, method, records[10 + n_edits])
        many = [edit(manager, method, rec) for rec in records[11 + n_edits : 11 + 2 * n_edits]]
        manager.activate([], 0)
    return {
        "machine": machine(), "method": method, "threads": torch.get_num_threads(),
        "warmup": stats(warm), "at_10": stats(few), f"at_{active}": stats(many), "active": active,
        "first_after_restart": cold, "records": [r.case_id for r in records[: 11 + 2 * n_edits]],
    }  # fmt: skip


def table(r: dict) -> list[tuple[str, str, str, str]]:
    few, many = r["at_10"], r[f"at_{r['active']}"]

    def row(key: str, what: str) -> tuple[str, str, str, str]:
        return (f"{what} at {r['active']} active edits (s)", f"{many[key]:.2f}", f"{few[key]:.2f} (at 10)",
                f"{many[key] / few[key]:.2f}x" if few[key] else "-")  # fmt: skip

    return [
        row("median", f"{r['method']} edit, median"), row("p95", f"{r['method']} edit, p95"),
        row("compute_median", "compute, median"), row("store_median", "store, median"),
        row("activate_median", "live, median"),
        (f"first edit at {r['active']} after a restart (s)", f"{r['first_after_restart']['seconds']:.2f}",
         "-", "-"),
    ]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--start", type=int, default=3000, help="first CounterFact record (not used for tuning)")
    ap.add_argument("--edits", type=int, default=8, help="edits timed at each point")
    ap.add_argument("--active", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--method", default="", choices=["", *METHODS], help="default: the server's default method")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    records = load_counterfact(args.data, start=args.start, n=11 + 2 * args.edits)
    r = run(records, args.edits, args.active, args.method)
    which = f"the method {r['method']}" if args.method else f"the default method ({r['method']})"
    print_table(f"Edit time with {which}, 10 vs {args.active} active edits", table(r))
    if args.out:
        write_json(args.out, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
