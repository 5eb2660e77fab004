"""Typed errors of the engine. The server maps each to a gRPC status code."""


class EngineError(Exception):
    """Base class: the message says what to fix."""


class InvalidRequest(EngineError):
    """The request is malformed or out of range (INVALID_ARGUMENT)."""


class NotFound(EngineError):
    """A named thing (an edit id, a version) does not exist (NOT_FOUND)."""


class FailedPrecondition(EngineError):
    """The request is valid but the state does not allow it (FAILED_PRECONDITION)."""


class HistoryMoved(FailedPrecondition):
    """Another replica changed a shared edit history since this one last read it: nothing was written."""


class ResourceExhausted(EngineError):
    """A configured limit is reached (RESOURCE_EXHAUSTED)."""


class Unavailable(EngineError):
    """The engine is shutting down or not ready (UNAVAILABLE)."""


class UnsupportedModel(EngineError):
    """The model's architecture is not in the family table."""
