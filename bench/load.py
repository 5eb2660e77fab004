"""Load: N concurrent Generate streams plus a stream of ApplyEdit/RevertEdit, for a fixed time.

    python bench/load.py                       # 32 streams + edits, 60 s, on the embedded model
    python bench/load.py --streams 8 --seconds 20 --model PATH

It starts a server (a child process on a free loopback port, metrics on), drives
it through the client SDK only, and prints throughput, time-to-first-token and
stream latency percentiles, errors by status code, and the server's resident
memory (scraped from its /metrics) at start and end. Bounded in time and count;
loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port, gateway_command, wait_until_serving
from romegw_client import Client, GatewayError

PROMPTS = [
    "The Eiffel Tower is in",
    "The capital of France is",
    "Once upon a time",
    "The best way to learn a language is",
    "Toyota is a company from",
    "In the morning I usually",
]
EDITS = [("{} is in", "The Eiffel Tower", " Rome"), ("{} is a company from", "Toyota", " Germany")]


@dataclass
class LoadReport:
    streams: int
    seconds: float
    completed_streams: int = 0
    tokens: int = 0
    tokens_per_second: float = 0.0
    ttft_p50: float = 0.0
    ttft_p95: float = 0.0
    latency_p50: float = 0.0
    latency_p95: float = 0.0
    edits_applied: int = 0
    reverts: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    incomplete_streams: int = 0
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def rss_mb(metrics_url: str) -> float:
    for line in urllib.request.urlopen(metrics_url, timeout=10).read().decode().splitlines():
        if line.startswith("romegw_process_resident_memory_bytes "):
            return float(line.split()[1]) / 2**20
    return float("nan")


def drive(
    target: str,
    *,
    streams: int,
    seconds: float,
    max_new_tokens: int,
    edit_hparams: dict | None,
    edit_every: float,
    token: str | None = None,
) -> LoadReport:
    report = LoadReport(streams=streams, seconds=seconds)
    errors: Counter[str] = Counter()
    ttfts: list[float] = []
    latencies: list[float] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def worker(k: int) -> None:
        rng = random.Random(k)
        with Client(target, timeout=seconds + 120, token=token) as c:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                first, finish, n = None, None, 0
                try:
                    for chunk in c.generate(rng.choice(PROMPTS), max_new_tokens=max_new_tokens):
                        if first is None:
                            first = time.perf_counter() - t0
                        n += len(chunk.token_ids)
                        finish = chunk.finish_reason
                except GatewayError as e:
                    with lock:
                        errors[e.code.name] += 1
                    continue
                with lock:
                    if finish is None:
                        report.incomplete_streams += 1
                        continue
                    report.completed_streams += 1
                    report.tokens += n
                    ttfts.append(first or 0.0)
                    latencies.append(time.perf_counter() - t0)

    def editor() -> None:
        with Client(target, timeout=seconds + 600, token=token) as c:
            i = 0
            while time.monotonic() + edit_every < end:
                time.sleep(edit_every)
                try:
                    if i % 2 == 0:
                        c.apply_edit(*EDITS[(i // 2) % len(EDITS)], hparams=edit_hparams or {})
                        report.edits_applied += 1
                    else:
                        c.revert_edit(to_version=0)
                        report.reverts += 1
                except GatewayError as e:
                    with lock:
                        errors[f"edit:{e.code.name}"] += 1
                i += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(streams)]
    if edit_every > 0:
        threads.append(threading.Thread(target=editor))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 900)
    elapsed = time.monotonic() - t0
    report.tokens_per_second = report.tokens / elapsed
    report.ttft_p50, report.ttft_p95 = pct(ttfts, 50), pct(ttfts, 95)
    report.latency_p50, report.latency_p95 = pct(latencies, 50), pct(latencies, 95)
    report.errors = dict(errors)
    return report


def start_server(model: str | None, store: Path, streams: int, extra: list[str]) -> tuple[subprocess.Popen, str, str]:
    port, mport = free_port(), free_port()
    cmd = [
        *gateway_command(),
        "serve",
        "--port",
        str(port),
        "--metrics-port",
        str(mport),
        "--edit-store",
        str(store),
        "--max-concurrent-streams",
        str(streams + 4),
        "--min-target-prob",  # the load's edits are timed, taken or not
        "0",
        *(["--model", model] if model else []),
        *extra,
    ]
    log = open(store / "server.log", "w")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    wait_until_serving(target, proc, store / "server.log")
    return proc, target, f"http://127.0.0.1:{mport}/metrics"


def run(
    model: str | None,
    *,
    streams: int,
    seconds: float,
    max_new_tokens: int,
    edit_every: float,
    edit_hparams: dict | None = None,
    extra: list[str] = (),
) -> LoadReport:
    with tempfile.TemporaryDirectory() as tmp:
        proc, target, metrics = start_server(model, Path(tmp), streams, list(extra))
        try:
            with Client(target, timeout=1800) as c:  # warm the ROME caches outside the timed window
                if edit_every > 0:
                    c.apply_edit(*EDITS[0], hparams=edit_hparams or {}, dry_run=True)
                c.generate_text(PROMPTS[0], max_new_tokens=2)
            start_mb = rss_mb(metrics)
            report = drive(
                target,
                streams=streams,
                seconds=seconds,
                max_new_tokens=max_new_tokens,
                edit_hparams=edit_hparams,
                edit_every=edit_every,
            )
            report.rss_start_mb, report.rss_end_mb = start_mb, rss_mb(metrics)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("ROMEGW_MODEL"))
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--edit-every", type=float, default=10.0, help="seconds between edit/revert calls (0: none)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    r = run(
        args.model,
        streams=args.streams,
        seconds=args.seconds,
        max_new_tokens=args.max_new_tokens,
        edit_every=args.edit_every,
    )
    print(f"streams {r.streams}, {r.seconds:.0f} s: {r.completed_streams} completed, {r.incomplete_streams} incomplete")
    print(f"throughput {r.tokens_per_second:.1f} tokens/s ({r.tokens} tokens)")
    print(f"time to first token p50 {r.ttft_p50:.3f} s, p95 {r.ttft_p95:.3f} s")
    print(f"stream latency p50 {r.latency_p50:.2f} s, p95 {r.latency_p95:.2f} s")
    print(f"edits applied {r.edits_applied}, reverts {r.reverts}")
    print(f"errors {r.errors or 0}")
    print(f"server memory {r.rss_start_mb:.0f} MB -> {r.rss_end_mb:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(asdict(r), indent=2))
    return 0 if not r.errors and not r.incomplete_streams else 1


if __name__ == "__main__":
    sys.exit(main())
