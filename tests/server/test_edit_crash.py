"""Crash safety: the server dies during ApplyEdit, at chosen disk writes and at random
moments (SIGKILL); after each restart the edit is wholly there or wholly absent and
nothing earlier is lost. Also: a full disk while writing a layer loses nothing."""

from __future__ import annotations

import errno
import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.common import free_port, wait_until_serving
from romegw_client import Client, GatewayError, ResourceExhausted
from tests.conftest import make_tiny

HERE = Path(__file__).resolve().parent
FAST = {"v_num_grad_steps": 3, "mom2_n_tokens": 2000, "ctx_n_short": 1, "ctx_n_long": 1}
FACTS = [("{} lives in", f"Person {i}", f" City{i}") for i in range(40)]


class Server:
    """``rome-gateway serve`` as a process (``crashing_server.py``: dies at write ``crash``, if set),
    with ``extra`` arguments added."""

    def __init__(
        self, model_dir: Path, store: Path, cache: Path, log: Path, crash: tuple[int, str] = (0, ""),
        extra: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        args = ["serve", "--model", str(model_dir), "--edit-store", str(store), "--cache-dir", str(cache),
                "--port", str(self.port), "--device", "cpu", "--min-target-prob", "0", *extra]  # FAST edits barely move
        cmd = [sys.executable, str(HERE / "crashing_server.py"), str(crash[0]), crash[1] or "none", "--", *args]
        self.log = log
        with log.open("a") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=HERE.parents[1])

    def wait_serving(self, timeout: float = 120) -> None:
        wait_until_serving(self.target, self.proc, self.log, timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def store_state(store: Path) -> tuple[int, list[str]]:
    doc = json.loads((store / "manifest.json").read_text()) if (store / "manifest.json").exists() else {"entries": []}
    entries = doc["entries"]
    return (entries[-1]["version"] if entries else 0), [e["edit_id"] for e in entries if e["op"] == "apply"]


def check_consistent(c: Client, store: Path, before_ids: list[str]) -> list[str]:
    """The store after a restart: every earlier edit is there; a new one is complete; no stray files."""
    version, ids = store_state(store)
    assert ids[: len(before_ids)] == before_ids, "an earlier edit was lost"
    assert len(ids) - len(before_ids) in (0, 1)
    listed = [e.edit_id for e in c.list_edits(include_inactive=True).edits][::-1]
    assert listed == ids
    for edit_id in ids:
        assert c.get_edit(edit_id).header["edit_id"] == edit_id  # readable, checksum verified
    on_disk = sorted(p.stem for p in (store / "layers").iterdir())
    assert on_disk == sorted(ids), "a partial or orphaned layer file was left"
    assert c.model_info().head_version == version
    return ids


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny = make_tiny("llama", tokenizer)
    tiny.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_sigkill_during_apply_edit(model_dir, tmp_path) -> None:
    store, cache, log = tmp_path / "store", tmp_path / "cache", tmp_path / "server.log"
    rng = random.Random(1234)
    facts = iter(FACTS)
    # crashes at the exact writes (the layer file, then the manifest), then random SIGKILLs
    plans: list[tuple[int, str] | float] = [
        (1, "partial"), (1, "before-rename"), (1, "after-rename"),
        (2, "partial"), (2, "before-rename"), (2, "after-rename"),
    ] + [rng.uniform(0.0, 1.0) for _ in range(5)]
    ids: list[str] = []
    apply_seconds = 1.0
    previous: tuple[int, str] | float | None = None
    for plan in [*plans, None]:
        # each start first checks what the previous crash left, then serves the next attempt
        srv = Server(model_dir, store, cache, log, crash=plan if isinstance(plan, tuple) else (0, ""))
        srv.wait_serving()
        with Client(srv.target, timeout=60) as c:
            new_ids = check_consistent(c, store, ids)
            if isinstance(previous, tuple) and previous[0] == 1:
                assert new_ids == ids, "a crash while writing the layer file must leave the edit absent"
            if previous == (2, "after-rename"):
                assert len(new_ids) == len(ids) + 1, "a renamed manifest holds the edit"
            ids = new_ids
            assert c.generate_text("Hello", max_new_tokens=3).completion_tokens >= 1
        if plan is None:
            srv.kill()
            break
        prompt, subject, target = next(facts)
        errors: list[BaseException] = []

        def apply(target_addr: str = srv.target, fact: tuple = (prompt, subject, target), errs: list = errors) -> None:
            try:
                with Client(target_addr, timeout=600) as c:
                    c.apply_edit(*fact, hparams=FAST)
            except GatewayError as e:
                errs.append(e)

        t0 = time.monotonic()
        worker = threading.Thread(target=apply)
        worker.start()
        if isinstance(plan, float):
            time.sleep(plan * apply_seconds * 1.2)
            srv.kill()
        worker.join(timeout=600)
        if srv.proc.poll() is None:  # the edit finished before the kill
            apply_seconds = max(apply_seconds, time.monotonic() - t0)
        srv.kill()
        previous = plan
    assert len(ids) >= 2


def test_full_disk_while_writing_a_layer_loses_nothing(tiny_llama, serve, monkeypatch) -> None:
    from rome_engine import edit_store

    srv = serve(tiny_llama, edits=True)
    store = srv.engine.edits.store.root
    with Client(srv.target, timeout=600) as c:
        first = c.apply_edit(*FACTS[0], hparams=FAST).edit
        text_v1 = c.generate_text("Hello", max_new_tokens=5)
        real = edit_store.atomic_write

        def full_disk(path: Path, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(edit_store, "atomic_write", full_disk)
        with pytest.raises(ResourceExhausted, match="disk is full"):
            c.apply_edit(*FACTS[1], hparams=FAST)
        monkeypatch.setattr(edit_store, "atomic_write", real)
        info = c.model_info()
        assert (info.head_version, info.active_layers) == (1, 1)
        assert c.generate_text("Hello", max_new_tokens=5) == text_v1
        assert [e.edit_id for e in c.list_edits().edits] == [first.edit_id]
        assert sorted(p.stem for p in (store / "layers").iterdir()) == [first.edit_id]
        second = c.apply_edit(*FACTS[1], hparams=FAST)
        assert second.head_version == 2


def test_deadline_expiring_during_an_edit(tiny_llama, serve) -> None:
    """The caller of ApplyEdit gives up mid-way: the server keeps serving, and the edit is either
    wholly live and stored or wholly absent (never stored but not live)."""
    from romegw_client import DeadlineExceeded
    from tests.conftest import wait_until

    srv = serve(tiny_llama, edits=True)
    with Client(srv.target, timeout=600) as c:
        with pytest.raises(DeadlineExceeded):
            c.apply_edit(*FACTS[2], hparams=FAST, timeout=0.3)
        # the computation may still finish on the server; wait for the edit lock to be free
        assert wait_until(lambda: srv.engine._queued_edits == 0, timeout=300)
        info = c.model_info()
        stored = c.list_edits(include_inactive=True).edits
        assert info.head_version == len(stored) and info.active_layers == len(stored)
        assert c.generate_text("Hello", max_new_tokens=3).edit_version == info.head_version
        r = c.apply_edit(*FACTS[3], hparams=FAST)
        assert r.head_version == info.head_version + 1
