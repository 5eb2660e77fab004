"""The RPC handlers: decode the request, call the engine, encode the reply."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from rome_engine.engine import Engine
from romegw_client._pb import gateway_pb2 as pb
from romegw_client._pb import gateway_pb2_grpc as pb_grpc

from . import convert


class RomeGatewayServicer(pb_grpc.RomeGatewayServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def Generate(  # noqa: N802 - gRPC method names
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        params = convert.sampling_params(request, self.engine.limits.default_max_new_tokens)
        async for chunk in self.engine.generate(request.prompt, params):
            yield convert.generate_response(chunk)

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:  # noqa: N802
        scores = await self.engine.score(request.prompt, list(request.continuations))
        return convert.score_response(scores, self.engine.edit_version)

    async def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return convert.model_info(self.engine.info())

    # -- RPCs of later milestones: a clear UNIMPLEMENTED until they land ------

    async def _unimplemented(self, context: grpc.aio.ServicerContext, name: str) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented by this server version yet")

    async def Trace(self, request, context):  # noqa: N802, ANN001, ANN201
        await self._unimplemented(context, "Trace")
        yield pb.TraceResponse()  # pragma: no cover - unreachable, makes this an async generator

    async def ApplyEdit(self, request, context):  # noqa: N802, ANN001, ANN201
        await self._unimplemented(context, "ApplyEdit")

    async def RevertEdit(self, request, context):  # noqa: N802, ANN001, ANN201
        await self._unimplemented(context, "RevertEdit")

    async def ListEdits(self, request, context):  # noqa: N802, ANN001, ANN201
        await self._unimplemented(context, "ListEdits")

    async def GetEdit(self, request, context):  # noqa: N802, ANN001, ANN201
        await self._unimplemented(context, "GetEdit")

    async def ExportEdits(self, request, context):  # noqa: N802, ANN001, ANN201
        await self._unimplemented(context, "ExportEdits")
        yield pb.EditLayerFile()  # pragma: no cover

    async def ImportEdits(self, request_iterator, context):  # noqa: N802, ANN001, ANN201
        await self._unimplemented(context, "ImportEdits")
