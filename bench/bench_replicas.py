"""Replicas sharing one edit history in PostgreSQL: replication lag, commit latency, catch-up.

Real ``rome-gateway serve`` processes on the embedded model and a real PostgreSQL
(``--db``, default the machine's postgresql://postgres@127.0.0.1:5432/test; a fresh
schema per run, dropped after). One real ROME edit is computed on a folder-store
server and exported; its layer, under new edit ids, is then imported again and again:

* commit latency: ImportEdits of one layer, round trip, on a folder store (the baseline)
  and on the database store (the compare-and-swap transaction, then live);
* replication lag: from the committing replica's reply to the moment each of the other
  replicas serves that version (GetModelInfo polled every 2 ms), for ``--edits`` edits
  committed in turn through each of ``--replicas`` replicas;
* catch-up: start to SERVING of a replica whose history holds those edits, next to one
  whose history is empty (the difference is reading, verifying and applying them).

    python bench/bench_replicas.py --edits 100 --out replicas.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, percentile, print_table, served, write_json  # noqa: E402
from rome_engine.edit_store import EditLayer, decode_layer, encode_layer  # noqa: E402
from romegw_client import Client  # noqa: E402
from romegw_client.types import LayerFile  # noqa: E402

EDIT = ("{} is in", "The Eiffel Tower", " Rome")
FAST = {"v_num_grad_steps": 5}  # the edit's quality does not matter here, only its layer file


def layer_variants(layer: LayerFile, n: int) -> list[LayerFile]:
    """``n`` copies of an exported layer under new edit ids (the same factors, a valid header)."""
    base = decode_layer(layer.content)
    out = []
    for _ in range(n):
        header = dataclasses.replace(base.header, edit_id=str(uuid.uuid4()))
        content = encode_layer(EditLayer(header, base.factors, base.keys))
        out.append(LayerFile("x.safetensors", content, header.version, header.edit_id, ""))
    return out


def import_times(target: str, layers: list[LayerFile]) -> list[float]:
    times = []
    with Client(target, timeout=60) as c:
        for layer in layers:
            t0 = time.perf_counter()
            c.import_edits([layer])
            times.append(time.perf_counter() - t0)
    return times


def seen_at(target: str, version: int, stop_at: float) -> float:
    """perf_counter() when ``target`` first serves ``version`` (polling), or NaN past ``stop_at``."""
    with Client(target, timeout=10) as c:
        while time.perf_counter() < stop_at:
            if c.model_info().head_version >= version:
                return time.perf_counter()
            time.sleep(0.002)
    return float("nan")


def followers_seen(targets: list[str], version: int, stop_at: float) -> list[float]:
    """When each of ``targets`` first serves ``version``, polled in parallel."""
    seen: dict[str, float] = {}

    def poll(target: str) -> None:
        seen[target] = seen_at(target, version, stop_at)

    threads = [threading.Thread(target=poll, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [seen[t] for t in targets]


def replicated(targets: list[str], layers: list[LayerFile]) -> tuple[list[float], list[float]]:
    """(commit seconds, lag seconds per follower and edit), committing through each replica in turn."""
    commits, lags = [], []
    clients = [Client(t, timeout=60) for t in targets]
    try:
        for i, layer in enumerate(layers):
            writer = i % len(targets)
            t0 = time.perf_counter()
            (info,) = clients[writer].import_edits([layer])
            done = time.perf_counter()
            commits.append(done - t0)
            lags += [t - done for t in followers_seen([x for j, x in enumerate(targets) if j != writer],
                                                      info.version, done + 30)]  # fmt: skip
    finally:
        for c in clients:
            c.close()
    return commits, lags


def start_seconds(*args: str) -> float:
    t0 = time.perf_counter()
    with served(*args):
        return time.perf_counter() - t0


def run(db: str, edits: int, replicas: int) -> dict:
    import psycopg

    schema, empty = f"bench_{uuid.uuid4().hex[:12]}", f"bench_{uuid.uuid4().hex[:12]}"
    url, empty_url = f"{db}?schema={schema}", f"{db}?schema={empty}"
    with served() as (target, _):
        with Client(target, timeout=900) as c:
            c.apply_edit(*EDIT, method="rome", hparams=FAST, min_target_prob=0.0)
            (layer,) = c.export_edits(0)
        folder_commits = import_times(target, layer_variants(layer, edits))
    try:
        with contextlib.ExitStack() as stack:
            targets = [stack.enter_context(served("--edit-store", url))[0] for _ in range(replicas)]
            commits, lags = replicated(targets, layer_variants(layer, edits))
        catch_up = start_seconds("--edit-store", url)
        fresh = start_seconds("--edit-store", empty_url)
    finally:
        with psycopg.connect(db, autocommit=True) as conn:
            for s in (schema, empty):
                conn.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")

    def stats(values: list[float]) -> dict:
        return {"p50": percentile(values, 50), "p95": percentile(values, 95), "max": max(values), "n": len(values)}

    return {
        "machine": machine(), "edits": edits, "replicas": replicas,
        "commit_postgres_seconds": stats(commits), "commit_folder_seconds": stats(folder_commits),
        "replication_lag_seconds": stats(lags),
        "start_with_history_seconds": catch_up, "start_empty_seconds": fresh,
    }  # fmt: skip


def table(r: dict) -> list[tuple[str, str, str, str]]:
    ms = 1e3
    pg, folder, lag = r["commit_postgres_seconds"], r["commit_folder_seconds"], r["replication_lag_seconds"]
    return [
        ("ImportEdits commit, p50 / p95 (ms)", f"{pg['p50'] * ms:.1f} / {pg['p95'] * ms:.1f}",
         f"{folder['p50'] * ms:.1f} / {folder['p95'] * ms:.1f} (folder)", f"{pg['p50'] / folder['p50']:.2f}x"),
        (f"replication lag over {r['replicas']} replicas, p50 / p95 / max (ms)",
         f"{lag['p50'] * ms:.1f} / {lag['p95'] * ms:.1f} / {lag['max'] * ms:.1f}", "-", "-"),
        (f"start to SERVING, {r['edits']} versions behind (s)", f"{r['start_with_history_seconds']:.1f}",
         f"{r['start_empty_seconds']:.1f} (empty history)",
         f"+{r['start_with_history_seconds'] - r['start_empty_seconds']:.1f} s"),
    ]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    r = run(args.db, args.edits, args.replicas)
    print_table(f"Replicas on one PostgreSQL history ({args.edits} edits)", table(r))
    if args.out:
        write_json(args.out, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
