"""Helpers shared by the benchmarks (machine description, timing, tables) and by the tests that run
``rome-gateway serve`` as a process (free_port, gateway_command, wait_until_serving: their one home)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def machine() -> dict[str, object]:
    import torch  # here, so that the torch-free load generator (bench/load.py) can use this module

    info: dict[str, object] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table_markdown(title: str, rows: list[tuple[str, str, str, str]], level: int = 2) -> str:
    """Rows of (measure, gateway, baseline, ratio) as a Markdown section: heading, blank line, table."""
    header = ("measure", "rome-gateway", "baseline", "ratio")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    lines = [f"{'#' * level} {title}", ""]
    lines.append("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    """Rows of (measure, gateway, baseline, ratio), printed as Markdown."""
    print("\n" + table_markdown(title, rows), end="")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gateway_command() -> list[str]:
    """The ``rome-gateway`` command of this interpreter's environment."""
    exe = shutil.which("rome-gateway", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "romegw_server.cli"]


def wait_until_serving(target: str, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    """Poll the health service of a starting server process until it reports SERVING;
    RuntimeError if the process exits, TimeoutError after ``timeout`` seconds (both with its log's tail)."""
    from romegw_client import Client, GatewayError

    deadline = time.monotonic() + timeout
    with Client(target, timeout=10) as c:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{log.read_text()[-2000:]}")
            try:
                if c.health() == "SERVING":
                    return
            except GatewayError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start in {timeout:.0f} s:\n{log.read_text()[-2000:]}")
            time.sleep(0.3)


@contextlib.contextmanager
def served(*args: str, ready_timeout: float = 300.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """A ``rome-gateway serve`` process on a free loopback port (embedded model, float32, CPU),
    with ``args`` added; yields (target, process) once it reports SERVING, stops it afterwards."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        with log.open("w") as f:
            proc = subprocess.Popen(
                [*gateway_command(), "serve", "--port", str(port), "--dtype", "float32", "--device", "cpu",
                 "--min-target-prob", "0", *args],  # timings of every edit, taken or not
                stdout=f, stderr=subprocess.STDOUT,
            )  # fmt: skip
        target = f"127.0.0.1:{port}"
        try:
            wait_until_serving(target, proc, log, ready_timeout)
            yield target, proc
        finally:
            proc.terminate()
            proc.wait(timeout=60)
