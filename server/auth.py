"""Bearer tokens with two roles, compared in constant time.

Roles are an allow-list (``ROLE_METHODS``): ``generate`` may call Generate,
Score, Trace, GetModelInfo, ListEdits and GetEdit; ``edit`` may call those and
ApplyEdit, ApplyEdits, RevertEdit, ImportEdits and ExportEdits. A gateway RPC that no role
names is refused (PERMISSION_DENIED) whatever the token: a new RPC stays closed
until it is added to the table. Health and reflection are not gateway RPCs;
the interceptor leaves them open. Tokens come from a file (``--tokens-file``) or the
environment variable ``ROMEGW_TOKENS``, never from the command line. One token
per line (or per comma in the variable)::

    # role  token                              name (for audit lines; optional)
    edit    3f9c0b1e5c0a4d0f8f0a1b2c3d4e5f60    alice
    generate 7d2e...                           web-frontend

Neither the tokens nor their hashes are logged; a caller is named by its
token's name, else by ``<role>-token-<n>``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from rome_engine.bounds import clip

ROLES = ("generate", "edit")
_GENERATE_ROLE = frozenset({"Generate", "Score", "Trace", "GetModelInfo", "ListEdits", "GetEdit"})
# role -> the gateway RPCs it may call; anything not listed is refused
ROLE_METHODS: dict[str, frozenset[str]] = {
    "generate": _GENERATE_ROLE,
    "edit": _GENERATE_ROLE | {"ApplyEdit", "ApplyEdits", "RevertEdit", "ImportEdits", "ExportEdits"},
}
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class _Token:
    digest: bytes  # sha256 of the token: compared with hmac.compare_digest
    role: str
    name: str


@dataclass(frozen=True)
class Decision:
    code: grpc.StatusCode | None  # None: allowed
    message: str = ""
    name: str = "anonymous"


class TokenTable:
    def __init__(self, tokens: list[tuple[str, str, str]]) -> None:
        """``tokens``: (role, token, name) triples."""
        self._tokens: list[_Token] = []
        for i, (role, token, name) in enumerate(tokens):
            if role not in ROLES:
                raise ValueError(f"token {i + 1}: unknown role {role!r}: use one of {', '.join(ROLES)}")
            if len(token) < MIN_TOKEN_CHARS:
                raise ValueError(f"token {i + 1} ({role}) is shorter than {MIN_TOKEN_CHARS} characters")
            self._tokens.append(_Token(hashlib.sha256(token.encode()).digest(), role, name or f"{role}-token-{i + 1}"))

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def authorize(self, header: str, method: str) -> Decision:
        if not self._tokens:
            return Decision(None)
        scheme, _, token = header.partition(" ")
        if not header:
            return Decision(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata")
        if scheme.lower() != "bearer" or not token.strip():
            return Decision(grpc.StatusCode.UNAUTHENTICATED, "the authorization metadata must be 'Bearer <token>'")
        digest = hashlib.sha256(token.strip().encode()).digest()
        match = None
        for t in self._tokens:  # compare against every token, in constant time each
            if hmac.compare_digest(t.digest, digest):
                match = t
        if match is None:
            return Decision(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        return _allowed(match, method)


def _allowed(token: _Token, method: str) -> Decision:
    """The allow-list check of an authenticated caller."""
    if method in ROLE_METHODS[token.role]:
        return Decision(None, "", token.name)
    roles = [role for role, methods in ROLE_METHODS.items() if method in methods]
    if not roles:
        message = f"{clip(method, 100)} is not open to any role (not in the server's role table)"
    else:
        message = f"{method} needs a token with the {' or '.join(repr(r) for r in roles)} role"
    return Decision(grpc.StatusCode.PERMISSION_DENIED, message, token.name)


def parse_tokens(text: str, *, separator: str | None = None) -> list[tuple[str, str, str]]:
    out = []
    items = text.split(separator) if separator else text.splitlines()
    for raw in items:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(":", " ", 1).split() if separator else line.split()
        if len(parts) < 2:
            raise ValueError("a token line is '<role> <token> [name]'")
        out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else ""))
    return out


def load_tokens(path: Path | None = None, env: str | None = None) -> TokenTable:
    """Tokens from ``path`` and from ``env`` (default: $ROMEGW_TOKENS, "role:token[ name],...")."""
    entries: list[tuple[str, str, str]] = []
    if path is not None:
        entries += parse_tokens(Path(path).read_text())
    env_value = os.environ.get("ROMEGW_TOKENS", "") if env is None else env
    if env_value.strip():
        entries += parse_tokens(env_value, separator=",")
    return TokenTable(entries)
