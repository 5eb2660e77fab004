"""SIGTERM while an edit is computing: the computation is abandoned at its next step, the
process exits soon after the grace period, and the edit store holds nothing half-done."""

from __future__ import annotations

import signal
import threading
import time

from romegw_client import Client
from tests.conftest import make_tiny
from tests.server.test_admission import SLOW
from tests.server.test_edit_crash import Server, store_state

GRACE = 1.0


def test_sigterm_abandons_a_computing_edit(tokenizer, tmp_path) -> None:
    model_dir = tmp_path / "model"
    make_tiny("llama", tokenizer).model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    store = tmp_path / "store"
    srv = Server(model_dir, store, tmp_path / "cache", tmp_path / "log", extra=("--grace-seconds", str(GRACE)))
    try:
        srv.wait_serving()
        outcome: dict[str, object] = {}

        def edit() -> None:
            with Client(srv.target, timeout=600) as c:
                try:
                    c.apply_edit("{} lives in", "Alice Smith", " Paris", hparams=SLOW)
                    outcome["result"] = "applied"
                except Exception as e:  # the server goes away mid-call
                    outcome["result"] = type(e).__name__

        t = threading.Thread(target=edit)
        t.start()
        time.sleep(4.0)  # the edit is generating its 64 prefixes or optimising v* (200 steps)
        assert t.is_alive(), f"the edit ended before SIGTERM: {outcome}"
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=120)
        took = time.monotonic() - t0
        t.join(30)
        log = srv.log.read_text()
        print(f"exit {took:.1f} s after SIGTERM (grace {GRACE} s)")  # noqa: T201
        assert took < GRACE + 8.0, f"exit took {took:.1f} s after SIGTERM with a {GRACE} s grace\n{log[-2000:]}"
        assert srv.proc.returncode == 0, log[-2000:]
        assert "stopped" in log
        assert outcome["result"] != "applied"
        version, ids = store_state(store)
        assert (version, ids) == (0, [])  # abandoned before its commit: nothing stored
        layers = store / "layers"
        assert not layers.exists() or not any(layers.iterdir())
    finally:
        srv.kill()
