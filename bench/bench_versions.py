"""Edits under load: an edit and a revert go live while streams run, and pinned versions share a batch.

One real edit is computed first (ApplyEdit, C cached), exported, and reverted; the
measured phases then import that layer file (ImportEdits: the same commit path as
ApplyEdit, without the minutes of computing) or revert it while N streams of T new
tokens run, and send short requests every ``short_every`` seconds meanwhile:

* stored -> live: the engine's own timing of the swap (``LiveVersions.last_swap_seconds``:
  build the new matrices, wait for the forward passes in flight, copy);
* the RPC's seconds (ImportEdits / RevertEdit) under that load;
* the longest gap between two tokens of any running stream around the switch, over
  that stream's median gap;
* the time to first token of the short requests sent during the commit, p50 / p95,
  against the same requests under the same load with no edit (measured in this run);
* aggregate tokens/s of N streams, half pinned to version 0 and half on the head,
  against the same N streams all on the head.

With ``baseline_tree`` (``bench/bench_versions.py --baseline-ref REF`` extracts that
commit, e.g. the one before versions went live without a drain), the edit-under-load
phase also runs against that code's server, as a process, for the side-by-side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import free_port, median, percentile, wait_until_serving
from rome_engine.engine import EngineLimits
from rome_engine.loading import LoadedModel, default_cache_dir
from romegw_client import Client, GatewayError
from romegw_client.types import LayerFile
from romegw_server.main import ServerConfig, ServerThread, build_engine

EDIT = ("The Eiffel Tower is in", "The Eiffel Tower", " Rome")
STREAM_PROMPT = "Count from 1 to 1000: 1, 2, 3, 4,"  # greedy: 512 tokens without an end of sequence
SHORT_PROMPT = "The capital of Italy is"


@dataclass
class Load:
    """N streams of T tokens, each token's arrival time recorded."""

    target: str
    streams: int
    tokens: int
    pin: dict = field(default_factory=dict)
    stamps: list[list[float]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, pins: list[dict] | None = None) -> Load:
        self.stamps = [[] for _ in range(self.streams)]
        for i in range(self.streams):
            pin = pins[i] if pins else self.pin
            t = threading.Thread(target=self._stream, args=(i, pin), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _stream(self, i: int, pin: dict) -> None:
        with Client(self.target, timeout=1800) as c:
            self.stamps[i].append(time.perf_counter())
            for _ in c.generate(STREAM_PROMPT, max_new_tokens=self.tokens, temperature=0.0, **pin):
                self.stamps[i].append(time.perf_counter())

    def wait_started(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while any(len(s) < 3 for s in self.stamps) and time.monotonic() < deadline:
            time.sleep(0.01)

    def join(self) -> None:
        for t in self.threads:
            t.join()

    def worst_gap_ratio(self, start: float, end: float) -> float:
        """Max over streams of (longest gap between tokens in [start, end]) / (the stream's median gap)."""
        ratios = []
        for s in self.stamps:
            gaps = [b - a for a, b in zip(s[1:], s[2:], strict=False)]  # token to token, not the request
            inside = [b - a for a, b in zip(s[1:], s[2:], strict=False) if b >= start and a <= end]
            if gaps and inside:
                ratios.append(max(inside) / median(gaps))
        return max(ratios, default=float("nan"))

    def tokens_per_second(self) -> float:
        first, last = min(s[0] for s in self.stamps), max(s[-1] for s in self.stamps)
        return sum(len(s) - 1 for s in self.stamps) / (last - first)


def short_requests(target: str, stop: threading.Event, every: float, ttft: list[float]) -> None:
    """A new 1-token request every ``every`` seconds until ``stop``: its time to first token."""
    with Client(target, timeout=600) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            for _ in c.generate(SHORT_PROMPT, max_new_tokens=1, temperature=0.0):
                ttft.append(time.perf_counter() - t0)
                break
            stop.wait(every)


def under_load(target: str, action, *, streams: int, tokens: int, short_every: float) -> dict:
    """Run ``action()`` (or nothing) in the middle of N running streams with short requests around it."""
    load = Load(target, streams, tokens).start()
    load.wait_started()
    time.sleep(0.5)
    ttft: list[float] = []
    stop = threading.Event()
    shorts = threading.Thread(target=short_requests, args=(target, stop, short_every, ttft))
    shorts.start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    error = None
    try:
        action()
    except GatewayError as e:  # the drain baseline gives up (UNAVAILABLE) under steady long streams
        error = f"{e.code.name}: {e}"
    t1 = time.perf_counter()
    time.sleep(0.3)
    stop.set()
    shorts.join()
    load.join()
    return {
        "rpc_seconds": t1 - t0,
        "worst_gap_ratio": load.worst_gap_ratio(t0, max(t1 + 0.05, t0 + 0.3)),  # the same window without an edit
        "ttft_p50": median(ttft),
        "ttft_p95": percentile(ttft, 95),
        "short_requests": len(ttft),
        "error": error,
    }


def mixed_batch(target: str, *, streams: int, tokens: int, pinned: int) -> dict:
    """Aggregate tokens/s: half the streams pinned to ``pinned``, the rest on the head, vs all on the head."""
    one = Load(target, streams, tokens).start()
    one.join()
    mixed = Load(target, streams, tokens).start([{"edit_version": pinned} if i % 2 else {} for i in range(streams)])
    mixed.join()
    return {"head_only_tps": one.tokens_per_second(), "mixed_tps": mixed.tokens_per_second()}


def prepared_layer(c: Client, hparams: dict | None) -> LayerFile:
    """A real edit, computed once (C and prefixes cached from here on) and exported."""
    c.apply_edit(*EDIT, hparams=hparams or {})
    (layer,) = c.export_edits(0)
    return layer


def run(
    loaded: LoadedModel, *, hparams: dict | None = None, streams: int = 16, tokens: int = 512,
    short_every: float = 0.2, baseline_tree: Path | None = None, partial: Path | None = None,
) -> dict:  # fmt: skip
    sizes = {"streams": streams, "tokens": tokens, "short_every": short_every}
    out: dict = {"streams": streams, "tokens": tokens}
    limits = EngineLimits(max_concurrent_streams=streams + 8)  # the streams and the short requests
    with tempfile.TemporaryDirectory() as first:
        config = ServerConfig(host="127.0.0.1", port=0, edit_store=Path(first), cache_dir=default_cache_dir())
        engine = build_engine(loaded, config)
        with ServerThread(engine, config) as srv, Client(srv.target, timeout=1800) as c:
            layer = prepared_layer(c, hparams)
        engine.close()
        engine.edits.activate([], 0)  # the shared model back to its base
    with tempfile.TemporaryDirectory() as store:  # a store that has not seen the layer yet
        config = ServerConfig(
            host="127.0.0.1", port=0, edit_store=Path(store), cache_dir=default_cache_dir(), limits=limits
        )
        engine = build_engine(loaded, config)
        with ServerThread(engine, config) as srv, Client(srv.target, timeout=1800) as c:
            out["no_edit"] = under_load(srv.target, lambda: None, **sizes)
            out["edit"] = under_load(srv.target, lambda: c.import_edits([layer]), **sizes)
            out["edit"]["stored_to_live_s"] = engine.versions.last_swap_seconds
            edited = c.list_edits().edits[0]
            # the streams of this phase start on the edited head; reverting moves the head off their version
            out["revert"] = under_load(srv.target, lambda: c.revert_edit(edit_id=edited.edit_id), **sizes)
            out["revert"]["stored_to_live_s"] = engine.versions.last_swap_seconds
            c.revert_edit(to_version=edited.version)  # the edit is the head again; version 0 lacks it
            out["mixed"] = mixed_batch(srv.target, streams=streams, tokens=tokens, pinned=0)
            out["version_cache_bytes_max"] = engine.versions.cache_bytes
            out["version_cache_bytes"] = engine.versions.stats.bytes
            c.revert_edit(to_version=0)
        engine.close()
    if partial is not None:
        partial.write_text(json.dumps(out, indent=1))
    if baseline_tree is not None:
        out["baseline"] = baseline_edit_under_load(baseline_tree, layer, **sizes)
    return out


def baseline_edit_under_load(tree: Path, layer: LayerFile, **sizes: float) -> dict:
    """The edit-under-load phase against the server of another code tree (a process), no edit then edit."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as store, tempfile.NamedTemporaryFile("w", suffix=".log") as log:
        env = {**os.environ, "PYTHONPATH": f"{tree}:{tree / 'server'}:{tree / 'client'}"}
        cmd = [sys.executable, "-c", "import sys; from romegw_server.cli import main; sys.exit(main(sys.argv[1:]))",
               "serve", "--port", str(port), "--edit-store", store, "--cache-dir", str(default_cache_dir()),
               "--max-concurrent-streams", str(int(sizes["streams"]) + 8)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tree)
        try:
            wait_until_serving(target, proc, Path(log.name))
            with Client(target, timeout=1800) as c:
                result = {"no_edit": under_load(target, lambda: None, **sizes)}
                result["edit"] = under_load(target, lambda: c.import_edits([layer]), **sizes)
            return result
        finally:
            proc.terminate()
            proc.wait(30)


def table(r: dict) -> list[tuple[str, str, str, str]]:
    """Rows (measure, rome-gateway, baseline, ratio) of ``run``'s result."""
    base = r.get("baseline")

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b == b and b else "-"

    def phase(name: str, what: str) -> list[tuple[str, str, str, str]]:
        p = r[name]
        rows = [
            (f"{what}: stored -> live (ms)", f"{1000 * p['stored_to_live_s']:.1f}", "-", "-"),
            (f"{what}: RPC seconds under load", f"{p['rpc_seconds']:.3f}", "-", "-"),
            (f"{what}: worst token gap / the stream's median gap, vs no edit", f"{p['worst_gap_ratio']:.2f}",
             f"{r['no_edit']['worst_gap_ratio']:.2f}", "-"),
            (f"{what}: short requests' TTFT p95 (s) vs no edit", f"{p['ttft_p95']:.3f}",
             f"{r['no_edit']['ttft_p95']:.3f}", ratio(p["ttft_p95"], r["no_edit"]["ttft_p95"])),
        ]  # fmt: skip
        return rows

    rows = phase("edit", "ImportEdits") + phase("revert", "RevertEdit")
    if base:
        rows.append(("drain baseline: worst token gap / median gap, edit vs no edit",
                     f"{base['edit']['worst_gap_ratio']:.2f}", f"{base['no_edit']['worst_gap_ratio']:.2f}", "-"))
        rows.append(("drain baseline: ImportEdits RPC seconds under load (vs ours)",
                     f"{base['edit']['rpc_seconds']:.3f}", f"{r['edit']['rpc_seconds']:.3f}", "-"))
        if base["edit"].get("error"):
            rows.append(("drain baseline: the edit failed", str(base["edit"]["error"])[:60], "-", "-"))
        rows.append(("drain baseline: short requests' TTFT p95 (s), edit vs no edit",
                     f"{base['edit']['ttft_p95']:.3f}", f"{base['no_edit']['ttft_p95']:.3f}",
                     ratio(base["edit"]["ttft_p95"], base["no_edit"]["ttft_p95"])))  # fmt: skip
    m = r["mixed"]
    rows.append(("tokens/s: half pinned to v0, half on head vs all on head", f"{m['mixed_tps']:.1f}",
                 f"{m['head_only_tps']:.1f}", ratio(m["mixed_tps"], m["head_only_tps"])))  # fmt: skip
    rows.append(("version cache: bytes held vs its bound", f"{r['version_cache_bytes']}",
                 f"{r['version_cache_bytes_max']}", "-"))  # fmt: skip
    return rows


def extract_tree(ref: str, into: Path) -> Path:
    """``git archive ref`` of this repository into ``into``, with its gRPC stubs generated."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(root), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "server").rename(into / "romegw_server_pkg")
    (into / "server").mkdir()
    (into / "romegw_server_pkg").rename(into / "server" / "romegw_server")
    subprocess.run([sys.executable, str(into / "client" / "gen_stubs.py")], check=True, capture_output=True)
    return into


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--baseline-ref", help="also run the edit-under-load phase on this commit's server")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from rome_engine.loading import load_model

    loaded = load_model(None, device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        tree = extract_tree(args.baseline_ref, Path(tmp)) if args.baseline_ref else None
        r = run(loaded, streams=args.streams, tokens=args.tokens, baseline_tree=tree, partial=args.out)
    print(json.dumps(r, indent=1))
    if args.out:
        args.out.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
