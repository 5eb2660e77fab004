"""The RPC handlers: decode the request, call the engine, encode the reply.

Every user string that is stored (an edit's author, comment, prompt, subject,
target) is checked against its limit here, before the engine computes
anything; every string written to the audit log is clipped. ListEdits pages
by encoded size as well as by count, so no history makes a reply larger than
the message limit.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from rome_engine.bounds import MAX_AUTHOR_CHARS, MAX_COMMENT_CHARS, check_text, clip
from rome_engine.engine import TraceDone
from rome_engine.engine_edits import below_min_target_prob
from rome_engine.errors import InvalidRequest
from rome_engine.protocol import EngineClient
from rome_engine.records import EditView
from romegw_client.pb import gateway_pb2 as pb
from romegw_client.pb import gateway_pb2_grpc as pb_grpc

from . import convert
from .interceptors import caller
from .metrics import Metrics, StreamTimer

audit = logging.getLogger("romegw.audit")

# the default byte budget of one ListEdits page (the server passes a fraction of its message limit)
DEFAULT_PAGE_BYTES = 1024 * 1024


def check_authorship(author: str, comment: str) -> None:
    """The author and comment a mutating RPC stores, against their limits (InvalidRequest)."""
    check_text("author", author, MAX_AUTHOR_CHARS)
    check_text("comment", comment, MAX_COMMENT_CHARS)


def echoable(view: EditView) -> EditView:
    """``view``, with an over-long author or comment (stored before the limits existed) clipped.

    The stored layer is left as it is; only the echo is cut, so such a history stays listable.
    """
    h = view.header
    if len(h.author) <= MAX_AUTHOR_CHARS and len(h.comment) <= MAX_COMMENT_CHARS:
        return view
    header = replace(h, author=clip(h.author, MAX_AUTHOR_CHARS), comment=clip(h.comment, MAX_COMMENT_CHARS))
    return replace(view, header=header)


def edit_page(views: list[EditView], start: int, count: int, max_bytes: int) -> tuple[list[pb.EditLayer], int]:
    """The layers of one page from ``start``: at most ``count``, and no more than ``max_bytes`` encoded
    (but always one, so paging moves on). Returns them and the index after the last one."""
    page: list[pb.EditLayer] = []
    used = 0
    for view in views[start : start + count]:
        layer = convert.edit_layer(echoable(view))
        size = layer.ByteSize() + 8  # + the repeated field's tag and length prefix
        if page and used + size > max_bytes:
            break
        page.append(layer)
        used += size
    return page, start + len(page)


class RomeGatewayServicer(pb_grpc.RomeGatewayServicer):
    def __init__(
        self, engine: EngineClient, metrics: Metrics | None = None, *, page_bytes: int = DEFAULT_PAGE_BYTES
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.page_bytes = page_bytes  # byte budget of one ListEdits page

    def _audit(self, what: str, before: int, **detail: object) -> None:
        """One line per mutating RPC: who, what, the version before and after (user strings clipped)."""
        extra = " ".join(f"{k}={clip(repr(v))}" for k, v in detail.items())
        audit.info(
            "who=%s what=%s version_before=%d version_after=%d %s",
            caller.get(),
            what,
            before,
            self.engine.edit_version,
            extra,
        )

    async def Generate(  # CamelCase: the gRPC method names
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        params = convert.sampling_params(request, self.engine.limits.default_max_new_tokens)
        timer = StreamTimer(self.metrics)
        pin = convert.version_pin(request, context.time_remaining())
        async for chunk in self.engine.generate(request.prompt, params, pin):
            timer.token(len(chunk.token_ids))
            if chunk.finish_reason is not None:
                timer.done(chunk.prompt_tokens)
            yield convert.generate_response(chunk)

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        pin = convert.version_pin(request, context.time_remaining())
        scores, version = await self.engine.score(request.prompt, list(request.continuations), pin)
        return convert.score_response(scores, version)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return convert.model_info(self.engine.info())

    # -- edits ----------------------------------------------------------------

    async def ApplyEdit(
        self, request: pb.ApplyEditRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApplyEditResponse:
        return await self._apply("ApplyEdit", [request.edit], request)

    async def ApplyEdits(
        self, request: pb.ApplyEditsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApplyEditResponse:
        limit = self.engine.limits.max_batch_facts
        if not 0 < len(request.edits) <= limit:  # before any text is read
            raise InvalidRequest(f"ApplyEdits takes 1 to max_batch_facts={limit} edits, got {len(request.edits)}")
        return await self._apply("ApplyEdits", list(request.edits), request)

    async def _apply(
        self, rpc: str, specs: list[pb.EditSpec], request: pb.ApplyEditRequest | pb.ApplyEditsRequest
    ) -> pb.ApplyEditResponse:
        check_authorship(request.author, request.comment)  # before the (slow) computation
        for spec in specs:
            self.engine.check_edit_chars(spec.prompt, spec.subject, spec.target)
        options = convert.apply_options(request)
        threshold = self.engine.min_target_prob(options)  # InvalidRequest before anything is computed
        before = self.engine.edit_version

        def committed(view: EditView) -> None:  # inside the engine's commit: even if the caller has gone
            if self.metrics is not None:
                self.metrics.edits_applied.inc()
            self._audit(
                rpc, before, edit_id=view.edit_id, method=view.header.method, facts=len(specs),
                subject=specs[0].subject, target=specs[0].target, author=request.author, comment=request.comment,
            )  # fmt: skip

        requests = [convert.edit_request(spec) for spec in specs]
        view, head = await self.engine.apply_edits(requests, options, on_commit=committed)
        if self.metrics is not None:
            self.metrics.edit_compute.observe(view.header.compute_seconds)
            source = "cache" if view.header.covariance_from_cache else "computed"
            self.metrics.covariance.labels(source).inc()
        return pb.ApplyEditResponse(
            layer=convert.edit_layer(echoable(view)), dry_run=request.dry_run, head_version=head,
            min_target_prob=threshold, below_min_target_prob=below_min_target_prob(view.header, threshold) is not None,
        )  # fmt: skip

    async def RevertEdit(
        self, request: pb.RevertEditRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevertEditResponse:
        revert = convert.revert_request(request)
        check_authorship(request.author, request.comment)
        before = self.engine.edit_version

        def committed(_version: int, removed: list[str]) -> None:  # inside the engine's commit
            if self.metrics is not None:
                self.metrics.edits_reverted.inc()
            self._audit(
                "RevertEdit", before, target=request.WhichOneof("target"), removed=removed, author=request.author,
                comment=request.comment,
            )

        version, removed, seconds = await self.engine.revert_edit(revert, on_commit=committed)
        return pb.RevertEditResponse(
            head_version=version, removed_edit_ids=removed, active_layers=self.engine.active_layers, seconds=seconds
        )

    async def ListEdits(
        self, request: pb.ListEditsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListEditsResponse:
        size = request.page_size or 50
        if not 0 < size <= 1000:
            raise InvalidRequest(f"page_size must be in [1, 1000], got {request.page_size}")
        try:
            token = request.page_token or "0"
            if not (token.isascii() and token.isdigit() and len(token) <= 12):  # no sign, space or "_"
                raise ValueError(token)
            start = int(token)
        except ValueError:
            raise InvalidRequest(f"page_token {clip(request.page_token)!r} is not one this server gave out") from None
        views = await self.engine.list_edits(include_inactive=request.include_inactive)
        page, end = edit_page(views, start, size, self.page_bytes)
        return pb.ListEditsResponse(
            edits=page, next_page_token=str(end) if end < len(views) else "", head_version=self.engine.edit_version
        )

    async def GetEdit(self, request: pb.GetEditRequest, context: grpc.aio.ServicerContext) -> pb.EditLayer:
        return convert.edit_layer(echoable(await self.engine.get_edit(request.edit_id)))

    async def ExportEdits(
        self, request: pb.ExportEditsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EditLayerFile]:
        to_version = request.to_version if request.HasField("to_version") else None
        for entry, data in await self.engine.export_edits(request.from_version, to_version):
            yield convert.layer_file(entry, data)

    async def ImportEdits(
        self, request_iterator: AsyncIterator[pb.EditLayerFile], context: grpc.aio.ServicerContext
    ) -> pb.ImportEditsResponse:
        # checked one by one as they arrive: a bad file or a stream past the limits stops the reading
        files = ((m.content, m.sha256 or None) async for m in request_iterator)
        before = self.engine.edit_version

        def committed(views: list[EditView]) -> None:  # inside the engine's commit
            if self.metrics is not None:
                self.metrics.edits_applied.inc(len(views))
            self._audit("ImportEdits", before, edit_ids=[v.edit_id for v in views])

        views = await self.engine.import_edits(files, on_commit=committed)
        return pb.ImportEditsResponse(
            imported=[convert.edit_layer(v) for v in views], head_version=self.engine.edit_version
        )

    # -- tracing --------------------------------------------------------------

    async def Trace(
        self, request: pb.TraceRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TraceResponse]:
        pin = convert.version_pin(request, context.time_remaining())
        async for event in self.engine.trace(convert.trace_request(request), pin):
            if self.metrics is not None and isinstance(event, TraceDone):
                self.metrics.trace_seconds.observe(event.result.seconds)
                self.metrics.trace_forward_passes.inc(event.result.forward_passes)
            yield convert.trace_event(event)
