"""All translation between protobuf messages and engine types lives here."""

from __future__ import annotations

from rome_engine.engine import EngineInfo
from rome_engine.generation import (
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationChunk,
    SamplingParams,
)
from rome_engine.scoring import ContinuationScore
from romegw_client._pb import gateway_pb2 as pb

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
    )
