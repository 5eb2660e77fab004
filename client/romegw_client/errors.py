"""Typed exceptions for gRPC errors: one class per status code the gateway uses."""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    """A call failed; ``code`` is the gRPC status code, ``message`` says what to fix."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(GatewayError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(GatewayError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(GatewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(GatewayError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GatewayError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(GatewayError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(GatewayError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(GatewayError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(GatewayError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[GatewayError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unimplemented,
        Internal,
    )
}


def from_rpc_error(error: grpc.RpcError) -> GatewayError:
    """The typed exception for a failed call (keeps the original as __cause__)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    cls = _BY_CODE.get(code, GatewayError)
    exc = cls(details or code.name, code)
    exc.__cause__ = error
    return exc
