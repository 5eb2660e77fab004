"""A fake engine for server tests: ``rome_engine.protocol.EngineClient`` with no model.

Replies are scripted, calls are recorded, and any method can be made to fail:

    fake = FakeEngine()
    fake.chunks = [GenerationChunk("Hi"), ZeroDivisionError()]   # a stream that breaks after one chunk
    fake.errors["score"] = NotFound("no such thing")             # the next Score call raises it
    with ServerThread(fake) as srv, Client(srv.target) as c: ...
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from rome_engine.engine import EngineInfo, EngineLimits, TraceDone, TraceEvent, TraceProgress
from rome_engine.errors import InvalidRequest, NotFound
from rome_engine.generation import FINISH_LENGTH, GenerationChunk, SamplingParams
from rome_engine.records import (
    UNPINNED,
    ApplyOptions,
    BaseFingerprint,
    EditView,
    LayerHeader,
    ManifestEntry,
    MatrixRecord,
    Probabilities,
    RevertRequest,
    StoredRequest,
    VersionPin,
)
from rome_engine.rome.request import EditRequest
from rome_engine.scoring import ContinuationScore, TokenScore
from rome_engine.tracing import TraceRequest, TraceResult


def edit_view(
    edit_id: str, version: int, *, author: str = "", comment: str = "", active: bool = True, stored: bool = True
) -> EditView:
    """A layer as the engine shows it (the only place the fake builds a header)."""
    matrix = "model.layers.2.mlp.down_proj.weight"
    header = LayerHeader(
        edit_id=edit_id,
        version=version,
        parent_version=version - 1,
        created_at="2026-01-01T00:00:00Z",
        author=author,
        comment=comment,
        facts=(StoredRequest("{} lives in", f"Person {version}", f" City{version}", 2,
                             {"v_lr": 0.5, "clamp_norm_factor": 4}),),  # fmt: skip
        method="rome",
        layer=2,
        layers=(2,),
        matrices=(MatrixRecord(matrix, (64, 128), 1.5),),
        base_fingerprint=BaseFingerprint("fake", {matrix: "cd" * 32}),
        probabilities=(Probabilities(0.01, 0.9, 0.4, 0.05, " Rome"),),
        compute_seconds=0.25,
        covariance_from_cache=True,
        model_id="fake",
    )
    entry = ManifestEntry(
        op="apply", version=version, active=(), parent_version=version - 1, edit_id=edit_id,
        file=f"layers/{edit_id}.safetensors", sha256="ab" * 32,
    )  # fmt: skip
    return EditView(header, entry if stored else None, active)


def trace_result(kind: str = "hidden") -> TraceResult:
    return TraceResult(
        tokens=["The", " Eiffel", " Tower", " is"], subject_range=(1, 3), answer=" Paris", answer_id=42,
        clean_prob=0.8, corrupted_prob=0.1, scores=torch.arange(8, dtype=torch.float32).reshape(4, 2) / 10,
        kind=kind, noise=0.3, samples=10, window=10, seconds=0.5, forward_passes=81,
    )  # fmt: skip


@dataclass
class FakeEngine:
    limits: EngineLimits = field(default_factory=EngineLimits)
    edit_version: int = 0
    active_layers: int = 0
    active_streams: int = 0
    # scripted replies; an exception in a stream's list is raised at that point of the stream
    chunks: list[GenerationChunk | Exception] = field(default_factory=list)
    scores: list[ContinuationScore] = field(default_factory=list)
    trace_events: list[TraceEvent | Exception] = field(default_factory=list)
    views: list[EditView] = field(default_factory=list)  # newest first, as the engine lists them
    errors: dict[str, Exception] = field(default_factory=dict)  # method name -> raised on its next call
    calls: list[tuple[str, object]] = field(default_factory=list)  # (method name, what it was given)
    closed: bool = False
    known_version: int = 0
    in_use: dict[int, int] = field(default_factory=dict)  # versions_in_use()
    waiting_for_version: int = 0

    def __post_init__(self) -> None:
        self.scheduler = None
        self.versions = None
        self.on_live = None

    def versions_in_use(self) -> dict[int, int]:
        return dict(self.in_use)

    def _call(self, name: str, given: object = None) -> None:
        self.calls.append((name, given))
        if name in self.errors:
            raise self.errors.pop(name)

    def given(self, name: str) -> list[object]:
        return [g for n, g in self.calls if n == name]

    def info(self) -> EngineInfo:
        return EngineInfo(
            model_id="fake-model", family="llama", architecture="FakeForCausalLM", dtype="float32", device="cpu",
            num_parameters=1234, num_layers=2, hidden_size=64, vocab_size=100, head_version=self.edit_version,
            active_layers=self.active_layers, limits=self.limits, max_prompt_tokens=255, load_seconds=0.5,
            version="0.0-fake", active_streams=self.active_streams, known_version=self.known_version,
            default_edit_method="rome", versions_in_use=self.versions_in_use(),
        )  # fmt: skip

    def close(self) -> None:
        self.closed = True

    edit_store_up = True
    history_lag = 0

    def edit_free_dims(self) -> dict[str, int]:
        return {}

    async def follow(self) -> None:
        return None  # one writer: nothing to follow

    async def generate(
        self, prompt: str, params: SamplingParams, pin: VersionPin = UNPINNED
    ) -> AsyncIterator[GenerationChunk]:
        self._call("generate", (prompt, params))
        self.calls.append(("pin", pin))
        chunks = self.chunks or [GenerationChunk("ok", [7], finish_reason=FINISH_LENGTH, completion_tokens=1)]
        for chunk in chunks:
            if isinstance(chunk, Exception):
                raise chunk
            yield chunk

    async def score(
        self, prompt: str, continuations: list[str], pin: VersionPin = UNPINNED
    ) -> tuple[list[ContinuationScore], int]:
        self._call("score", (prompt, continuations))
        self.calls.append(("pin", pin))
        return self.scores or [ContinuationScore(c, -1.0, -1.0, (TokenScore(1, c, -1.0),)) for c in continuations], (
            self.edit_version
        )

    async def trace(self, request: TraceRequest, pin: VersionPin = UNPINNED) -> AsyncIterator[TraceEvent]:
        self._call("trace", request)
        self.calls.append(("pin", pin))
        events = self.trace_events or [
            TraceProgress(2, 8), TraceProgress(8, 8), TraceDone(trace_result(request.kind), self.edit_version)
        ]  # fmt: skip
        for event in events:
            if isinstance(event, Exception):
                raise event
            yield event

    def min_target_prob(self, options: ApplyOptions) -> float:
        value = self.limits.min_target_prob if options.min_target_prob is None else options.min_target_prob
        if not 0.0 <= value <= 1.0:
            raise InvalidRequest(f"min_target_prob must be a probability in [0, 1], got {value}")
        return value

    def check_edit_chars(self, prompt: str, subject: str, target: str) -> None:
        self._call("check_edit_chars", (prompt, subject, target))
        for name, text in (("prompt", prompt), ("subject", subject), ("target", target)):
            if len(text) > self.limits.max_edit_chars:
                raise InvalidRequest(f"{name} is over max_edit_chars={self.limits.max_edit_chars}")

    async def apply_edits(
        self,
        requests: Sequence[EditRequest],
        options: ApplyOptions,
        on_commit: Callable[[EditView], None] | None = None,
    ) -> tuple[EditView, int]:
        self._call("apply_edits", (list(requests), options))
        view = edit_view(f"e{self.edit_version + 1}", self.edit_version + 1, author=options.author,
                         comment=options.comment, active=not options.dry_run, stored=not options.dry_run)  # fmt: skip
        if not options.dry_run:
            self.edit_version += 1
            self.views.insert(0, view)
            if on_commit is not None:
                on_commit(view)
        return view, self.edit_version

    async def revert_edit(
        self, revert: RevertRequest, on_commit: Callable[[int, list[str]], None] | None = None
    ) -> tuple[int, list[str], float]:
        self._call("revert_edit", revert)
        to_version = revert.to_version
        removed = [v.edit_id for v in self.views if to_version is not None and v.version > to_version]
        removed = removed or ([revert.edit_id] if revert.edit_id else [])
        self.edit_version = to_version if to_version is not None else self.edit_version + 1
        if on_commit is not None:
            on_commit(self.edit_version, removed)
        return self.edit_version, removed, 0.125

    async def list_edits(self, *, include_inactive: bool) -> list[EditView]:
        self._call("list_edits", include_inactive)
        return [v for v in self.views if include_inactive or v.active]

    async def get_edit(self, edit_id: str) -> EditView:
        self._call("get_edit", edit_id)
        for view in self.views:
            if view.edit_id == edit_id:
                return view
        raise NotFound(f"no edit {edit_id!r}")

    async def export_edits(self, from_version: int, to_version: int | None) -> list[tuple[ManifestEntry, bytes]]:
        self._call("export_edits", (from_version, to_version))
        top = self.edit_version if to_version is None else to_version
        views = [v for v in reversed(self.views) if from_version < v.version <= top]
        return [(v.entry, json.dumps(v.header.to_json()).encode()) for v in views if v.entry is not None]

    async def import_edits(
        self,
        files: AsyncIterable[tuple[bytes, str | None]] | Iterable[tuple[bytes, str | None]],
        *,
        author: str = "",
        on_commit: Callable[[list[EditView]], None] | None = None,
    ) -> list[EditView]:
        received = [f async for f in files] if isinstance(files, AsyncIterable) else list(files)
        self._call("import_edits", received)
        imported = []
        for content, _sha in received:
            self.edit_version += 1
            imported.append(edit_view(json.loads(content)["edit_id"], self.edit_version))
        self.views[:0] = imported[::-1]
        if on_commit is not None:
            on_commit(imported)
        return imported
