"""The edit history in PostgreSQL, shared by the replicas of one model (issue #14).

    store = PostgresEditStore("postgresql://romegw@db:5432/prod?schema=romegw", loaded.model_id)
    store.add_layers([layer], base_active=[], op="apply")   # compare-and-swap: HistoryMoved if another
                                                            # replica appended since this one last read
    new = store.refresh()                                    # entries the others appended since

The same history as the folder store (``edit_store``), held in three tables of the
URL's ``schema`` (default ``romegw``), created and migrated here at start, under an
advisory lock so that replicas starting together migrate once::

    romegw_migrations(step int primary key, applied_at timestamptz)    -- the schema steps applied
    romegw_meta(id int primary key = 1, model_id text, head_seq bigint)  -- one row: whose, how far
    romegw_layers(edit_id uuid primary key, data bytea, sha256 text)     -- the layer files, byte for byte
    romegw_manifest(seq bigint primary key, version bigint, entry jsonb) -- the manifest entries, in order

``seq`` is an entry's place in the history (1, 2, ...); ``version`` is the state it
leads to, as in the folder's manifest (a revert to version N records N again, so the
version cannot be the key). A layer's bytes are exactly the safetensors file the folder
store writes, with the sha256 its manifest entry names; both are verified on every read.

**One linear history.** A commit runs in one transaction that locks the meta row
(``SELECT ... FOR UPDATE``) and goes on only when ``head_seq`` is still the number of
entries this store has read; otherwise it raises ``HistoryMoved`` and writes nothing
(the caller refreshes and recomputes, or refuses). Layers and entries are inserted and
``head_seq`` moved in the same transaction, so a replica killed mid-commit leaves all of
it or none. Each commit sends ``NOTIFY romegw_history`` with the schema name, for the
replicas that follow the history.

Database errors become ``Unavailable`` ("... nothing was changed"): the caller keeps
serving what it has.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from psycopg import sql

from .edit_store import EditLayer, HistoryStore, Manifest, StateChange, decode_layer, plan_layers, sha256_bytes
from .errors import FailedPrecondition, HistoryMoved, NotFound, Unavailable
from .records import ManifestEntry, check_edit_id

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "romegw_history"
MAX_LAYER_BYTES = 256 * 1024 * 1024  # a row larger than this is refused unread (a real layer: kilobytes to megabytes)
DEFAULT_SCHEMA = "romegw"
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# The schema, step by step: a step is never edited once released, only followed by another.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE romegw_meta (
        id integer PRIMARY KEY CHECK (id = 1),
        model_id text NOT NULL,
        head_seq bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE romegw_layers (
        edit_id uuid PRIMARY KEY,
        data bytea NOT NULL,
        sha256 text NOT NULL,
        stored_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE romegw_manifest (
        seq bigint PRIMARY KEY,
        version bigint NOT NULL,
        entry jsonb NOT NULL
    );
    """,
)


def is_database_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


def split_url(url: str) -> tuple[str, str]:
    """(the connection URL without ``schema=``, the schema name); InvalidRequest-like ValueError for a
    schema that is not a plain lowercase identifier."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [v for k, v in query if k == "schema"]
    schema = schemas[-1] if schemas else DEFAULT_SCHEMA
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"schema must be a lowercase identifier (letters, digits, _; at most 63), got {schema!r}")
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), schema


def redacted(url: str) -> str:
    """The URL without its password (``user:password@`` or ``?password=``), for logs and messages."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "password" for k, _ in query):
        parts = parts._replace(query=urlencode([(k, "***" if k == "password" else v) for k, v in query]))
    return urlunsplit(parts)


class PostgresEditStore:
    """The edit history of one model in a PostgreSQL schema (see the module docstring)."""

    shared = True  # other replicas write it: never record a recovery, follow it
    def __init__(self, url: str, model_id: str, *, pool_size: int = 4, connect_timeout: float = 10.0) -> None:
        import psycopg_pool  # only a server with a database URL needs it

        conninfo, self.schema = split_url(url)
        self._url = url
        self.up = True  # the database answered the last time it was asked
        self.remote_entries = 0  # entries the database held at the last look (refresh, or the listener's poll)
        self._where = f"{redacted(conninfo)} (schema {self.schema})"
        self.pool = psycopg_pool.ConnectionPool(
            conninfo, min_size=1, max_size=pool_size, open=False, timeout=connect_timeout,
            check=psycopg_pool.ConnectionPool.check_connection,  # a connection the database dropped is replaced
            kwargs={"options": f'-c search_path="{self.schema}"', "connect_timeout": max(1, int(connect_timeout))},
        )  # fmt: skip
        try:
            with self._errors("open"):
                self.pool.open(wait=True, timeout=connect_timeout)
                self._migrate()
                self._claim(model_id)
            self.manifest = Manifest(model_id=model_id)
            self.refresh()
        except BaseException:
            self.pool.close()
            raise

    @property
    def location(self) -> str:
        return self._where

    # -- the schema ------------------------------------------------------------------

    def _migrate(self) -> None:
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"romegw:{self.schema}",))
            if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS romegw_migrations (step integer PRIMARY KEY, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT step FROM romegw_migrations")}
            unknown = sorted(s for s in done if s > len(MIGRATIONS))
            if unknown:
                raise FailedPrecondition(
                    f"the edit store {self._where} has schema step {unknown[-1]}, newer than this server knows "
                    f"({len(MIGRATIONS)}): upgrade the server"
                )
            for step, statements in enumerate(MIGRATIONS, start=1):
                if step not in done:
                    conn.execute(statements)
                    conn.execute("INSERT INTO romegw_migrations (step) VALUES (%s)", (step,))
                    log.info("edit store %s: schema step %d applied", self._where, step)

    def _claim(self, model_id: str) -> None:
        with self.pool.connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO romegw_meta (id, model_id) VALUES (1, %s) ON CONFLICT (id) DO NOTHING", (model_id,)
            )
            (owner,) = conn.execute("SELECT model_id FROM romegw_meta WHERE id = 1").fetchone()
        if owner != model_id:
            raise FailedPrecondition(
                f"edit store {self._where} belongs to model {owner!r}, not {model_id!r}: use another schema"
            )

    # -- reading -----------------------------------------------------------------------

    def refresh(self) -> list[ManifestEntry]:
        """Read the entries appended since the last read (by any replica), append them to
        ``manifest`` and return them. A malformed entry is FailedPrecondition, as a damaged manifest is."""
        seen = len(self.manifest.entries)
        with self._errors("read"), self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT seq, entry FROM romegw_manifest WHERE seq > %s ORDER BY seq", (seen,)
            ).fetchall()
        new = []
        for expected, (seq, raw) in enumerate(rows, start=seen + 1):
            if seq != expected:
                raise FailedPrecondition(f"the edit store {self._where} misses manifest entry {expected}")
            try:
                new.append(ManifestEntry.from_json(raw))
            except ValueError as e:
                raise FailedPrecondition(f"the edit store {self._where}: manifest entry {seq} is damaged ({e})") from e
        self.manifest.entries.extend(new)
        self.remote_entries = max(self.remote_entries, len(self.manifest.entries))
        self.up = True
        return new

    def read_layer(self, edit_id: str) -> tuple[EditLayer, bytes]:
        """The layer and its bytes, checked against the manifest's sha256 (ValueError otherwise)."""
        entry = self.manifest.apply_entries().get(edit_id)
        if entry is None:
            raise NotFound(f"no edit with id {edit_id!r}")
        with self._errors("read"), self.pool.connection() as conn:
            query = ("SELECT octet_length(data), CASE WHEN octet_length(data) <= %s THEN data END "
                     "FROM romegw_layers WHERE edit_id = %s")
            row = conn.execute(query, (MAX_LAYER_BYTES, check_edit_id(edit_id))).fetchone()
        if row is None:
            raise ValueError(f"layer {edit_id} is missing from {self._where}")
        if row[1] is None:
            raise ValueError(f"layer {edit_id} in {self._where} has {row[0]} bytes, over {MAX_LAYER_BYTES}")
        data = bytes(row[1])
        if sha256_bytes(data) != entry.sha256:
            raise ValueError(f"layer {edit_id} in {self._where} does not match its checksum (altered)")
        layer = decode_layer(data, stored=True)
        if layer.edit_id != edit_id:
            raise ValueError(f"layer row {edit_id} in {self._where} holds edit {layer.edit_id}")
        return layer, data

    def remove_orphans(self) -> None:
        """Nothing to do: a layer row is inserted in the transaction of its manifest entry."""

    # -- writing ------------------------------------------------------------------------

    def add_layers(
        self,
        layers: list[EditLayer],
        *,
        base_active: list[str],
        op: str,
        author: str = "",
        origin_versions: list[int] | None = None,
    ) -> list[ManifestEntry]:
        """Layers and their entries in one transaction, if the history has not moved (HistoryMoved)."""
        planned = plan_layers(self.manifest, layers, base_active=base_active, op=op, author=author,
                              origin_versions=origin_versions)  # fmt: skip
        rows = [(layer.edit_id, data, entry.sha256) for layer, data, entry in planned]
        entries = [entry for _, _, entry in planned]
        self._commit(entries, rows)
        return entries

    def add_state(self, change: StateChange) -> ManifestEntry:
        """A revert or a recovery, if the history has not moved (HistoryMoved)."""
        entry = change.entry(self.manifest)
        self._commit([entry], [])
        return entry

    def _commit(self, entries: list[ManifestEntry], layer_rows: list[tuple[str, bytes, str]]) -> None:
        seen = len(self.manifest.entries)
        with self._errors("write"), self.pool.connection() as conn, conn.transaction():
            (head,) = conn.execute("SELECT head_seq FROM romegw_meta WHERE id = 1 FOR UPDATE").fetchone()
            if head != seen:
                raise HistoryMoved(
                    f"the edit history moved: it holds {head} entries, this server had read {seen} (another "
                    "replica committed meanwhile); nothing was written"
                )
            with conn.cursor() as cur:
                if layer_rows:
                    cur.executemany("INSERT INTO romegw_layers (edit_id, data, sha256) VALUES (%s, %s, %s)", layer_rows)
                cur.executemany(
                    "INSERT INTO romegw_manifest (seq, version, entry) VALUES (%s, %s, %s::jsonb)",
                    [(seen + i, e.version, json.dumps(e.to_json())) for i, e in enumerate(entries, start=1)],
                )
            conn.execute("UPDATE romegw_meta SET head_seq = %s WHERE id = 1", (seen + len(entries),))
            conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, self.schema))
        self.manifest.entries.extend(entries)

    def copy_from(self, folder: HistoryStore, progress: Callable[[int, int], None] | None = None) -> int:
        """Copy another store's whole history (every entry, every layer byte for byte, each verified
        as it is read) into this one, which must be empty, in one transaction: all of it or nothing.
        Returns the number of entries copied (``rome-gateway store migrate``)."""
        if folder.manifest.model_id != self.manifest.model_id:
            raise FailedPrecondition(
                f"the store {folder.location} belongs to {folder.manifest.model_id!r}, this one to "
                f"{self.manifest.model_id!r}"
            )
        ids = list(folder.manifest.apply_entries())
        rows = []
        for i, edit_id in enumerate(ids):
            layer, data = folder.read_layer(edit_id)  # ValueError when damaged: nothing is written
            rows.append((layer.edit_id, data, sha256_bytes(data)))
            if progress is not None:
                progress(i + 1, len(ids))
        with self._errors("write"), self.pool.connection() as conn, conn.transaction():
            (head,) = conn.execute("SELECT head_seq FROM romegw_meta WHERE id = 1 FOR UPDATE").fetchone()
            if head or self.manifest.entries:
                raise FailedPrecondition(f"the edit store {self._where} already holds {head} entries: migrate "
                                         "into a new schema")  # fmt: skip
        self._commit(list(folder.manifest.entries), rows)
        return len(folder.manifest.entries)

    # -- following the others ---------------------------------------------------------------

    def listen(self, wake: Callable[[], None], stop: threading.Event, *, poll_seconds: float = 5.0) -> None:
        """Call ``wake()`` whenever the history may have changed, until ``stop`` is set (blocking: a
        thread of its own). A dedicated connection LISTENs for the commits' NOTIFY; ``wake()`` also runs
        once per (re)connection and every ``poll_seconds`` (a notification missed while disconnected
        is caught up then). The connection is re-opened after a failure, 1 s later and then less and
        less often (at most every 10 s); ``up`` says whether the database answers."""
        import psycopg

        conninfo, _ = split_url(self._url)
        head_query = sql.SQL("SELECT head_seq FROM {}.romegw_meta WHERE id = 1").format(sql.Identifier(self.schema))
        backoff = 1.0
        while not stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.up, backoff = True, 1.0
                    wake()
                    while not stop.is_set():
                        for _ in conn.notifies(timeout=poll_seconds, stop_after=1):
                            pass  # a commit (of any schema on this database: a refresh is one cheap query)
                        head = conn.execute(head_query).fetchone()
                        self.remote_entries = max(self.remote_entries, int(head[0]) if head else 0)
                        wake()
            except Exception as e:  # psycopg's errors, and anything else: the thread must not die
                if self.up:
                    log.warning("edit store %s: lost the database (%s: %s); serving the version in place, "
                                "retrying", self._where, type(e).__name__, str(e).strip()[:200])  # fmt: skip
                self.up = False
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    # -- errors and the end ---------------------------------------------------------------

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """psycopg's errors as Unavailable (the database is down or refuses): nothing was changed."""
        import psycopg
        import psycopg_pool

        try:
            yield
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as e:
            self.up = False
            outcome = (
                "the commit may or may not have gone through (the connection broke): ListEdits says, once it "
                "is back" if doing == "write" else "nothing was changed: retry once it is back"
            )
            raise Unavailable(
                f"the edit store database {self._where} is unreachable ({doing}: {str(e).strip()[:200]}); {outcome}"
            ) from e
        except psycopg.Error as e:
            raise Unavailable(
                f"the edit store database {self._where} refused a {doing} ({type(e).__name__}: "
                f"{str(e).strip()[:200]}); nothing was changed"
            ) from e

    def close(self) -> None:
        self.pool.close()
