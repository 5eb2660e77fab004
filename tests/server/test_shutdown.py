"""Graceful shutdown on SIGTERM: health goes NOT_SERVING, in-flight streams finish within
the grace period, the process exits 0 and the edit store is left consistent."""

from __future__ import annotations

import json
import signal
import threading

from romegw_client import Client, Completion
from tests.conftest import make_tiny
from tests.server.test_edit_crash import FAST, Server


def test_sigterm_drains_streams(tokenizer, tmp_path) -> None:  # noqa: ANN001
    model_dir = tmp_path / "model"
    tiny = make_tiny("llama", tokenizer)
    tiny.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    store = tmp_path / "store"
    srv = Server(model_dir, store, tmp_path / "cache", tmp_path / "log")
    srv.wait_serving()
    with Client(srv.target, timeout=900) as c:
        c.apply_edit("{} lives in", "Alice Smith", " Paris", hparams=FAST)
    results: dict[str, object] = {}

    started = threading.Event()

    def long_stream() -> None:
        with Client(srv.target, timeout=600) as c:
            chunks = []
            for chunk in c.generate("Once upon a time", max_new_tokens=1000):
                chunks.append(chunk)
                started.set()
            results["out"] = Completion.join(chunks)

    t = threading.Thread(target=long_stream)
    t.start()
    assert started.wait(60)
    srv.proc.send_signal(signal.SIGTERM)  # the stream is running
    t.join(timeout=600)
    out = results["out"]
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
