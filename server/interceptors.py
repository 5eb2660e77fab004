"""Server interceptors: engine errors become gRPC statuses, in one place.

Handlers carry no try/except: an ``EngineError`` raised anywhere under them
is turned into its status code with the error's message; anything else is
logged with a traceback and answered INTERNAL with a short reference id.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from rome_engine import errors

log = logging.getLogger(__name__)

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


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    code = status_for(exc)
    if code is None:
        ref = uuid.uuid4().hex[:12]
        log.exception("internal error in %s (ref %s)", method, ref)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); see the server log")
    log.info("%s -> %s: %s", method, code.name, exc)
    await context.abort(code, str(exc))


def _wrap_unary(method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handler(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request_or_iterator, context)
        except errors.EngineError as e:
            await _abort(context, method, e)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as e:  # noqa: BLE001 - the one place that turns bugs into INTERNAL
            await _abort(context, method, e)

    return handler


def _wrap_stream(method: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behavior(request_or_iterator, context):
                yield item
        except errors.EngineError as e:
            await _abort(context, method, e)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as e:  # noqa: BLE001
            await _abort(context, method, e)

    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping a handler to gRPC statuses."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith("/romegw."):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        kw = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(method, handler.unary_unary), **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_wrap_stream(method, handler.unary_stream), **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary(method, handler.stream_unary), **kw)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(_wrap_stream(method, handler.stream_stream), **kw)
        return handler
