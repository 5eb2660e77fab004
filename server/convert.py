"""All translation between protobuf messages and engine types lives here."""

from __future__ import annotations

import json

from rome_engine.engine import EngineInfo, TraceEvent, TraceProgress
from rome_engine.errors import InvalidRequest
from rome_engine.generation import (
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationChunk,
    SamplingParams,
)
from rome_engine.records import (
    ApplyOptions,
    EditView,
    ManifestEntry,
    Probabilities,
    RevertRequest,
    StoredRequest,
    VersionPin,
)
from rome_engine.rome.request import EditRequest
from rome_engine.scoring import ContinuationScore
from rome_engine.tracing import KINDS, TraceRequest
from romegw_client.pb import gateway_pb2 as pb

_FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FINISH_LENGTH: pb.FINISH_REASON_LENGTH,
    FINISH_STOP: pb.FINISH_REASON_STOP,
    FINISH_EOS: pb.FINISH_REASON_EOS,
    FINISH_CANCELLED: pb.FINISH_REASON_CANCELLED,
}


def sampling_params(req: pb.GenerateRequest, default_max_new_tokens: int) -> SamplingParams:
    """Unset optional fields take the engine's defaults; range checks are the engine's."""
    return SamplingParams(
        max_new_tokens=req.max_new_tokens if req.HasField("max_new_tokens") else default_max_new_tokens,
        temperature=req.temperature if req.HasField("temperature") else 0.0,
        top_p=req.top_p if req.HasField("top_p") else 1.0,
        top_k=req.top_k if req.HasField("top_k") else 0,
        seed=req.seed if req.HasField("seed") else None,
        stop=tuple(req.stop),
        logprobs=req.logprobs or req.top_logprobs > 0,
        top_logprobs=req.top_logprobs,
    )


def generate_response(chunk: GenerationChunk) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        text=chunk.text,
        token_ids=chunk.token_ids,
        finish_reason=_FINISH[chunk.finish_reason],
        edit_version=chunk.edit_version,
    )
    for t in chunk.tokens:
        msg.tokens.add(
            token_id=t.token_id,
            text=t.text,
            logprob=t.logprob,
            top_logprobs=[pb.TokenLogprob(token_id=a.token_id, text=a.text, logprob=a.logprob) for a in t.top],
        )
    if chunk.finish_reason is not None:
        msg.usage.prompt_tokens = chunk.prompt_tokens
        msg.usage.completion_tokens = chunk.completion_tokens
    return msg


def score_response(scores: list[ContinuationScore], edit_version: int) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        scores=[
            pb.ContinuationScore(
                continuation=s.continuation,
                total_logprob=s.total_logprob,
                mean_logprob=s.mean_logprob,
                tokens=[pb.TokenScore(token_id=t.token_id, text=t.text, logprob=t.logprob) for t in s.tokens],
            )
            for s in scores
        ],
        edit_version=edit_version,
    )


def model_info(info: EngineInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        model_id=info.model_id,
        family=info.family,
        architecture=info.architecture,
        dtype=info.dtype,
        device=info.device,
        num_parameters=info.num_parameters,
        num_layers=info.num_layers,
        hidden_size=info.hidden_size,
        vocab_size=info.vocab_size,
        head_version=info.head_version,
        active_layers=info.active_layers,
        max_prompt_tokens=info.max_prompt_tokens,
        max_new_tokens=info.limits.max_new_tokens,
        max_concurrent_streams=info.limits.max_concurrent_streams,
        load_seconds=info.load_seconds,
        server_version=info.version,
        active_streams=info.active_streams,
        known_version=info.known_version,
        default_edit_method=info.default_edit_method,
        versions_in_use=[
            pb.VersionUse(version=v, requests=n) for v, n in sorted(info.versions_in_use.items(), reverse=True)
        ],
    )


def version_pin(request: pb.GenerateRequest | pb.ScoreRequest | pb.TraceRequest, time_left: float | None) -> VersionPin:
    """The request's edit_version / min_edit_version (unset: None), waiting at most its time left."""
    return VersionPin(
        edit_version=request.edit_version if request.HasField("edit_version") else None,
        min_edit_version=request.min_edit_version if request.HasField("min_edit_version") else None,
        wait_seconds=time_left,
    )


# ------------------------------------------------------------------- edits


def edit_request(spec: pb.EditSpec) -> EditRequest:
    """The engine's request; its constructor checks the fields (InvalidRequest)."""
    return EditRequest(
        prompt=spec.prompt,
        subject=spec.subject,
        target=spec.target,
        layer=spec.layer if spec.HasField("layer") else None,
        hparams=dict(spec.hparams),
    )


def apply_options(req: pb.ApplyEditRequest | pb.ApplyEditsRequest) -> ApplyOptions:
    return ApplyOptions(
        dry_run=req.dry_run,
        expected_version=req.expected_version if req.HasField("expected_version") else None,
        author=req.author,
        comment=req.comment,
        force=req.force,
        min_target_prob=req.min_target_prob if req.HasField("min_target_prob") else None,
        method=req.method,
    )


def revert_request(req: pb.RevertEditRequest) -> RevertRequest:
    target = req.WhichOneof("target")
    if target is None:
        raise InvalidRequest("set to_version (a version to return to) or edit_id (one layer to remove)")
    return RevertRequest(
        to_version=req.to_version if target == "to_version" else None,
        edit_id=req.edit_id if target == "edit_id" else None,
        author=req.author,
        comment=req.comment,
    )


def edit_spec(fact: StoredRequest) -> pb.EditSpec:
    return pb.EditSpec(
        prompt=fact.prompt,
        subject=fact.subject,
        target=fact.target,
        layer=fact.layer,
        hparams={k: float(v) for k, v in fact.hparams.items() if v is not None},
    )


def fact_probabilities(p: Probabilities) -> pb.FactProbabilities:
    return pb.FactProbabilities(
        target_before=p.target_before, target_after=p.target_after, old_before=p.old_before, old_after=p.old_after,
        old_object=p.old_object,
    )  # fmt: skip


def edit_layer(view: EditView) -> pb.EditLayer:
    h = view.header
    return pb.EditLayer(
        edit_id=h.edit_id,
        version=view.version,
        parent_version=view.parent_version,
        created_at=h.created_at,
        author=h.author,
        comment=h.comment,
        edit=edit_spec(h.request),
        layer=h.layer,
        matrices=[
            pb.TouchedMatrix(name=m.name, shape=m.shape, update_norm=m.update_norm, rank=m.rank, keys=m.keys)
            for m in h.matrices
        ],
        probabilities=fact_probabilities(h.fact_probabilities),
        compute_seconds=h.compute_seconds,
        active=view.active,
        header_json=json.dumps(h.to_json(), sort_keys=True),
        method=h.method,
        facts=[edit_spec(f) for f in h.facts],
        fact_probabilities=[fact_probabilities(p) for p in h.probabilities],
        layers=h.layers,
    )


def layer_file(entry: ManifestEntry, data: bytes) -> pb.EditLayerFile:
    return pb.EditLayerFile(
        filename=(entry.file or "").rsplit("/", 1)[-1],
        content=data,
        version=entry.version,
        edit_id=entry.edit_id or "",
        sha256=entry.sha256 or "",
    )


# ------------------------------------------------------------------- trace

# the engine's kinds on the wire, by the enum's names: "mlp" -> TRACE_KIND_MLP
_KIND_PB = {kind: pb.TraceKind.Value(f"TRACE_KIND_{kind.upper()}") for kind in KINDS}
_PB_KIND = {number: kind for kind, number in _KIND_PB.items()} | {pb.TRACE_KIND_UNSPECIFIED: "hidden"}


def trace_request(req: pb.TraceRequest) -> TraceRequest:
    if req.kind not in _PB_KIND:
        raise InvalidRequest(f"unknown trace kind {req.kind}: use {', '.join(KINDS[:-1])} or {KINDS[-1]}")
    return TraceRequest(
        prompt=req.prompt,
        subject=req.subject,
        answer=req.answer if req.HasField("answer") else None,
        kind=_PB_KIND[req.kind],
        noise=req.noise if req.HasField("noise") else None,
        samples=req.samples if req.HasField("samples") else 10,
        window=req.window if req.HasField("window") else 10,
        seed=req.seed if req.HasField("seed") else 0,
    )


def trace_event(event: TraceEvent) -> pb.TraceResponse:
    if isinstance(event, TraceProgress):
        return pb.TraceResponse(
            progress=pb.TraceProgress(
                done=event.done, total=event.total, message=f"{event.done}/{event.total} cells restored"
            )
        )
    r = event.result
    return pb.TraceResponse(
        result=pb.TraceResult(
            tokens=r.tokens,
            subject_start=r.subject_range[0],
            subject_end=r.subject_range[1],
            answer=r.answer,
            answer_token_id=r.answer_id,
            clean_prob=r.clean_prob,
            corrupted_prob=r.corrupted_prob,
            num_layers=int(r.scores.shape[1]),
            scores=r.scores.reshape(-1).tolist(),
            kind=_KIND_PB[r.kind],
            noise=r.noise,
            samples=r.samples,
            window=r.window,
            edit_version=event.edit_version,
            seconds=r.seconds,
        )
    )
