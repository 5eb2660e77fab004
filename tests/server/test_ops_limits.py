"""Bounds on stored, echoed and logged strings (issue #10, part C): an over-long author,
comment or edit text is refused before any computation; ListEdits pages by bytes; a
history stored before the limits existed stays readable; no log line carries a
megabyte-sized request string."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rome_engine.delta import LowRankFactor
from rome_engine.edit_store import EditStore
from rome_engine.editing import EditManager
from rome_engine.engine import Engine, EngineLimits
from romegw_client import Client, InvalidArgument
from romegw_client.pb import gateway_pb2 as pb
from romegw_server.main import ServerConfig, ServerThread
from tests.rome_engine.test_edit_store import method_result, random_layer

MB = 1_000_000


def write_history(loaded, root: Path, headers: list[dict[str, str]]) -> list[str]:
    """Edit layers written straight into a store (as an older server would have), all active."""
    manager = EditManager(loaded, EditStore(root, loaded.model_id), compute=lambda *_: None)
    manager.restore()
    ids = []
    for i, extra in enumerate(headers):
        layer = random_layer(loaded, manager.weights, i % 2, seed=i, version=i + 1)
        layer = replace(layer, header=replace(layer.header, **extra))
        entry = manager.store_layer(layer)
        manager.activate(entry.active, entry.version)
        ids.append(layer.edit_id)
    manager.activate([], 0)  # the shared model as it was; the server re-applies the stack
    return ids


def test_overlong_author_comment_or_edit_text_is_refused_before_compute(tiny_llama, tmp_path) -> None:
    computed = []

    def compute(_loaded, requests, method, prior_keys, progress=None):  # stands in for ROME: must never run
        computed.append(requests)
        raise RuntimeError("the edit was computed before its strings were checked")

    manager = EditManager(tiny_llama, EditStore(tmp_path, tiny_llama.model_id), compute)
    manager.restore()
    engine = Engine(tiny_llama, EngineLimits(), manager)
    with ServerThread(engine, ServerConfig(host="127.0.0.1", port=0)) as srv, Client(srv.target, timeout=30) as c:
        cases = [
            ({"comment": "c" * (12 * MB)}, "comment has 12000000 characters, over the limit of 4096"),
            ({"author": "a" * 257}, "author has 257 characters, over the limit of 256"),
            ({"comment": "c" * 4097, "dry_run": True}, "over the limit of 4096"),
        ]
        for options, message in cases:
            t0 = time.monotonic()
            with pytest.raises(InvalidArgument, match=message):
                c.apply_edit("{} lives in", "Alice Smith", " Paris", **options)
            assert time.monotonic() - t0 < 5  # answered at once (generous on a loaded machine)
        with pytest.raises(InvalidArgument, match="edit subject has 10000000 characters"):
            c.apply_edit("{} lives in", "s" * (10 * MB), " Paris")
        with pytest.raises(InvalidArgument, match="comment has 12000000 characters"):
            c.revert_edit(to_version=0, comment="c" * (12 * MB))
        with pytest.raises(InvalidArgument, match="author has 300 characters"):
            c.revert_edit(to_version=0, author="a" * 300)
        page = c.list_edits(include_inactive=True)
        assert page.edits == () and page.head_version == 0
    engine.close()
    assert computed == []
    assert EditStore(tmp_path, tiny_llama.model_id).manifest.entries == []  # nothing stored


def test_list_edits_pages_by_encoded_size(tiny_llama, serve, tmp_path) -> None:
    # 12 edits with large but legal strings: ~80 KB in one reply, over a 64 KiB message limit
    headers = [{"author": "a" * 256, "comment": f"{i:04d}" + "c" * 3000} for i in range(12)]
    ids = write_history(tiny_llama, tmp_path / "store", headers)
    srv = serve(tiny_llama, edits=True, edit_store=tmp_path / "store", max_message_bytes=64 * 1024)
    budget = 64 * 1024 // 4
    with Client(srv.target, timeout=30) as c:
        listed, token, pages = [], "", 0
        while True:
            reply = c.stub.ListEdits(pb.ListEditsRequest(page_size=50, page_token=token, include_inactive=True))
            assert 0 < len(reply.edits) < 12
            assert reply.ByteSize() <= budget + 64
            listed += [e.edit_id for e in reply.edits]
            pages += 1
            token = reply.next_page_token
            if not token:
                break
        assert pages >= 4
        assert sorted(listed) == sorted(ids) and len(set(listed)) == 12  # every edit once, none skipped
        page = c.list_edits(page_size=2)  # the count limit still applies
        assert len(page.edits) == 2 and page.next_page_token


def test_history_stored_with_an_oversized_comment_stays_readable(tiny_llama, serve, tmp_path) -> None:
    # an older server stored a 12 MB comment: its reply (comment + header_json) is over 16 MiB
    (legacy,) = write_history(tiny_llama, tmp_path / "store", [{"comment": "x" * (12 * MB), "author": "y" * 5000}])
    srv = serve(tiny_llama, edits=True, edit_store=tmp_path / "store")
    with Client(srv.target, timeout=60) as c:
        (e,) = c.list_edits(include_inactive=True).edits
        assert e.edit_id == legacy
        assert e.comment.startswith("xxxx") and len(e.comment) < 4200 and "more chars" in e.comment
        assert len(e.author) < 400
        assert json.loads(c.stub.GetEdit(pb.GetEditRequest(edit_id=legacy)).header_json)["comment"] == e.comment
        assert c.revert_edit(to_version=0).head_version == 0
        assert len(c.list_edits(include_inactive=True).edits) == 1  # still listable after a revert


def test_no_log_line_carries_a_huge_request_string(tiny_llama, serve, tmp_path, caplog) -> None:
    write_history(tiny_llama, tmp_path / "store", [{}])
    srv = serve(tiny_llama, edits=True, edit_store=tmp_path / "store")
    huge = "s" * (10 * MB)
    with caplog.at_level(logging.DEBUG), Client(srv.target, timeout=60) as c:
        with pytest.raises(InvalidArgument, match="characters, over the limit"):  # refused before it is read
            c.trace_result("The Eiffel Tower is in", huge, samples=1)
        # the engine's message quotes a (legal) subject and the prompt: logged and returned clipped
        with pytest.raises(InvalidArgument, match="chars cut.*include the subject verbatim") as err:
            c.apply_edit("The Eiffel Tower is in" + " and" * 500, "s" * 2000, " Paris")
        assert len(str(err.value)) < 1500
        with pytest.raises(InvalidArgument):
            c.apply_edit("{} lives in", huge, " Paris", author="a" * MB, comment="c" * MB)
        # the longest legal author and comment reach the audit line, clipped
        c.revert_edit(to_version=0, author="a" * 256, comment="c" * 4096)
    lines = [r.getMessage() for r in caplog.records]
    assert any(r.name == "romegw.audit" and "what=RevertEdit" in r.getMessage() for r in caplog.records)
    assert any("include the subject verbatim" in line for line in lines)
    assert max(len(line) for line in lines) < 2000, max(lines, key=len)[:300]


def fake_compute(loaded, requests, method, prior_keys, progress=None):
    """A random rank-one edit of layer 0 in place of ROME (fast); the header is built as for a real one."""
    name = loaded.spec.mlp_out_weight_name(0)
    out_dim, in_dim = loaded.spec.as_out_in(dict(loaded.model.named_parameters())[name]).shape
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(out_dim, generator=g) * 1e-3, torch.randn(in_dim, generator=g) * 1e-3
    return method_result(LowRankFactor.rank_one(name, u, v), requests)


def test_an_edit_with_the_longest_legal_strings_logs_short_lines(tiny_llama, tmp_path, caplog) -> None:
    manager = EditManager(tiny_llama, EditStore(tmp_path, tiny_llama.model_id), fake_compute)
    manager.restore()
    engine = Engine(tiny_llama, EngineLimits(), manager)
    subject = " ".join(["Alice"] * 60)  # 359 characters, 60 tokens: within max_edit_subject_tokens
    try:
        with ServerThread(engine) as srv, Client(srv.target, timeout=60) as c, caplog.at_level(logging.DEBUG):
            r = c.apply_edit("{} lives in", subject, " Paris", author="a" * 256, comment="c" * 4096)
            assert r.head_version == 1 and r.edit.comment == "c" * 4096  # legal strings are stored whole
            assert c.get_edit(r.edit.edit_id).subject == subject
    finally:
        engine.close()
        manager.activate([], 0)  # the shared model as it was
    lines = [r.getMessage() for r in caplog.records]
    assert any("what=ApplyEdit" in line for line in lines) and any("applied" in line for line in lines)
    assert max(len(line) for line in lines) < 2000, max(lines, key=len)[:300]


@pytest.mark.parametrize("token", ["-3", " 1", "1_0", "9" * 13, "+1"])
def test_a_page_token_is_one_the_server_gave_out(tiny_llama, serve, token) -> None:
    srv = serve(tiny_llama, edits=True)
    with Client(srv.target, timeout=60) as c, pytest.raises(InvalidArgument, match="page_token"):
        c.list_edits(page_token=token)
