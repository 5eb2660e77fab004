"""Streams running while edits are applied each see one version: their text equals a
single-version run of the version they report (no drain: an edit goes live while they run)."""

from __future__ import annotations

import threading
import time

from romegw_client import Client
from tests.conftest import wait_until

FAST = {"v_num_grad_steps": 5, "mom2_n_tokens": 2000, "ctx_n_short": 1, "ctx_n_long": 1}
SUBJECTS = ["Alice Smith", "Bob Jones", "Carol White"]
PROMPTS = [f"{s} lives in" for s in SUBJECTS]


def test_streams_see_one_version_during_edits(tiny_llama, serve) -> None:
    srv = serve(tiny_llama, edits=True)
    records: list[tuple[str, str, int]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def stream_loop(offset: int) -> None:
        with Client(srv.target, timeout=600) as c:
            i = offset
            while not stop.is_set():
                prompt = PROMPTS[i % len(PROMPTS)]
                out = c.generate_text(prompt, max_new_tokens=12)
                with lock:
                    records.append((prompt, out.text, out.edit_version))
                i += 1

    threads = [threading.Thread(target=stream_loop, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        with Client(srv.target, timeout=300) as c:
            for k, subject in enumerate(SUBJECTS[:2]):
                r = c.apply_edit("{} lives in", subject, f" Paris{k}", hparams=FAST)
                assert r.head_version == k + 1
                # no drain: the running streams finish on the version they started with, the next
                # ones start on the new head
                assert wait_until(lambda v=k + 1: any(rv == v for _, _, rv in list(records)), timeout=120)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=600)

    versions = {v for _, _, v in records}
    assert {0, 2} <= versions, versions
    with Client(srv.target, timeout=600) as c:
        single: dict[tuple[str, int], str] = {}
        for v in sorted(versions):
            c.revert_edit(to_version=v)
            for p in PROMPTS:
                single[(p, v)] = c.generate_text(p, max_new_tokens=12).text
    # the edits changed what the model says (else this test would prove nothing)
    assert any(single[(p, 0)] != single[(p, 2)] for p in PROMPTS)
    mismatched = [(p, v, text) for p, text, v in records if text != single[(p, v)]]
    assert not mismatched, mismatched[:3]
