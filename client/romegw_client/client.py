"""Sync and async clients of the gateway.

    with Client("localhost:50051", token=os.environ.get("ROMEGW_TOKEN")) as c:
        for chunk in c.generate("The capital of France is", max_new_tokens=8):
            print(chunk.text, end="", flush=True)
        print(c.score("The Eiffel Tower is in", [" Paris", " Rome"]).best().continuation)

    async with AsyncClient("localhost:50051") as c:
        async for chunk in c.generate("Hello"):
            ...

Every gRPC error is raised as a typed ``GatewayError`` subclass carrying the
status code and the server's message. ``timeout`` (seconds) is the deadline
of one call; the client's default applies when it is not given.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc

from ._pb import gateway_pb2 as pb
from ._pb import gateway_pb2_grpc as pb_grpc
from .errors import from_rpc_error
from .health import STATUS_NAMES, HealthCheckRequest, check_method
from .types import Completion, GenerateChunk, ModelInfo, ScoreResult

SERVICE_NAME = "romegw.v1.RomeGateway"
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def generate_request(
    prompt: str,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    logprobs: bool = False,
    top_logprobs: int = 0,
) -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt=prompt, stop=list(stop), logprobs=logprobs, top_logprobs=top_logprobs)
    for name, value in (
        ("max_new_tokens", max_new_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("seed", seed),
    ):
        if value is not None:
            setattr(req, name, value)
    return req


def channel_credentials(
    root_certificates: bytes | None = None,
    private_key: bytes | None = None,
    certificate_chain: bytes | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials: the server's CA (None: system roots), and a client key pair for mutual TLS."""
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


class _Base:
    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float | None = 300.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel_args = (credentials, [
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            *options,
        ])

    def _kw(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self._metadata}


class Client(_Base):
    """Blocking client. Use as a context manager, or call ``close()``."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        credentials, options = self._channel_args
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self.stub = pb_grpc.RomeGatewayStub(self._channel)
        self._health_check = check_method(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompt: str, *, timeout: float | None = None, **params: Any) -> Iterator[GenerateChunk]:
        """Stream the completion; stop iterating (or ``close()`` the iterator) to cancel it."""
        call = self.stub.Generate(generate_request(prompt, **params), **self._kw(timeout))
        try:
            for message in call:
                yield GenerateChunk.from_pb(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()  # a no-op once the stream has ended; frees the server when abandoned

    def generate_text(self, prompt: str, *, timeout: float | None = None, **params: Any) -> Completion:
        return Completion.join(list(self.generate(prompt, timeout=timeout, **params)))

    def score(self, prompt: str, continuations: Sequence[str], *, timeout: float | None = None) -> ScoreResult:
        req = pb.ScoreRequest(prompt=prompt, continuations=list(continuations))
        return ScoreResult.from_pb(self._unary(self.stub.Score, req, timeout))

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return ModelInfo.from_pb(self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """The health status name: SERVING, NOT_SERVING, ..."""
        reply = self._unary(self._health_check, HealthCheckRequest(service=service), timeout)
        return STATUS_NAMES.get(reply.status, str(reply.status))

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, **self._kw(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None


class AsyncClient(_Base):
    """asyncio client. Use as an async context manager, or ``await close()``."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        credentials, options = self._channel_args
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self.stub = pb_grpc.RomeGatewayStub(self._channel)
        self._health_check = check_method(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def generate(
        self, prompt: str, *, timeout: float | None = None, **params: Any
    ) -> AsyncIterator[GenerateChunk]:
        call = self.stub.Generate(generate_request(prompt, **params), **self._kw(timeout))
        try:
            async for message in call:
                yield GenerateChunk.from_pb(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def generate_text(self, prompt: str, *, timeout: float | None = None, **params: Any) -> Completion:
        return Completion.join([c async for c in self.generate(prompt, timeout=timeout, **params)])

    async def score(self, prompt: str, continuations: Sequence[str], *, timeout: float | None = None) -> ScoreResult:
        req = pb.ScoreRequest(prompt=prompt, continuations=list(continuations))
        return ScoreResult.from_pb(await self._unary(self.stub.Score, req, timeout))

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return ModelInfo.from_pb(await self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    async def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        reply = await self._unary(self._health_check, HealthCheckRequest(service=service), timeout)
        return STATUS_NAMES.get(reply.status, str(reply.status))

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, **self._kw(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
