"""Plain Python views of the gateway's replies (no protobuf needed by callers)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._pb import gateway_pb2 as pb

FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class GeneratedToken:
    token_id: int
    text: str
    logprob: float
    top_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class GenerateChunk:
    """One message of a Generate stream; the last has ``finish_reason`` set."""

    text: str
    token_ids: tuple[int, ...]
    tokens: tuple[GeneratedToken, ...] = ()
    finish_reason: str | None = None  # "length", "stop", "eos", "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    edit_version: int = 0

    @classmethod
    def from_pb(cls, m: pb.GenerateResponse) -> GenerateChunk:
        return cls(
            text=m.text,
            token_ids=tuple(m.token_ids),
            tokens=tuple(
                GeneratedToken(
                    t.token_id,
                    t.text,
                    t.logprob,
                    tuple(TokenLogprob(a.token_id, a.text, a.logprob) for a in t.top_logprobs),
                )
                for t in m.tokens
            ),
            finish_reason=FINISH_REASONS.get(m.finish_reason),
            prompt_tokens=m.usage.prompt_tokens,
            completion_tokens=m.usage.completion_tokens,
            edit_version=m.edit_version,
        )


@dataclass(frozen=True)
class Completion:
    """A whole Generate stream, joined."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    edit_version: int
    tokens: tuple[GeneratedToken, ...] = ()

    @classmethod
    def join(cls, chunks: list[GenerateChunk]) -> Completion:
        last = chunks[-1]
        return cls(
            text="".join(c.text for c in chunks),
            token_ids=tuple(i for c in chunks for i in c.token_ids),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            edit_version=last.edit_version,
            tokens=tuple(t for c in chunks for t in c.tokens),
        )


@dataclass(frozen=True)
class ContinuationScore:
    continuation: str
    total_logprob: float
    mean_logprob: float
    tokens: tuple[TokenLogprob, ...]

    @classmethod
    def from_pb(cls, m: pb.ContinuationScore) -> ContinuationScore:
        return cls(
            m.continuation,
            m.total_logprob,
            m.mean_logprob,
            tuple(TokenLogprob(t.token_id, t.text, t.logprob) for t in m.tokens),
        )


@dataclass(frozen=True)
class ScoreResult:
    scores: tuple[ContinuationScore, ...]
    edit_version: int

    @classmethod
    def from_pb(cls, m: pb.ScoreResponse) -> ScoreResult:
        return cls(tuple(ContinuationScore.from_pb(s) for s in m.scores), m.edit_version)

    def best(self) -> ContinuationScore:
        """The continuation with the highest total log-probability."""
        return max(self.scores, key=lambda s: s.total_logprob)


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    family: str
    architecture: str
    dtype: str
    device: str
    num_parameters: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    head_version: int
    active_layers: int
    max_prompt_tokens: int
    max_new_tokens: int
    max_concurrent_streams: int
    load_seconds: float
    server_version: str
    active_streams: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_pb(cls, m: pb.ModelInfo) -> ModelInfo:
        return cls(
            model_id=m.model_id,
            family=m.family,
            architecture=m.architecture,
            dtype=m.dtype,
            device=m.device,
            num_parameters=m.num_parameters,
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            vocab_size=m.vocab_size,
            head_version=m.head_version,
            active_layers=m.active_layers,
            max_prompt_tokens=m.max_prompt_tokens,
            max_new_tokens=m.max_new_tokens,
            max_concurrent_streams=m.max_concurrent_streams,
            load_seconds=m.load_seconds,
            server_version=m.server_version,
            active_streams=m.active_streams,
        )
