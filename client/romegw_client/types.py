"""Plain Python views of the gateway's replies (no protobuf needed by callers)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .pb import gateway_pb2 as pb

# trace kinds by the wire enum's names, in its order: "mlp" <-> TRACE_KIND_MLP (UNSPECIFIED: the server's default)
TRACE_KINDS: dict[str, int] = {
    name.removeprefix("TRACE_KIND_").lower(): number
    for name, number in pb.TraceKind.items()
    if number != pb.TRACE_KIND_UNSPECIFIED
}
_TRACE_KIND_NAMES = {number: name for name, number in TRACE_KINDS.items()}

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
    known_version: int = 0  # the newest version of the history the server knows
    versions_in_use: dict[int, int] = field(default_factory=dict)  # version -> requests running on it
    default_edit_method: str = ""  # how an edit that names no method is computed
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
            known_version=m.known_version,
            versions_in_use={u.version: u.requests for u in m.versions_in_use},
            default_edit_method=m.default_edit_method,
        )


@dataclass(frozen=True)
class EditInfo:
    """One edit layer: what was changed, by whom, when, and whether it is live."""

    edit_id: str
    version: int
    parent_version: int
    created_at: str
    author: str
    comment: str
    prompt: str
    subject: str
    target: str
    layer: int
    matrices: tuple[tuple[str, tuple[int, ...], float], ...]  # (name, shape, update norm)
    target_before: float
    target_after: float
    old_object: str
    old_before: float
    old_after: float
    compute_seconds: float
    active: bool
    header: dict
    method: str = "rome"
    layers: tuple[int, ...] = ()  # every edited block (MEMIT: a range)
    facts: tuple[FactInfo, ...] = ()  # every fact of the layer (the fields above are the first's)

    @classmethod
    def from_pb(cls, m: pb.EditLayer) -> EditInfo:
        import json

        p = m.probabilities
        return cls(
            edit_id=m.edit_id,
            version=m.version,
            parent_version=m.parent_version,
            created_at=m.created_at,
            author=m.author,
            comment=m.comment,
            prompt=m.edit.prompt,
            subject=m.edit.subject,
            target=m.edit.target,
            layer=m.layer,
            matrices=tuple((x.name, tuple(x.shape), x.update_norm) for x in m.matrices),
            target_before=p.target_before,
            target_after=p.target_after,
            old_object=p.old_object,
            old_before=p.old_before,
            old_after=p.old_after,
            compute_seconds=m.compute_seconds,
            active=m.active,
            header=json.loads(m.header_json) if m.header_json else {},
            method=m.method or "rome",
            layers=tuple(m.layers),
            facts=tuple(FactInfo.from_pb(f, p) for f, p in zip(m.facts, m.fact_probabilities, strict=False)),
        )


@dataclass(frozen=True)
class FactInfo:
    """One fact of an edit layer and what the edit did to it."""

    prompt: str
    subject: str
    target: str
    target_before: float
    target_after: float
    old_object: str

    @classmethod
    def from_pb(cls, spec: pb.EditSpec, p: pb.FactProbabilities) -> FactInfo:
        return cls(spec.prompt, spec.subject, spec.target, p.target_before, p.target_after, p.old_object)


@dataclass(frozen=True)
class ApplyResult:
    edit: EditInfo
    head_version: int
    dry_run: bool
    min_target_prob: float = 0.0  # the threshold the server applied
    below_min_target_prob: bool = False  # a dry run's edit would be refused for not taking

    @classmethod
    def from_pb(cls, m: pb.ApplyEditResponse) -> ApplyResult:
        return cls(EditInfo.from_pb(m.layer), m.head_version, m.dry_run, m.min_target_prob, m.below_min_target_prob)


@dataclass(frozen=True)
class RevertResult:
    head_version: int
    removed_edit_ids: tuple[str, ...]
    active_layers: int
    seconds: float


@dataclass(frozen=True)
class EditPage:
    edits: tuple[EditInfo, ...]
    next_page_token: str
    head_version: int


@dataclass(frozen=True)
class LayerFile:
    """An exported layer file (safetensors bytes), ready to import elsewhere or save to disk."""

    filename: str
    content: bytes
    version: int
    edit_id: str
    sha256: str


@dataclass(frozen=True)
class TraceProgress:
    done: int
    total: int
    message: str


@dataclass(frozen=True)
class TraceResult:
    tokens: tuple[str, ...]
    subject_range: tuple[int, int]
    answer: str
    answer_token_id: int
    clean_prob: float
    corrupted_prob: float
    num_layers: int
    scores: tuple[tuple[float, ...], ...]  # [tokens][layers] restored probabilities
    kind: str
    noise: float
    samples: int
    window: int
    edit_version: int
    seconds: float

    @classmethod
    def from_pb(cls, m: pb.TraceResult) -> TraceResult:
        n = m.num_layers
        flat = list(m.scores)
        return cls(
            tokens=tuple(m.tokens),
            subject_range=(m.subject_start, m.subject_end),
            answer=m.answer,
            answer_token_id=m.answer_token_id,
            clean_prob=m.clean_prob,
            corrupted_prob=m.corrupted_prob,
            num_layers=n,
            scores=tuple(tuple(flat[i * n : (i + 1) * n]) for i in range(len(m.tokens))),
            kind=_TRACE_KIND_NAMES.get(m.kind, "hidden"),
            noise=m.noise,
            samples=m.samples,
            window=m.window,
            edit_version=m.edit_version,
            seconds=m.seconds,
        )

    @property
    def peak(self) -> tuple[int, int]:
        """(token index, layer) of the largest restored probability."""
        best = max(
            ((t, layer) for t in range(len(self.tokens)) for layer in range(self.num_layers)),
            key=lambda tl: self.scores[tl[0]][tl[1]],
        )
        return best
