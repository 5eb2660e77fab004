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
from pathlib import Path
from typing import Any, TypeVar

import grpc

from .errors import GatewayError, from_rpc_error
from .health import STATUS_NAMES, HealthCheckRequest, check_method
from .pb import gateway_pb2 as pb
from .pb import gateway_pb2_grpc as pb_grpc
from .types import (
    TRACE_KINDS,
    ApplyResult,
    Completion,
    EditInfo,
    EditPage,
    GenerateChunk,
    LayerFile,
    ModelInfo,
    RevertResult,
    ScoreResult,
    TraceProgress,
    TraceResult,
)

T = TypeVar("T", pb.GenerateRequest, pb.ScoreRequest, pb.TraceRequest)
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
    edit_version: int | None = None,
    min_edit_version: int | None = None,
) -> pb.GenerateRequest:
    """``edit_version``: run on that version of the edit history (0: the base model; None: the head).
    ``min_edit_version``: run only once the server knows that version (read your writes)."""
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
    return _pinned(req, edit_version, min_edit_version)


def score_request(
    prompt: str, continuations: Sequence[str], *, edit_version: int | None = None, min_edit_version: int | None = None
) -> pb.ScoreRequest:
    req = pb.ScoreRequest(prompt=prompt, continuations=list(continuations))
    return _pinned(req, edit_version, min_edit_version)


def _pinned(req: T, edit_version: int | None, min_edit_version: int | None) -> T:
    for name, value in (("edit_version", edit_version), ("min_edit_version", min_edit_version)):
        if value is not None:
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            setattr(req, name, value)
    return req


def channel_credentials(
    root_certificates: bytes | None = None,
    private_key: bytes | None = None,
    certificate_chain: bytes | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials: the server's CA (None: system roots), and a client key pair for mutual TLS."""
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def tls_credentials(
    ca: str | Path | None = None, client_cert: str | Path | None = None, client_key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials from PEM files: the server's CA (None: system roots) and, for mutual TLS,
    this client's certificate chain and private key (both or neither)."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("a client certificate and its private key go together: give both or neither")

    def read(path: str | Path | None) -> bytes | None:
        return Path(path).read_bytes() if path is not None else None

    return channel_credentials(read(ca), read(client_key), read(client_cert))


def edit_spec(prompt: str, subject: str, target: str, *, layer: int | None = None,
              hparams: dict[str, float] | None = None) -> pb.EditSpec:
    spec = pb.EditSpec(prompt=prompt, subject=subject, target=target, hparams=hparams or {})
    if layer is not None:
        spec.layer = layer
    return spec


def _set_options(
    req: pb.ApplyEditRequest | pb.ApplyEditsRequest,
    *,
    dry_run: bool = False,
    expected_version: int | None = None,
    author: str = "",
    comment: str = "",
    force: bool = False,
    min_target_prob: float | None = None,
    method: str = "",
) -> None:
    req.dry_run, req.author, req.comment, req.force, req.method = dry_run, author, comment, force, method
    if expected_version is not None:
        req.expected_version = expected_version
    if min_target_prob is not None:
        req.min_target_prob = min_target_prob


def apply_edit_request(
    prompt: str, subject: str, target: str, *, layer: int | None = None, hparams: dict[str, float] | None = None,
    **options: Any,
) -> pb.ApplyEditRequest:  # fmt: skip
    """Options: dry_run, expected_version, author, comment, force, min_target_prob, method."""
    req = pb.ApplyEditRequest(edit=edit_spec(prompt, subject, target, layer=layer, hparams=hparams))
    _set_options(req, **options)
    return req


def apply_edits_request(
    facts: Sequence[Sequence[str]], *, layer: int | None = None, hparams: dict[str, float] | None = None,
    **options: Any,
) -> pb.ApplyEditsRequest:  # fmt: skip
    """``facts``: (prompt, subject, target) each; they share ``layer`` and ``hparams``."""
    req = pb.ApplyEditsRequest(edits=[edit_spec(*f, layer=layer, hparams=hparams) for f in facts])
    _set_options(req, **options)
    return req


def revert_edit_request(
    *, to_version: int | None = None, edit_id: str | None = None, author: str = "", comment: str = ""
) -> pb.RevertEditRequest:
    if (to_version is None) == (edit_id is None):
        raise ValueError("give exactly one of to_version and edit_id")
    req = pb.RevertEditRequest(author=author, comment=comment)
    if to_version is not None:
        req.to_version = to_version
    else:
        req.edit_id = edit_id
    return req


def trace_request(
    prompt: str,
    subject: str,
    *,
    answer: str | None = None,
    kind: str = "hidden",
    noise: float | None = None,
    samples: int | None = None,
    window: int | None = None,
    seed: int | None = None,
    edit_version: int | None = None,
    min_edit_version: int | None = None,
) -> pb.TraceRequest:
    if kind not in TRACE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(TRACE_KINDS)}, got {kind!r}")
    req = pb.TraceRequest(prompt=prompt, subject=subject, kind=TRACE_KINDS[kind])
    for name, value in (("answer", answer), ("noise", noise), ("samples", samples), ("window", window), ("seed", seed)):
        if value is not None:
            setattr(req, name, value)
    return _pinned(req, edit_version, min_edit_version)


def _trace_event(m: pb.TraceResponse) -> TraceProgress | TraceResult:
    if m.WhichOneof("event") == "result":
        return TraceResult.from_pb(m.result)
    return TraceProgress(m.progress.done, m.progress.total, m.progress.message)


def _layer_file(m: pb.EditLayerFile) -> LayerFile:
    return LayerFile(m.filename, m.content, m.version, m.edit_id, m.sha256)


def _layer_file_pb(f: LayerFile) -> pb.EditLayerFile:
    return pb.EditLayerFile(filename=f.filename, content=f.content, version=f.version, edit_id=f.edit_id,
                            sha256=f.sha256)


class _Base:
    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float | None = 300.0,
        options: Sequence[tuple[str, Any]] = (),
        tls_server_name: str | None = None,
        read_your_writes: bool = False,
    ) -> None:
        """``tls_server_name``: the name to verify the server's certificate for, when it differs from
        the target's host (e.g. connecting to 127.0.0.1 to a certificate for gateway.example.com).

        ``read_your_writes``: every generate, score and trace that pins no version carries the
        newest version this client's own edits made (ApplyEdit, ApplyEdits, ImportEdits) as
        ``min_edit_version``, so that a replica behind a load balancer that has not followed that
        edit yet waits for it (up to the call's deadline and the server's max_version_wait) instead
        of answering from before it. ``written_version`` holds it (0: no edit yet)."""
        self.target = target
        self.timeout = timeout
        self.read_your_writes = read_your_writes
        self.written_version = 0
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        name = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        self._channel_args = (credentials, [
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            *name,
            *options,
        ])

    def _kw(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self._metadata}

    def _reads(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with this client's written version as min_edit_version, when it reads its writes
        and the call pins no version of its own."""
        unpinned = params.get("edit_version") is None and params.get("min_edit_version") is None
        if self.read_your_writes and self.written_version and unpinned:
            return {**params, "min_edit_version": self.written_version}
        return params

    def _wrote(self, version: int) -> None:
        self.written_version = max(self.written_version, version)

    def _applied(self, result: ApplyResult) -> ApplyResult:
        if not result.dry_run:
            self._wrote(result.head_version)
        return result

    def _imported(self, infos: list[EditInfo]) -> list[EditInfo]:
        for info in infos:
            self._wrote(info.version)
        return infos


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
        call = self.stub.Generate(generate_request(prompt, **self._reads(params)), **self._kw(timeout))
        try:
            for message in call:
                yield GenerateChunk.from_pb(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()  # a no-op once the stream has ended; frees the server when abandoned

    def generate_text(self, prompt: str, *, timeout: float | None = None, **params: Any) -> Completion:
        return Completion.join(list(self.generate(prompt, timeout=timeout, **params)))

    def score(
        self, prompt: str, continuations: Sequence[str], *, timeout: float | None = None, **pin: int | None
    ) -> ScoreResult:
        """Log-probabilities of the continuations. ``edit_version=`` / ``min_edit_version=`` as for generate."""
        req = score_request(prompt, continuations, **self._reads(pin))
        return ScoreResult.from_pb(self._unary(self.stub.Score, req, timeout))

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return ModelInfo.from_pb(self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """The health status name: SERVING, NOT_SERVING, ..."""
        reply = self._unary(self._health_check, HealthCheckRequest(service=service), timeout)
        return STATUS_NAMES.get(reply.status, str(reply.status))

    # -- edits ----------------------------------------------------------------

    def apply_edit(self, prompt: str, subject: str, target: str, *, timeout: float | None = None,
                   **options: Any) -> ApplyResult:
        """Rewrite a fact. Options: layer, hparams, dry_run, expected_version, author, comment, force
        (apply even when the target already is the model's greedy answer; else FailedPrecondition),
        min_target_prob (refuse an edit that did not take; default: the server's), method ("rome",
        "memit", "projected", "ft", "gated"; default: the server's)."""
        req = apply_edit_request(prompt, subject, target, **options)
        return self._applied(ApplyResult.from_pb(self._unary(self.stub.ApplyEdit, req, timeout)))

    def apply_edits(self, facts: Sequence[Sequence[str]], *, timeout: float | None = None,
                    **options: Any) -> ApplyResult:
        """Rewrite several facts, (prompt, subject, target) each, as ONE layer and one version
        (method "memit", "projected" or "gated"). Options as apply_edit's."""
        reply = self._unary(self.stub.ApplyEdits, apply_edits_request(facts, **options), timeout)
        return self._applied(ApplyResult.from_pb(reply))

    def revert_edit(self, *, to_version: int | None = None, edit_id: str | None = None, author: str = "",
                    comment: str = "", timeout: float | None = None) -> RevertResult:
        req = revert_edit_request(to_version=to_version, edit_id=edit_id, author=author, comment=comment)
        reply = self._unary(self.stub.RevertEdit, req, timeout)
        return RevertResult(reply.head_version, tuple(reply.removed_edit_ids), reply.active_layers, reply.seconds)

    def list_edits(self, *, page_size: int = 0, page_token: str = "", include_inactive: bool = False,
                   timeout: float | None = None) -> EditPage:
        req = pb.ListEditsRequest(page_size=page_size, page_token=page_token, include_inactive=include_inactive)
        reply = self._unary(self.stub.ListEdits, req, timeout)
        return EditPage(tuple(EditInfo.from_pb(e) for e in reply.edits), reply.next_page_token, reply.head_version)

    def get_edit(self, edit_id: str, *, timeout: float | None = None) -> EditInfo:
        return EditInfo.from_pb(self._unary(self.stub.GetEdit, pb.GetEditRequest(edit_id=edit_id), timeout))

    def export_edits(self, from_version: int = 0, to_version: int | None = None, *,
                     timeout: float | None = None) -> list[LayerFile]:
        req = pb.ExportEditsRequest(from_version=from_version)
        if to_version is not None:
            req.to_version = to_version
        try:
            return [_layer_file(m) for m in self.stub.ExportEdits(req, **self._kw(timeout))]
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def import_edits(self, files: Sequence[LayerFile], *, timeout: float | None = None) -> list[EditInfo]:
        messages = iter([_layer_file_pb(f) for f in files])
        reply = self._unary(self.stub.ImportEdits, messages, timeout)
        return self._imported([EditInfo.from_pb(e) for e in reply.imported])

    # -- tracing --------------------------------------------------------------

    def trace(self, prompt: str, subject: str, *, timeout: float | None = None,
              **options: Any) -> Iterator[TraceProgress | TraceResult]:
        """Progress messages, then one TraceResult. Options: answer, kind, noise, samples, window, seed,
        edit_version, min_edit_version."""
        call = self.stub.Trace(trace_request(prompt, subject, **self._reads(options)), **self._kw(timeout))
        try:
            for m in call:
                yield _trace_event(m)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    def trace_result(self, prompt: str, subject: str, *, timeout: float | None = None, **options: Any) -> TraceResult:
        result = None
        for event in self.trace(prompt, subject, timeout=timeout, **options):
            if isinstance(event, TraceResult):
                result = event
        if result is None:
            raise GatewayError("the Trace stream ended without a result")
        return result

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
        call = self.stub.Generate(generate_request(prompt, **self._reads(params)), **self._kw(timeout))
        try:
            async for message in call:
                yield GenerateChunk.from_pb(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def generate_text(self, prompt: str, *, timeout: float | None = None, **params: Any) -> Completion:
        return Completion.join([c async for c in self.generate(prompt, timeout=timeout, **params)])

    async def score(
        self, prompt: str, continuations: Sequence[str], *, timeout: float | None = None, **pin: int | None
    ) -> ScoreResult:
        req = score_request(prompt, continuations, **self._reads(pin))
        return ScoreResult.from_pb(await self._unary(self.stub.Score, req, timeout))

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return ModelInfo.from_pb(await self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    async def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        reply = await self._unary(self._health_check, HealthCheckRequest(service=service), timeout)
        return STATUS_NAMES.get(reply.status, str(reply.status))

    # -- edits ----------------------------------------------------------------

    async def apply_edit(self, prompt: str, subject: str, target: str, *, timeout: float | None = None,
                         **options: Any) -> ApplyResult:
        req = apply_edit_request(prompt, subject, target, **options)
        return self._applied(ApplyResult.from_pb(await self._unary(self.stub.ApplyEdit, req, timeout)))

    async def apply_edits(self, facts: Sequence[Sequence[str]], *, timeout: float | None = None,
                          **options: Any) -> ApplyResult:
        reply = await self._unary(self.stub.ApplyEdits, apply_edits_request(facts, **options), timeout)
        return self._applied(ApplyResult.from_pb(reply))

    async def revert_edit(self, *, to_version: int | None = None, edit_id: str | None = None, author: str = "",
                          comment: str = "", timeout: float | None = None) -> RevertResult:
        req = revert_edit_request(to_version=to_version, edit_id=edit_id, author=author, comment=comment)
        reply = await self._unary(self.stub.RevertEdit, req, timeout)
        return RevertResult(reply.head_version, tuple(reply.removed_edit_ids), reply.active_layers, reply.seconds)

    async def list_edits(self, *, page_size: int = 0, page_token: str = "", include_inactive: bool = False,
                         timeout: float | None = None) -> EditPage:
        req = pb.ListEditsRequest(page_size=page_size, page_token=page_token, include_inactive=include_inactive)
        reply = await self._unary(self.stub.ListEdits, req, timeout)
        return EditPage(tuple(EditInfo.from_pb(e) for e in reply.edits), reply.next_page_token, reply.head_version)

    async def get_edit(self, edit_id: str, *, timeout: float | None = None) -> EditInfo:
        return EditInfo.from_pb(await self._unary(self.stub.GetEdit, pb.GetEditRequest(edit_id=edit_id), timeout))

    async def trace_result(self, prompt: str, subject: str, *, timeout: float | None = None,
                           **options: Any) -> TraceResult:
        call = self.stub.Trace(trace_request(prompt, subject, **self._reads(options)), **self._kw(timeout))
        result = None
        try:
            async for m in call:
                event = _trace_event(m)
                if isinstance(event, TraceResult):
                    result = event
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        if result is None:
            raise GatewayError("the Trace stream ended without a result")
        return result

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, **self._kw(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
