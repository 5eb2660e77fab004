"""A PostgreSQL schema per test, dropped after: ``fresh_schema_url`` (behind the ``pg_url`` fixture of
tests/conftest.py), which skips, saying why, when there is no server at ROMEGW_TEST_PG (default
postgresql://postgres@127.0.0.1:5432/test)."""

from __future__ import annotations

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
