"""A PostgreSQL schema per test, dropped after: ``fresh_schema_url`` (behind the ``pg_url`` fixture of
tests/conftest.py), which skips, saying why, when there is no server at ROMEGW_TEST_PG (default
postgresql://postgres@127.0.0.1:5432/test)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

PG = os.environ.get("ROMEGW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _connect():
    try:
        import psycopg
    except ImportError as e:  # pragma: no cover - a dependency of the server
        pytest.skip(f"psycopg is not installed ({e})")
    try:
        return psycopg.connect(PG, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL at {PG} ({str(e).strip()[:120]}): set ROMEGW_TEST_PG to run these tests")


@contextmanager
def fresh_schema_url() -> Iterator[str]:
    """A database URL whose ``schema=`` is a fresh name, dropped (with everything in it) after the test."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = _connect()
    try:
        yield f"{PG}?schema={schema}"
    finally:
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.close()


def sql(url: str, query: str, *args: object) -> list[tuple]:
    """Run one statement in the URL's schema (as an operator or an attacker would)."""
    import psycopg

    from rome_engine.pg_store import split_url

    conninfo, schema = split_url(url)
    with psycopg.connect(conninfo, autocommit=True, options=f"-c search_path={schema}") as conn:
        cur = conn.execute(query, args or None)
        return cur.fetchall() if cur.description else []


class TcpProxy:
    """A loopback TCP proxy in front of the database, to take it away from one replica and give it
    back: ``cut()`` closes every connection and refuses new ones, ``restore()`` accepts again (same port)."""

    def __init__(self, host: str, port: int) -> None:
        import socket
        import threading

        self._socket, self._threading = socket, threading
        self.target = (host, port)
        self.port = 0
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.restore()

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(url)
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    def restore(self) -> None:
        s = self._socket.socket()
        s.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(16)
        self.port, self._server = s.getsockname()[1], s
        self._threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            conns, self._conns = self._conns, []
        if server is not None:
            server.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(self._socket.SHUT_RDWR)
            c.close()

    def _accept(self, server) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # cut
            upstream = self._socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(2)
