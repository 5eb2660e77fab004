"""The PostgreSQL edit store against a real server: schema steps, one linear history
(compare-and-swap), byte-exact layers read by a second replica, and what it refuses."""

from __future__ import annotations

import pytest
import torch

from rome_engine.edit_store import StateChange, encode_layer
from rome_engine.editing import EditManager
from rome_engine.errors import FailedPrecondition, HistoryMoved, Unavailable
from rome_engine.layers import LayerWeights
from rome_engine.pg_store import MIGRATIONS, PostgresEditStore, redacted, split_url
from rome_engine.records import RevertRequest
from tests.pg import sql
from tests.rome_engine.test_edit_store import param_hashes, random_layer


def test_schema_steps_run_once_and_the_schema_belongs_to_one_model(pg_url: str) -> None:
    a = PostgresEditStore(pg_url, "model-a")
    b = PostgresEditStore(pg_url, "model-a")  # a second replica: nothing to migrate
    assert [s for (s,) in sql(pg_url, "SELECT step FROM romegw_migrations ORDER BY step")] == [1]
    assert len(MIGRATIONS) == 1
    with pytest.raises(FailedPrecondition, match="belongs to model 'model-a', not 'model-b'"):
        PostgresEditStore(pg_url, "model-b")
    sql(pg_url, "INSERT INTO romegw_migrations (step) VALUES (99)")
    with pytest.raises(FailedPrecondition, match="schema step 99, newer than this server knows"):
        PostgresEditStore(pg_url, "model-a")
    a.close()
    b.close()


def test_url_schema_is_checked_and_passwords_stay_out_of_messages() -> None:
    assert split_url("postgresql://u@h/db?schema=s1&sslmode=disable") == ("postgresql://u@h/db?sslmode=disable", "s1")
    assert split_url("postgresql://u@h/db")[1] == "romegw"
    for bad in ("Public", "a;drop", "x" * 64, "1abc", ""):
        with pytest.raises(ValueError, match="schema must be a lowercase identifier"):
            split_url(f"postgresql://u@h/db?schema={bad}")
    assert redacted("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert "hunter2" not in redacted("postgresql://u@h/db?sslmode=require&password=hunter2")
    assert split_url("postgresql://u@h/db?schema=select")[1] == "select"  # a reserved word: quoted in SQL


def test_a_dead_database_is_unavailable_and_says_so() -> None:
    with pytest.raises(Unavailable, match=r"unreachable .*nothing was changed") as e:
        PostgresEditStore("postgresql://u:secret@127.0.0.1:1/db?schema=x", "m", connect_timeout=1)
    assert "secret" not in str(e.value)


def test_replicas_share_one_linear_history(tiny_llama, pg_url: str) -> None:
    loaded = tiny_llama
    weights = LayerWeights(loaded)
    a, b = PostgresEditStore(pg_url, loaded.model_id), PostgresEditStore(pg_url, loaded.model_id)
    first = random_layer(loaded, weights, 0, seed=1)
    (e1,) = a.add_layers([first], base_active=[], op="apply")
    assert (e1.version, e1.active) == (1, (first.edit_id,))

    # b computed on version 0: its commit is refused and writes nothing
    late = random_layer(loaded, weights, 1, seed=2)
    with pytest.raises(HistoryMoved, match="holds 1 entries, this server had read 0"):
        b.add_layers([late], base_active=[], op="apply")
    assert sql(pg_url, "SELECT count(*) FROM romegw_layers") == [(1,)]
    assert b.manifest.entries == []

    # after reading the history, b commits on top of it; a sees it on refresh
    assert [e.version for e in b.refresh()] == [1]
    layer, data = b.read_layer(first.edit_id)
    assert data == encode_layer(first) and torch.equal(layer.factors[0].u, first.factors[0].u)
    (e2,) = b.add_layers([late], base_active=[first.edit_id], op="apply")
    assert e2.version == 2 and e2.parent_version == 1
    assert [(e.version, e.active) for e in a.refresh()] == [(2, (first.edit_id, late.edit_id))]
    r = a.add_state(StateChange("revert", 1, (first.edit_id,), author="ops", to_version=1))
    assert [e.op for e in b.refresh()] == ["revert"] and b.manifest.head_version == 1 and r.from_version == 2
    assert [s for (s,) in sql(pg_url, "SELECT seq FROM romegw_manifest ORDER BY seq")] == [1, 2, 3]
    a.close()
    b.close()


def test_an_altered_layer_row_is_refused(tiny_llama, pg_url: str) -> None:
    weights = LayerWeights(tiny_llama)
    store = PostgresEditStore(pg_url, tiny_llama.model_id)
    layer = random_layer(tiny_llama, weights, 0, seed=4)
    store.add_layers([layer], base_active=[], op="apply")
    sql(pg_url, "UPDATE romegw_layers SET data = overlay(data placing '\\x00'::bytea from 200 for 1)")
    with pytest.raises(ValueError, match="does not match its checksum"):
        store.read_layer(layer.edit_id)
    store.close()


def test_the_edit_manager_over_postgres_reverts_bit_exact_and_restarts(tokenizer, pg_url: str) -> None:
    """The manager's whole cycle (store, activate, revert, restart) on the database, as on a folder."""
    from tests.conftest import make_tiny

    loaded = make_tiny("llama", tokenizer)  # a private copy: its weights change
    before = param_hashes(loaded.model)
    m = EditManager(loaded, PostgresEditStore(pg_url, loaded.model_id), compute=lambda *_: None)
    m.restore()
    for i in range(3):
        e = m.store_layer(random_layer(loaded, m.weights, i % 2, seed=10 + i, version=i + 1))
        m.activate(e.active, e.version)
    at3 = param_hashes(loaded.model)
    version, active, _ = m.plan_revert(RevertRequest(to_version=1))
    m.store.add_state(StateChange("revert", version, tuple(active), to_version=1))
    m.activate(active, version)
    at1 = param_hashes(loaded.model)
    assert at1 not in (at3, before)
    m.store.close()

    # a replica starting later serves the recorded head, bit for bit the same weights
    m.weights.materialize([])
    assert param_hashes(loaded.model) == before
    replica = EditManager(loaded, PostgresEditStore(pg_url, loaded.model_id), compute=lambda *_: None)
    assert replica.restore() == 1
    assert param_hashes(loaded.model) == at1
    replica.version_layers(3)  # read from the database and verified
    replica.activate(replica.store.manifest.active_at(3), 3)
    assert param_hashes(loaded.model) == at3
    replica.weights.materialize([])
    replica.store.close()


KILLED_WRITER = """
import sys
from pathlib import Path
from rome_engine.edit_store import decode_layer
from rome_engine.pg_store import PostgresEditStore

url, model_id, folder = sys.argv[1:4]
store = PostgresEditStore(url, model_id)
active = []
for path in sorted(Path(folder).glob("*.bin")):
    layer = decode_layer(path.read_bytes())
    store.add_layers([layer], base_active=active, op="apply")
    active.append(layer.edit_id)
    print(len(active), flush=True)
"""


def test_a_writer_killed_mid_commit_leaves_a_consistent_history(tiny_llama, pg_url: str, tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys

    weights = LayerWeights(tiny_llama)
    for i in range(200):
        layer = random_layer(tiny_llama, weights, i % 2, seed=100 + i)
        (tmp_path / f"{i:04d}.bin").write_bytes(encode_layer(layer))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, pg_url, tiny_llama.model_id, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert writer.stdout is not None
    for line in writer.stdout:
        if int(line) >= 20:  # well into its commits: kill it wherever it is
            writer.send_signal(signal.SIGKILL)
            break
    writer.wait(30)
    (head,) = sql(pg_url, "SELECT head_seq FROM romegw_meta")[0]
    seqs = [s for (s,) in sql(pg_url, "SELECT seq FROM romegw_manifest ORDER BY seq")]
    assert head >= 20 and seqs == list(range(1, head + 1))  # no gap, nothing past the head
    layers = dict(sql(pg_url, "SELECT edit_id::text, sha256 FROM romegw_layers"))
    store = PostgresEditStore(pg_url, tiny_llama.model_id)  # a replica reads the history whole
    named = {e.edit_id: e.sha256 for e in store.manifest.entries}
    assert named == layers  # every entry's layer is there, and no layer without its entry
    assert store.manifest.entries[-1].active == tuple(store.manifest.apply_entries())
    extra = random_layer(tiny_llama, weights, 0, seed=999)
    (entry,) = store.add_layers([extra], base_active=list(store.manifest.entries[-1].active), op="apply")
    assert entry.version == head + 1
    store.close()


def test_a_follower_serves_a_version_once_it_is_live_and_retries_what_failed(tokenizer, pg_url: str) -> None:
    """min_edit_version counts a version once it is served, not once it is read; a layer that failed
    to load once is tried again at the next follow, with nothing new in the history."""
    from tests.conftest import make_tiny

    a_model, b_model = make_tiny("llama", tokenizer), make_tiny("llama", tokenizer)
    a = EditManager(a_model, PostgresEditStore(pg_url, a_model.model_id), compute=lambda *_: None)
    b = EditManager(b_model, PostgresEditStore(pg_url, b_model.model_id), compute=lambda *_: None)
    a.restore()
    b.restore()
    e = a.store_layer(random_layer(a_model, a.weights, 0, seed=7))
    a.activate(e.active, e.version)
    assert b.store.refresh() and b.store.manifest.max_version == 1
    assert b.served_history_version == 0 and b.history_lag == 1  # read, not live: a reader still waits

    real_read = b.store.read_layer
    failures = iter([ValueError("a transient read error")])

    def flaky(edit_id: str):
        error = next(failures, None)
        if error is not None:
            raise error
        return real_read(edit_id)

    b.store.read_layer = flaky
    assert b.follow() == (0, [])  # nothing new was read above; the layer failed: the base stays
    assert b.follow() == (1, list(e.active))  # tried again without anything new in the history
    b.activate(list(e.active), 1)
    assert b.served_history_version == 1 and b.history_lag == 0
    assert b.follow() is None  # on the head: nothing to do
    a.store.close()
    b.store.close()
