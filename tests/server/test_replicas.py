"""Replicas sharing one edit history in PostgreSQL: in-process servers, each on its own copy of
the same tiny model, one database schema per test (skipped, saying why, without a server)."""

from __future__ import annotations

import hashlib
import threading

import pytest

from rome_engine.engine import EngineLimits
from romegw_client import Client, FailedPrecondition
from tests.conftest import make_tiny, wait_until
from tests.pg import sql
from tests.server.layer_files import LAYER, encode, layer_file, layer_parts

LIMITS = EngineLimits(max_update_norm_ratio=100.0, max_version_wait=10.0)


def touched_sha(srv) -> str:
    """sha256 of the matrix the test layers touch, as the replica serves it."""
    loaded = srv.engine.edits.loaded
    w = srv.engine.edits.weights.parameter(loaded.spec.mlp_out_weight_name(LAYER))
    return hashlib.sha256(w.detach().contiguous().view(-1).numpy().tobytes()).hexdigest()


def layer_bytes(srv, seed: int) -> bytes:
    header, tensors = layer_parts(srv.engine.edits.loaded, srv.engine.edits.weights, seed=seed, scale=0.3)
    return encode(header, tensors)


@pytest.fixture
def replicas(tokenizer, serve, pg_url):
    """``replicas(n)``: n servers on one history (each its own model copy, the same weights)."""

    def start(n: int) -> list:
        return [serve(make_tiny("llama", tokenizer), LIMITS, edits=True, edit_store=pg_url, metrics_port=0)
                for _ in range(n)]  # fmt: skip

    return start


def head(srv) -> int:
    with Client(srv.target) as c:
        return c.model_info().head_version


def test_an_edit_on_one_replica_is_served_by_all_and_so_is_a_revert(replicas) -> None:
    a, b, c = replicas(3)
    base = touched_sha(a)
    assert touched_sha(b) == touched_sha(c) == base
    with Client(a.target) as ca:
        (info,) = ca.import_edits([layer_file(layer_bytes(a, seed=1))])
    assert info.version == 1
    for srv in (b, c):
        assert wait_until(lambda srv=srv: head(srv) == 1, timeout=10), "a replica did not follow the edit"
    assert touched_sha(a) == touched_sha(b) == touched_sha(c) != base  # bit-identical weights
    with Client(b.target) as cb:
        assert [e.edit_id for e in cb.list_edits().edits] == [info.edit_id]
    with Client(c.target) as cc:
        assert cc.revert_edit(to_version=0, author="ops").head_version == 0
    for srv in (a, b):
        assert wait_until(lambda srv=srv: head(srv) == 0, timeout=10), "a replica did not follow the revert"
    assert touched_sha(a) == touched_sha(b) == touched_sha(c) == base


def test_two_replicas_committing_at_once_never_fork(replicas, pg_url) -> None:
    a, b = replicas(2)
    files = {srv: layer_file(layer_bytes(srv, seed=i + 10)) for i, srv in enumerate((a, b))}
    outcome: dict = {}
    go = threading.Barrier(2)

    def send(srv) -> None:
        with Client(srv.target) as client:
            go.wait()
            try:
                outcome[srv] = client.import_edits([files[srv]])[0].version
            except FailedPrecondition as e:
                outcome[srv] = e

    threads = [threading.Thread(target=send, args=(srv,)) for srv in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    won = [srv for srv, r in outcome.items() if r == 1]
    lost = [srv for srv, r in outcome.items() if isinstance(r, FailedPrecondition)]
    if len(won) == 2:  # pragma: no cover - impossible: both would be version 1
        pytest.fail("both commits succeeded")
    if not lost:  # the second arrived after the first had been followed: a clean version 2
        assert sorted(outcome.values()) == [1, 2]
    else:
        error = str(outcome[lost[0]])
        assert len(won) == 1 and "history moved" in error and "retry" in error
        with Client(lost[0].target) as client:  # the loser serves the winner's version and a retry lands
            assert client.model_info().head_version == 1
            assert client.import_edits([files[lost[0]]])[0].version == 2
    assert [v for (v,) in sql(pg_url, "SELECT version FROM romegw_manifest ORDER BY seq")] == [1, 2]
    for srv in (a, b):
        assert wait_until(lambda srv=srv: head(srv) == 2, timeout=10)
    assert touched_sha(a) == touched_sha(b)


def test_a_replica_started_later_catches_up_before_serving(replicas, tokenizer, serve, pg_url) -> None:
    (a,) = replicas(1)
    with Client(a.target) as ca:
        for i in range(20):
            ca.import_edits([layer_file(layer_bytes(a, seed=100 + i))])
    late = serve(make_tiny("llama", tokenizer), LIMITS, edits=True, edit_store=pg_url)
    assert head(late) == 20  # the history was read and re-applied before the server started
    assert touched_sha(late) == touched_sha(a)


def test_read_your_writes_through_another_replica(replicas) -> None:
    a, b = replicas(2)
    with Client(a.target) as ca:
        (info,) = ca.import_edits([layer_file(layer_bytes(a, seed=30))])
    with Client(b.target) as cb:  # waits (up to max_version_wait) until b has followed version 1
        out = cb.generate_text("The Eiffel Tower is in", max_new_tokens=2, min_edit_version=info.version)
    assert out.edit_version == 1


def test_metrics_show_the_store_up_and_no_lag_once_followed(replicas) -> None:
    from tests.server.test_metrics import scrape, value

    a, b = replicas(2)
    with Client(a.target) as ca:
        ca.import_edits([layer_file(layer_bytes(a, seed=40))])
    assert wait_until(lambda: head(b) == 1, timeout=10)
    values = scrape(b.metrics_url)
    assert value(values, "romegw_edit_store_up") == 1.0
    assert value(values, "romegw_edit_replication_lag_versions") == 0.0
    assert b.engine.edits.store.remote_entries == 1


def test_a_folder_store_migrates_into_postgres_and_serves_the_same_weights(tokenizer, serve, pg_url, tmp_path,
                                                                           capsys) -> None:  # fmt: skip
    from romegw_server.cli import main

    folder = serve(make_tiny("llama", tokenizer), LIMITS, edits=True, edit_store=tmp_path / "store")
    with Client(folder.target) as c:
        for i in range(3):
            c.import_edits([layer_file(layer_bytes(folder, seed=50 + i))])
        c.revert_edit(to_version=2)
    served = touched_sha(folder)
    assert main(["store", "migrate", "--from", str(tmp_path / "store"), "--to", pg_url]) == 0
    assert "4 history entries and 3 layers" in capsys.readouterr().out
    assert main(["store", "migrate", "--from", str(tmp_path / "store"), "--to", pg_url]) == 2  # not empty: refused
    replica = serve(make_tiny("llama", tokenizer), LIMITS, edits=True, edit_store=pg_url)
    assert head(replica) == 2 and touched_sha(replica) == served
    with Client(replica.target) as c:
        assert len(c.list_edits(include_inactive=True).edits) == 3


def test_a_replica_that_loses_the_database_keeps_serving_then_catches_up(tokenizer, serve, pg_url) -> None:
    from romegw_client import Unavailable
    from tests.pg import TcpProxy
    from tests.server.test_metrics import scrape, value

    a = serve(make_tiny("llama", tokenizer), LIMITS, edits=True, edit_store=pg_url)
    proxy = TcpProxy("127.0.0.1", 5432)
    b = serve(make_tiny("llama", tokenizer), LIMITS, edits=True, edit_store=proxy.url(pg_url), metrics_port=0)
    try:
        proxy.cut()
        with Client(b.target) as cb:
            assert cb.generate_text("The Eiffel Tower is in", max_new_tokens=8).text  # serving goes on
            with pytest.raises(Unavailable, match="unreachable"):
                cb.import_edits([layer_file(layer_bytes(b, seed=60))])
        assert wait_until(lambda: value(scrape(b.metrics_url), "romegw_edit_store_up") == 0.0, timeout=15)
        with Client(a.target) as ca:  # the history moves on without b
            ca.import_edits([layer_file(layer_bytes(a, seed=61))])
        assert head(b) == 0
        proxy.restore()
        assert wait_until(lambda: head(b) == 1, timeout=30), "b did not catch up after the database came back"
        assert touched_sha(a) == touched_sha(b)
        assert wait_until(lambda: value(scrape(b.metrics_url), "romegw_edit_store_up") == 1.0, timeout=10)
    finally:
        proxy.cut()


def test_a_replica_that_cannot_verify_a_layer_serves_the_newest_version_it_can(tokenizer, serve, pg_url,
                                                                               caplog) -> None:  # fmt: skip
    from tests.server.test_metrics import scrape, value

    a = serve(make_tiny("llama", tokenizer), LIMITS, edits=True, edit_store=pg_url)
    # the same model id on other weights: a's layers do not fit its base (fingerprint)
    other = serve(make_tiny("llama", tokenizer, seed=1), LIMITS, edits=True, edit_store=pg_url, metrics_port=0)
    with Client(a.target) as ca:
        ca.import_edits([layer_file(layer_bytes(a, seed=70))])
    assert wait_until(lambda: other.engine.edits.store.remote_entries == 1, timeout=10)
    assert wait_until(lambda: any("version 1 cannot be served" in r.getMessage() for r in caplog.records), timeout=10)
    assert head(other) == 0
    assert value(scrape(other.metrics_url), "romegw_edit_replication_lag_versions") == 1.0
    # an edit through it would be committed on top of a layer it never applied: refused, nothing written
    with Client(other.target) as co, pytest.raises(FailedPrecondition, match="history's head is version 1"):
        co.import_edits([layer_file(layer_bytes(other, seed=71))])
    # a start of such a replica serves its fallback alone: nothing is recorded in the shared history
    again = serve(make_tiny("llama", tokenizer, seed=1), LIMITS, edits=True, edit_store=pg_url)
    assert head(again) == 0
    assert [op for (op,) in sql(pg_url, "SELECT entry->>'op' FROM romegw_manifest ORDER BY seq")] == ["import"]


@pytest.fixture(scope="module")
def saved_tiny(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-replicas")
    make_tiny("llama", tokenizer).model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_sigkill_a_replica_process_during_its_commits(saved_tiny, pg_url, tmp_path) -> None:
    """Gateway processes on one history: the one taking edits is killed at random moments (in its
    computation or its commit) and restarted; the other serves throughout, the history stays
    linear and whole, and both end on the same version with the same outputs."""
    import random
    import time

    from romegw_client import GatewayError
    from tests.server.test_edit_crash import FAST, Server

    cache = tmp_path / "cache"
    start = lambda name: Server(saved_tiny, pg_url, cache, tmp_path / f"{name}.log")  # noqa: E731
    writer, reader = start("a"), start("b")
    writer.wait_serving()
    reader.wait_serving()
    rng, seconds = random.Random(7), 2.0
    try:
        for i in range(4):
            def apply(target: str = writer.target, i: int = i) -> None:
                try:
                    with Client(target, timeout=600) as c:
                        c.apply_edit("{} lives in", f"Person {i}", f" City{i}", hparams=FAST)
                except GatewayError:
                    pass  # killed under it

            worker = threading.Thread(target=apply)
            t0 = time.monotonic()
            worker.start()
            time.sleep(rng.uniform(0.2, 1.2) * seconds)
            if writer.proc.poll() is None and worker.is_alive():
                writer.kill()
            else:
                seconds = max(seconds, time.monotonic() - t0)
            worker.join(600)
            writer.kill()
            with Client(reader.target, timeout=30) as c:  # the other replica serves throughout
                assert c.generate_text("Hello", max_new_tokens=2).completion_tokens >= 1
            writer = start(f"a{i}")
            writer.wait_serving()
        (db_head,) = sql(pg_url, "SELECT head_seq FROM romegw_meta")[0]
        seqs = [s for (s,) in sql(pg_url, "SELECT seq FROM romegw_manifest ORDER BY seq")]
        assert seqs == list(range(1, db_head + 1))
        named = {str(r[0]) for r in sql(pg_url, "SELECT entry->>'edit_id' FROM romegw_manifest")}
        assert named == {str(r[0]) for r in sql(pg_url, "SELECT edit_id::text FROM romegw_layers")}
        versions = [v for (v,) in sql(pg_url, "SELECT version FROM romegw_manifest ORDER BY seq")]
        last = versions[-1] if versions else 0
        for srv in (writer, reader):
            assert wait_until(lambda srv=srv: head(srv) == last, timeout=15)
        with Client(writer.target) as ca, Client(reader.target) as cb:
            prompt, conts = "Person 0 lives in", [" City0", " Paris"]
            assert ca.score(prompt, conts).scores == cb.score(prompt, conts).scores  # the same weights
    finally:
        writer.kill()
        reader.kill()


def test_three_gateway_processes_share_edits_and_never_fork(saved_tiny, pg_url, tmp_path) -> None:
    """Three ``rome-gateway serve`` processes on one history: ApplyEdit sent to two of them at the
    same moment gives one linear history (one lands, the other is refused and lands on retry);
    every replica then serves the same version with the same outputs; a revert on the third
    reaches the other two."""
    from tests.server.test_edit_crash import FAST, Server

    cache = tmp_path / "cache"
    servers = [Server(saved_tiny, pg_url, cache, tmp_path / f"{n}.log") for n in "abc"]
    try:
        for s in servers:
            s.wait_serving()
        a, b, c = servers
        go, outcome = threading.Barrier(2), {}

        def apply(srv, i: int) -> None:
            with Client(srv.target, timeout=600) as client:
                go.wait()
                try:
                    outcome[i] = client.apply_edit("{} lives in", f"Person {i}", f" City{i}", hparams=FAST).head_version
                except FailedPrecondition as e:
                    outcome[i] = e

        threads = [threading.Thread(target=apply, args=(srv, i)) for i, srv in enumerate((a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        refused = [i for i, r in outcome.items() if isinstance(r, FailedPrecondition)]
        for i in refused:  # computed on version 0 while the other landed: retried on the new head
            assert "history moved" in str(outcome[i])
            with Client((a, b)[i].target, timeout=600) as client:
                outcome[i] = client.apply_edit("{} lives in", f"Person {i}", f" City{i}", hparams=FAST).head_version
        assert sorted(outcome.values()) == [1, 2]
        assert [v for (v,) in sql(pg_url, "SELECT version FROM romegw_manifest ORDER BY seq")] == [1, 2]
        for srv in servers:
            assert wait_until(lambda srv=srv: head(srv) == 2, timeout=15)
        prompt, conts = "Person 1 lives in", [" City1", " City0", " Paris"]
        scores = []
        for srv in servers:
            with Client(srv.target) as client:
                scores.append(client.score(prompt, conts).scores)
        assert scores[0] == scores[1] == scores[2]  # bit-identical weights give identical scores
        with Client(c.target) as client:
            assert client.revert_edit(to_version=0).head_version == 0
        for srv in (a, b):
            assert wait_until(lambda srv=srv: head(srv) == 0, timeout=15)
    finally:
        for s in servers:
            s.kill()
