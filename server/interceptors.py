"""Server interceptors: authentication, then errors -> statuses and RPC metrics.

Handlers carry no try/except: an ``EngineError`` raised anywhere under them
is turned into its status code with the error's message (cut in the middle
to MAX_STATUS_MESSAGE_CHARS: messages may quote a request); anything else is
logged with a traceback and answered INTERNAL with a short reference id.
Every RPC of the gateway service is counted and timed by method and code.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from rome_engine import errors
from rome_engine.bounds import MAX_LOG_CHARS, clip

from .auth import ROLE_METHODS, TokenTable
from .metrics import Metrics

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/romegw.v1.RomeGateway/"
# a status message travels in a trailer (gRPC's default metadata limit is 8 KiB): error
# messages that quote a request are cut to this many characters
MAX_STATUS_MESSAGE_CHARS = 1000

KNOWN_METHODS = frozenset().union(*ROLE_METHODS.values())

# who made the current call (for audit lines): a token's name, or "anonymous"
caller: contextvars.ContextVar[str] = contextvars.ContextVar("romegw_caller", default="anonymous")

STATUS_OF: dict[type[errors.EngineError], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.UnsupportedModel: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return None


class _Malformed:
    """What the guarded deserializer returns for bytes that are not the request message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _guarded(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # protobuf's DecodeError and friends
            return _Malformed(e)

    return parse


def _check_request(request: Any) -> Any:
    """Malformed bytes become INVALID_ARGUMENT (gRPC itself would answer UNKNOWN)."""
    if isinstance(request, _Malformed):
        raise errors.InvalidRequest(f"malformed request message: {request.error}")
    if hasattr(request, "__aiter__"):
        return _checked_stream(request)
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for item in requests:
        if isinstance(item, _Malformed):
            raise errors.InvalidRequest(f"malformed request message in the stream: {item.error}")
        yield item


def status_message(text: str, limit: int = MAX_STATUS_MESSAGE_CHARS) -> str:
    """An error message cut to ``limit`` characters in its middle: messages may quote a huge request
    string, and their end usually says what to fix."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}...[{len(text) - 2 * half} chars cut]...{text[-half:]}"


class _Outcome:
    """The status code a call ended with, as seen by the wrapper."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.OK


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception, outcome: _Outcome) -> None:
    code = status_for(exc)
    if code is None:
        ref = uuid.uuid4().hex[:12]
        log.exception("internal error in %s (ref %s)", method, ref)
        outcome.code = grpc.StatusCode.INTERNAL
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); see the server log")
    message = status_message(str(exc))
    log.info("%s -> %s: %s", method, code.name, status_message(message, 2 * MAX_LOG_CHARS))
    outcome.code = code
    await context.abort(code, message)


def _code_of(context: grpc.aio.ServicerContext, outcome: _Outcome) -> grpc.StatusCode:
    try:
        code = context.code()
    except Exception:  # older grpcio have no code() on aio contexts
        code = None
    return code if isinstance(code, grpc.StatusCode) else outcome.code


def _wrap_unary(method: str, behavior: Callable[..., Awaitable[Any]], metrics: Metrics | None):
    async def handler(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        outcome, t0 = _Outcome(), time.perf_counter()
        try:
            return await behavior(_check_request(request_or_iterator), context)
        except errors.EngineError as e:
            await _abort(context, method, e, outcome)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            outcome.code = grpc.StatusCode.UNKNOWN
            raise
        except Exception as e:  # the one place that turns bugs into INTERNAL
            await _abort(context, method, e, outcome)
        finally:
            if metrics is not None:
                metrics.observe_rpc(method, _code_of(context, outcome).name, time.perf_counter() - t0)

    return handler


def _wrap_stream(method: str, behavior: Callable[..., AsyncIterator[Any]], metrics: Metrics | None):
    async def handler(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        outcome, t0 = _Outcome(), time.perf_counter()
        try:
            async for item in behavior(_check_request(request_or_iterator), context):
                yield item
        except errors.EngineError as e:
            await _abort(context, method, e, outcome)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            outcome.code = grpc.StatusCode.UNKNOWN
            raise
        except GeneratorExit:  # the client went away (cancelled, deadline)
            outcome.code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:
            await _abort(context, method, e, outcome)
        finally:
            if metrics is not None:
                metrics.observe_rpc(method, _code_of(context, outcome).name, time.perf_counter() - t0)

    return handler


def _rebuild(
    handler: grpc.RpcMethodHandler, wrap_unary: Callable, wrap_stream: Callable, *, guard: bool = False
) -> grpc.RpcMethodHandler:
    deserializer = _guarded(handler.request_deserializer) if guard else handler.request_deserializer
    kw = {"request_deserializer": deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **kw)
    return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), **kw)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping a handler to gRPC statuses, and counts and times every RPC."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        method = details.method.removeprefix(SERVICE_PREFIX)
        return _rebuild(
            handler,
            lambda b: _wrap_unary(method, b, self.metrics),
            lambda b: _wrap_stream(method, b, self.metrics),
            guard=True,
        )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer tokens with roles: missing or unknown -> UNAUTHENTICATED; a gateway RPC the token's
    role does not list (``auth.ROLE_METHODS``), or that no role lists, -> PERMISSION_DENIED, decided
    before the method is looked up.

    Health and reflection stay open (load balancers and grpcurl need them).
    """

    def __init__(self, tokens: TokenTable, metrics: Metrics | None = None) -> None:
        self.tokens = tokens
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if not details.method.startswith(SERVICE_PREFIX):
            return await continuation(details)  # health and reflection stay open
        method = details.method.removeprefix(SERVICE_PREFIX)
        header = dict(details.invocation_metadata or ()).get("authorization", "")
        decision = self.tokens.authorize(header, method)
        if decision.code is not None:  # refused before the method is even looked up
            return self._deny(method, decision.code, decision.message)
        handler = await continuation(details)
        if handler is None:
            return handler
        name = decision.name

        def bind(behavior: Callable) -> Callable:
            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                caller.set(name)
                return await behavior(request, context)

            return unary

        def bind_stream(behavior: Callable) -> Callable:
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                caller.set(name)
                async for item in behavior(request, context):
                    yield item

            return stream

        return _rebuild(handler, bind, bind_stream)

    def _deny(self, method: str, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
        """A handler that answers ``code`` at once, whatever the method's shape (or if it has none).

        A stream-stream handler without a deserializer serves unary and streaming calls alike:
        it aborts before reading a request.
        """
        log.warning("%s refused: %s (%s)", clip(method), code.name, message)
        if self.metrics is not None:  # a caller picks the name: unknown ones share one label
            self.metrics.observe_rpc(method if method in KNOWN_METHODS else "(unknown)", code.name, 0.0)

        async def deny(_requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await context.abort(code, message)
            yield  # pragma: no cover

        return grpc.stream_stream_rpc_method_handler(deny)
