"""The interface the server depends on: what ``server/`` calls on an engine, and nothing more.

``engine.Engine`` is the implementation; the server's handlers, wiring and metrics are typed
against ``EngineClient`` so that they can be served and tested on a fake engine with no model
(``tests/server/fake_engine.py``), as vLLM's entrypoints depend on its ``EngineClient``.
Streams are async iterators: ``generate`` yields chunks whose last one carries a finish reason
and the usage; ``trace`` yields progress events, then one ``TraceDone``. Errors are the typed
ones of ``errors.py`` (the server maps each to a status code).

    def serve_on(engine: EngineClient) -> None: ...
    serve_on(Engine(load_model(None)))
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: importing this module loads no torch
    from .batching import BatchScheduler
    from .edit_store import ManifestEntry
    from .engine import EngineInfo, EngineLimits, TraceEvent
    from .generation import GenerationChunk, SamplingParams
    from .records import ApplyOptions, EditView, RevertRequest, VersionPin
    from .rome.request import EditRequest
    from .scoring import ContinuationScore
    from .tracing import TraceRequest
    from .versions import LiveVersions


@runtime_checkable
class EngineClient(Protocol):
    limits: EngineLimits
    versions: LiveVersions | None  # the metrics read its cache statistics and last swap
    on_live: Callable[[float], None] | None  # the metrics observe each edit's stored -> live seconds
    waiting_for_version: int  # requests waiting for their min_edit_version
    scheduler: BatchScheduler | None  # set: the metrics observe its batch sizes (``on_step``)

    @property
    def edit_version(self) -> int:
        """The head version being served."""
        ...

    @property
    def active_layers(self) -> int: ...

    @property
    def edit_store_up(self) -> bool: ...

    @property
    def history_lag(self) -> int: ...

    def edit_free_dims(self) -> dict[str, int]: ...

    @property
    def active_streams(self) -> int: ...

    def versions_in_use(self) -> dict[int, int]:
        """version -> requests running on it."""
        ...

    def info(self) -> EngineInfo: ...

    def close(self) -> None:
        """No new work; running edit computations and traces stop at their next step."""
        ...

    async def follow(self) -> None:
        """Follow a shared edit history (other replicas' commits) while serving; returns at once when
        the history has one writer. The server runs it as a task and cancels it at shutdown."""
        ...

    # -- generation and scoring

    def generate(self, prompt: str, params: SamplingParams, pin: VersionPin = ...) -> AsyncIterator[GenerationChunk]:
        """Chunks on one version: the pin's, else the head when the stream starts."""
        ...

    async def score(
        self, prompt: str, continuations: list[str], pin: VersionPin = ...
    ) -> tuple[list[ContinuationScore], int]:
        """The scores and the edit version they were computed on."""
        ...

    def trace(self, request: TraceRequest, pin: VersionPin = ...) -> AsyncIterator[TraceEvent]: ...

    # -- edits

    def min_target_prob(self, options: ApplyOptions) -> float:
        """The P(target) an edit must reach under ``options`` (the request's threshold or the server's)."""
        ...

    def check_edit_chars(self, prompt: str, subject: str, target: str) -> None:
        """InvalidRequest when a text is over ``limits.max_edit_chars`` (cheap, before parsing)."""
        ...

    async def apply_edits(
        self,
        requests: Sequence[EditRequest],
        options: ApplyOptions,
        on_commit: Callable[[EditView], None] | None = None,
    ) -> tuple[EditView, int]:
        """The computed layer (one for all the facts) and the head version after it; ``on_commit``
        runs once it is live (even if the caller has gone)."""
        ...

    async def revert_edit(
        self, revert: RevertRequest, on_commit: Callable[[int, list[str]], None] | None = None
    ) -> tuple[int, list[str], float]:
        """(head version, removed edit ids, seconds); ``on_commit(version, removed)`` once it is live."""
        ...

    async def list_edits(self, *, include_inactive: bool) -> list[EditView]: ...

    async def get_edit(self, edit_id: str) -> EditView: ...

    async def export_edits(self, from_version: int, to_version: int | None) -> list[tuple[ManifestEntry, bytes]]:
        """(manifest entry, layer file bytes) of each version in the range, oldest first."""
        ...

    async def import_edits(
        self,
        files: AsyncIterable[tuple[bytes, str | None]] | Iterable[tuple[bytes, str | None]],
        *,
        author: str = "",
        on_commit: Callable[[list[EditView]], None] | None = None,
    ) -> list[EditView]: ...
