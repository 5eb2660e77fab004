"""Graceful shutdown on SIGTERM: health goes NOT_SERVING, in-flight streams finish within
the grace period, the process exits 0 and the edit store is left consistent."""

from __future__ import annotations

import asyncio
import json
import signal
import time

from romegw_client import Client
from tests.conftest import BackgroundStream, make_tiny, wait_until
from tests.server.test_edit_crash import FAST, Server


def test_sigterm_drains_streams(tokenizer, tmp_path) -> None:
    model_dir = tmp_path / "model"
    tiny = make_tiny("llama", tokenizer)
    tiny.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    store = tmp_path / "store"
    srv = Server(model_dir, store, tmp_path / "cache", tmp_path / "log")
    srv.wait_serving()
    with Client(srv.target, timeout=900) as c:
        c.apply_edit("{} lives in", "Alice Smith", " Paris", hparams=FAST)
    stream = BackgroundStream(srv.target, "Once upon a time", max_new_tokens=1000).start()
    srv.proc.send_signal(signal.SIGTERM)  # the stream is running
    out = stream.join(600)
    assert out.finish_reason in ("length", "eos")  # finished, not cut off
    assert out.edit_version == 1
    srv.proc.wait(timeout=60)
    assert srv.proc.returncode == 0
    log = srv.log.read_text()
    assert "shutting down: health NOT_SERVING" in log and "stopped" in log
    manifest = json.loads((store / "manifest.json").read_text())
    assert [e["version"] for e in manifest["entries"]] == [1]
    srv2 = Server(model_dir, store, tmp_path / "cache", tmp_path / "log")
    srv2.wait_serving()
    with Client(srv2.target) as c:
        assert c.model_info().head_version == 1
    srv2.kill()


def test_prestop_keeps_serving_not_serving_then_exits(tokenizer, tmp_path, monkeypatch) -> None:
    """SIGTERM with a pre-stop period: health answers NOT_SERVING (the port is still open) and
    calls are still served for that period; then the grace period; then the process exits."""
    prestop, grace = 4.0, 1.0
    model_dir = tmp_path / "model"
    make_tiny("llama", tokenizer).model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    monkeypatch.setenv("ROMEGW_PRESTOP_SECONDS", str(prestop))  # the child reads its flags' variables
    monkeypatch.setenv("ROMEGW_GRACE_SECONDS", str(grace))
    srv = Server(model_dir, tmp_path / "store", tmp_path / "cache", tmp_path / "log")
    srv.wait_serving()
    try:
        with Client(srv.target, timeout=5) as c:
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            assert wait_until(lambda: c.health() == "NOT_SERVING", timeout=3)  # not a refused connection
            seen = time.monotonic() - t0
            assert c.model_info().family == "llama"  # new calls are still served
            assert c.generate_text("Hi", max_new_tokens=2).completion_tokens == 2
            time.sleep(max(0.0, prestop - 1.5 - (time.monotonic() - t0)))
            assert c.health() == "NOT_SERVING"  # still answering, late in the pre-stop period
        srv.proc.wait(timeout=prestop + grace + 30)
        elapsed = time.monotonic() - t0
    finally:
        srv.kill()
    assert srv.proc.returncode == 0
    assert seen < 3 and prestop - 0.5 <= elapsed <= prestop + grace + 15, elapsed
    log = srv.log.read_text()
    order = [log.index(s) for s in ("pre-stop: health NOT_SERVING", "shutting down", "stopped")]
    assert order == sorted(order)


def test_a_second_signal_ends_the_prestop_period() -> None:
    from grpc_health.v1 import health

    from romegw_server.main import Running, prestop

    async def run() -> float:
        running = Running(server=None, health=health.aio.HealthServicer(), port=0, metrics=None,  # type: ignore[arg-type]
                          metrics_port=None, metrics_httpd=None)
        hurry = asyncio.Event()
        asyncio.get_running_loop().call_later(0.2, hurry.set)
        t0 = time.monotonic()
        await prestop(running, 60.0, hurry)
        return time.monotonic() - t0

    assert asyncio.run(run()) < 5
