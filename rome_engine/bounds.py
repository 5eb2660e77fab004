"""Bounds on every user string the gateway stores, echoes or logs.

A string that reaches the edit store (an author, a comment, a subject) is
stored forever and echoed by every ListEdits afterwards, so it is checked
against a limit before anything is written. A string that reaches a log line
is clipped, never refused: logs must stay readable whatever a caller sends.

    check_text("comment", comment, MAX_COMMENT_CHARS)   # InvalidRequest if too long
    log.info("edit of %s", clip(subject))               # at most MAX_LOG_CHARS characters
"""

from __future__ import annotations

from .errors import InvalidRequest

MAX_AUTHOR_CHARS = 256
MAX_COMMENT_CHARS = 4096
MAX_LOG_CHARS = 200


def check_text(name: str, value: str, limit: int) -> str:
    """``value`` unchanged, or InvalidRequest naming the field and its limit."""
    if len(value) > limit:
        raise InvalidRequest(f"{name} has {len(value)} characters, over the limit of {limit}: shorten it")
    return value


def clip(value: object, limit: int = MAX_LOG_CHARS) -> str:
    """``repr``-safe text for a log line: at most ``limit`` characters, with the length cut noted."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more chars]"
