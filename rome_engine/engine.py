"""The engine the server calls: request validation, limits, threads, streams.

Torch work runs on worker threads (``asyncio.to_thread``-style, on a pool of
our own) so the asyncio loop that serves gRPC keeps answering health checks
and other RPCs while a long generation runs. A stream is stepped one token
at a time: when its consumer goes away (the client cancels, its deadline
passes), the generator is closed and no further step runs.

    engine = Engine(load_model(None), EngineLimits())
    async for chunk in engine.generate("The capital of France is", SamplingParams()):
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from . import __version__
from .batching import BatchScheduler
from .bounds import clip
from .edit_store import EditLayer
from .editing import DEFAULT_MAX_UPDATE_NORM_RATIO, EditManager, EditView
from .errors import EngineError, FailedPrecondition, InvalidRequest, ResourceExhausted, Unavailable
from .gate import VersionGate
from .generation import GenerationChunk, SamplingParams, generate_tokens
from .loading import LoadedModel
from .scoring import ContinuationScore, encode_prompt, score_continuations
from .tracing import NoiseCache, TraceRequest, TraceResult
from .tracing import trace as trace_grid

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class EngineLimits:
    max_prompt_tokens: int = 2048  # also capped by the model's context length
    max_new_tokens: int = 1024
    default_max_new_tokens: int = 64
    max_concurrent_streams: int = 16
    max_batch_size: int = 32  # streams decoded together per forward pass; 0: each stream on its own thread
    max_stop_sequences: int = 8
    max_stop_length: int = 128
    max_top_logprobs: int = 20
    max_continuations: int = 64
    max_prompt_chars: int = 100_000  # cheap guard before tokenizing
    edit_drain_timeout: float = 60.0  # an edit waits this long for running streams to finish
    max_queued_edits: int = 8  # edits waiting behind the one being computed
    max_trace_cells: int = 20_000  # tokens x layers of one trace grid
    max_trace_samples: int = 64
    max_import_files: int = 256  # layer files of one ImportEdits call
    max_import_bytes: int = 64 * 1024 * 1024  # their total size (one SmolLM2 layer file is ~9 KB)
    # refuse a layer with ||u v^T||_F > ratio * ||W||_F (on import and at start)
    max_update_norm_ratio: float = DEFAULT_MAX_UPDATE_NORM_RATIO


@dataclass(frozen=True)
class TraceProgress:
    done: int  # grid cells computed
    total: int


@dataclass(frozen=True)
class TraceDone:
    result: TraceResult
    edit_version: int


TraceEvent = TraceProgress | TraceDone


@dataclass(frozen=True)
class EngineInfo:
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
    limits: EngineLimits
    max_prompt_tokens: int  # the limit, capped by the model's context length
    load_seconds: float
    version: str
    active_streams: int


class Engine:
    def __init__(
        self, loaded: LoadedModel, limits: EngineLimits | None = None, edits: EditManager | None = None
    ) -> None:
        self.loaded = loaded
        self.limits = limits or EngineLimits()
        context = _context_length(loaded)
        self.context_length = context
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens, context - 1)
        self._pool = ThreadPoolExecutor(
            max_workers=self.limits.max_concurrent_streams + 4, thread_name_prefix="romegw-torch"
        )
        self._streams_lock = threading.Lock()
        self._active_streams = 0
        self._closed = False
        self.scheduler = (
            BatchScheduler(loaded, max_batch_size=self.limits.max_batch_size)
            if self.limits.max_batch_size > 0
            else None
        )
        self.gate = VersionGate()
        self.edits = edits
        self._edit_lock: asyncio.Lock | None = None
        self._queued_edits = 0
        self.noise_cache = NoiseCache()

    @property
    def edit_version(self) -> int:
        return self.edits.head_version if self.edits else 0

    @property
    def active_layers(self) -> int:
        return len(self.edits.active) if self.edits else 0

    # -- plumbing -----------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run blocking (torch) work on a worker thread."""
        if self._closed:
            raise Unavailable("the engine is shutting down")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @property
    def active_streams(self) -> int:
        return self._active_streams

    def close(self) -> None:
        self._closed = True
        if self.scheduler is not None:
            self.scheduler.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- requests -----------------------------------------------------------

    def validate_sampling(self, params: SamplingParams) -> None:
        lim = self.limits
        if params.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        if params.max_new_tokens > lim.max_new_tokens:
            raise InvalidRequest(
                f"max_new_tokens {params.max_new_tokens} exceeds the limit max_new_tokens={lim.max_new_tokens}"
            )
        if not params.temperature >= 0.0 or params.temperature > 100.0:
            raise InvalidRequest(f"temperature must be in [0, 100], got {params.temperature}")
        if not 0.0 < params.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {params.top_p}")
        if params.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = no limit), got {params.top_k}")
        if len(params.stop) > lim.max_stop_sequences:
            raise InvalidRequest(
                f"{len(params.stop)} stop sequences exceed the limit max_stop_sequences={lim.max_stop_sequences}"
            )
        if any(len(s) == 0 or len(s) > lim.max_stop_length for s in params.stop):
            raise InvalidRequest(f"stop sequences must be 1..{lim.max_stop_length} characters long")
        if not 0 <= params.top_logprobs <= lim.max_top_logprobs:
            raise InvalidRequest(f"top_logprobs must be in [0, {lim.max_top_logprobs}], got {params.top_logprobs}")

    def encode_prompt(self, prompt: str) -> list[int]:
        """Tokenize a prompt, enforcing the prompt limits."""
        if not prompt:
            raise InvalidRequest("prompt must not be empty")
        if len(prompt) > self.limits.max_prompt_chars:
            raise InvalidRequest(
                f"prompt has {len(prompt)} characters, over the limit max_prompt_chars={self.limits.max_prompt_chars}"
            )
        ids = encode_prompt(self.loaded.tokenizer, prompt)
        if len(ids) > self.max_prompt_tokens:
            raise InvalidRequest(
                f"prompt has {len(ids)} tokens, over the limit max_prompt_tokens={self.max_prompt_tokens}"
            )
        return ids

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        """Stream the completion of ``prompt``; the last chunk has a finish_reason."""
        self.validate_sampling(params)
        prompt_ids = self.encode_prompt(prompt)
        if len(prompt_ids) + params.max_new_tokens > self.context_length:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"model's context length of {self.context_length} tokens: lower max_new_tokens"
            )
        with self._stream_slot():
            async with self.gate.read(self.limits.edit_drain_timeout + 5.0):
                if self.scheduler is not None:
                    stream = self._batched(prompt_ids, params)
                else:
                    stream = self._alone(prompt_ids, params)
                async with contextlib.aclosing(stream):
                    async for chunk in stream:
                        yield chunk

    async def _batched(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        """One row of the continuous batch."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: GenerationChunk | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens any more
                loop.call_soon_threadsafe(queue.put_nowait, item)

        self.scheduler.submit(prompt_ids, params, emit=emit, cancelled=cancelled.is_set, edit_version=self.edit_version)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            cancelled.set()  # the scheduler drops the row at its next step

    async def _alone(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        """The stream decoded on its own, one worker-thread step per token."""
        cancelled = threading.Event()
        steps = generate_tokens(
            self.loaded, prompt_ids, params, cancelled=cancelled.is_set, edit_version=self.edit_version
        )
        try:
            while True:
                chunk = await self.run(_next_or_none, steps)
                if chunk is None:
                    return
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            cancelled.set()
            # the generator is idle (no step in flight) whenever we get here
            with contextlib.suppress(ValueError):
                steps.close()

    async def score(self, prompt: str, continuations: list[str]) -> tuple[list[ContinuationScore], int]:
        """Scores of the continuations, and the edit version they were computed on."""
        if not continuations:
            raise InvalidRequest("continuations must name at least one continuation")
        if len(continuations) > self.limits.max_continuations:
            raise InvalidRequest(
                f"{len(continuations)} continuations exceed the limit max_continuations={self.limits.max_continuations}"
            )
        if any(not c for c in continuations):
            raise InvalidRequest("continuations must not be empty strings")
        prompt_ids = self.encode_prompt(prompt)
        longest = max(len(encode_prompt(self.loaded.tokenizer, c)) for c in continuations)
        if len(prompt_ids) + longest > self.max_prompt_tokens:
            raise InvalidRequest(
                f"prompt plus continuation is {len(prompt_ids) + longest} tokens, "
                f"over the limit max_prompt_tokens={self.max_prompt_tokens}"
            )
        async with self.gate.read(self.limits.edit_drain_timeout + 5.0):
            scores = await self.run(score_continuations, self.loaded, prompt, list(continuations))
            return scores, self.edit_version

    # -- tracing --------------------------------------------------------------

    async def trace(self, request: TraceRequest) -> AsyncIterator[TraceEvent]:
        """Progress events while the grid is computed, then the result (on one version)."""
        lim = self.limits
        if request.samples > lim.max_trace_samples:
            raise InvalidRequest(
                f"samples {request.samples} exceeds the limit max_trace_samples={lim.max_trace_samples}"
            )
        n_tokens = len(self.encode_prompt(request.prompt))
        cells = n_tokens * self.loaded.num_layers
        if cells > lim.max_trace_cells:
            raise InvalidRequest(
                f"the trace grid has {n_tokens} tokens x {self.loaded.num_layers} layers = {cells} cells, "
                f"over the limit max_trace_cells={lim.max_trace_cells}: shorten the prompt"
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TraceProgress] = asyncio.Queue()
        cancelled = threading.Event()

        def progress(done: int, total: int) -> None:
            if cancelled.is_set():
                raise Unavailable("trace cancelled")
            loop.call_soon_threadsafe(events.put_nowait, TraceProgress(done, total))

        async with self.gate.read(lim.edit_drain_timeout + 5.0):
            version = self.edit_version
            job = asyncio.ensure_future(
                self.run(lambda: trace_grid(self.loaded, request, noise_cache=self.noise_cache, progress=progress))
            )
            try:
                while not job.done():
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({job, getter}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        yield getter.result()
                    else:
                        getter.cancel()
                while not events.empty():
                    yield events.get_nowait()
                yield TraceDone(job.result(), version)
            finally:
                cancelled.set()

    # -- edits ----------------------------------------------------------------

    def _manager(self) -> EditManager:
        if self.edits is None:
            raise FailedPrecondition("this server was started without editing support")
        return self.edits

    def _check_expected(self, expected_version: int | None) -> None:
        if expected_version is not None and expected_version != self.edit_version:
            raise FailedPrecondition(
                f"expected_version {expected_version} does not match the head version {self.edit_version}: "
                "list the edits, then retry against the new head"
            )

    @contextlib.asynccontextmanager
    async def _edit_turn(self):  # noqa: ANN202
        """Edits are serialized; at most max_queued_edits wait behind the running one."""
        if self._edit_lock is None:
            self._edit_lock = asyncio.Lock()
        if self._queued_edits >= self.limits.max_queued_edits + 1:
            raise ResourceExhausted(
                f"{self._queued_edits} edits are running or queued, the limit "
                f"max_queued_edits={self.limits.max_queued_edits} is reached: retry later"
            )
        self._queued_edits += 1
        try:
            async with self._edit_lock:
                yield
        finally:
            self._queued_edits -= 1

    async def apply_edit(
        self,
        request: object,
        *,
        dry_run: bool = False,
        expected_version: int | None = None,
        author: str = "",
        comment: str = "",
    ) -> tuple[EditView, int]:
        """Compute a ROME layer and (unless dry_run) make it the new head. Returns (layer, head version)."""
        manager = self._manager()
        self._check_expected(expected_version)
        async with self._edit_turn():
            self._check_expected(expected_version)
            layer = await self.run(lambda: manager.compute_layer(request, author=author, comment=comment))
            if dry_run:
                return EditView(layer.header, None, False), self.edit_version

            async def commit() -> dict:
                async with self.gate.write(self.limits.edit_drain_timeout):
                    entry = await self.run(manager.store_layer, layer)
                    await self.run(manager.activate, entry["active"], int(entry["version"]))
                    return entry

            # once the layer is being stored, a caller that goes away (deadline, cancel) must not
            # leave it stored but not live: the commit runs to its end regardless
            entry = await asyncio.shield(asyncio.ensure_future(commit()))
            log.info(
                "edit %s applied: version %d -> %d (%s: %r -> %r) by %r",
                layer.edit_id,
                entry["parent_version"],
                entry["version"],
                clip(layer.header["request"]["subject"]),
                clip(layer.header["request"]["prompt"]),
                clip(layer.header["request"]["target"]),
                clip(author),
            )
            return EditView(layer.header, entry, True), self.edit_version

    async def revert_edit(
        self, *, to_version: int | None = None, edit_id: str | None = None, author: str = "", comment: str = ""
    ) -> tuple[int, list[str], float]:
        """Revert to a version, or remove one layer. Returns (head version, removed ids, seconds)."""
        manager = self._manager()
        t0 = time.perf_counter()
        async with self._edit_turn():
            version, active, removed = await self.run(
                lambda: manager.plan_revert(to_version=to_version, edit_id=edit_id)
            )
            if version == self.edit_version:
                return version, [], time.perf_counter() - t0  # already there: nothing to record
            async def commit() -> None:
                async with self.gate.write(self.limits.edit_drain_timeout):
                    await self.run(
                        lambda: manager.record_revert(
                            version, active, to_version=to_version, edit_id=edit_id, author=author, comment=comment
                        )
                    )
                    await self.run(manager.activate, active, version)

            await asyncio.shield(asyncio.ensure_future(commit()))
            log.info("revert by %r: head version now %d, removed %s", clip(author), version, removed or "nothing")
            return version, removed, time.perf_counter() - t0

    async def list_edits(self, *, include_inactive: bool) -> list[EditView]:
        return await self.run(lambda: self._manager().views(include_inactive=include_inactive))

    async def get_edit(self, edit_id: str) -> EditView:
        if not edit_id:
            raise InvalidRequest("edit_id must not be empty")
        return await self.run(self._manager().view, edit_id)

    async def export_edits(self, from_version: int, to_version: int | None) -> list[tuple[dict, bytes]]:
        manager = self._manager()
        top = manager.store.manifest.max_version if to_version is None else to_version
        if top < from_version:
            raise InvalidRequest(f"to_version {top} is below from_version {from_version}")
        return await self.run(manager.export_files, from_version, top)

    async def import_edits(
        self,
        files: AsyncIterable[tuple[bytes, str | None]] | Iterable[tuple[bytes, str | None]],
        *,
        author: str = "",
    ) -> list[EditView]:
        """Apply layer files computed elsewhere on the same base, oldest first, each as a new version.

        Each file is checked as it arrives (reading stops at the first bad one, or past
        max_import_files / max_import_bytes); the files are stored only once all of them
        passed, so a refused import changes nothing.
        """
        manager = self._manager()
        lim = self.limits
        layers: list[EditLayer] = []
        count = size = 0
        async for data, sha in _aiter(files):
            count, size = count + 1, size + len(data)
            if count > lim.max_import_files:
                raise ResourceExhausted(
                    f"an import holds at most max_import_files={lim.max_import_files} layer files: send fewer per call"
                )
            if size > lim.max_import_bytes:
                raise ResourceExhausted(
                    f"an import holds at most max_import_bytes={lim.max_import_bytes} bytes of layer files "
                    f"({size} so far): send fewer per call"
                )
            try:
                layer = await self.run(manager.check_import_file, data, sha)
            except EngineError as e:  # the same kind of error, saying which file of the stream it was
                raise type(e)(f"layer file {count} of the import: {e}") from e
            if any(x.edit_id == layer.edit_id for x in layers):
                raise InvalidRequest(f"edit {layer.edit_id} is sent twice")
            layers.append(layer)
        imported = []
        async with self._edit_turn():
            for layer in layers:
                await self.run(manager.check_import_base, layer)
            async with self.gate.write(self.limits.edit_drain_timeout):
                for layer in layers:
                    extra = {"origin_version": layer.version, "author": author or layer.header.get("author", "")}
                    entry = await self.run(
                        lambda layer=layer, extra=extra: manager.store_layer(layer, op="import", extra=extra)
                    )
                    await self.run(manager.activate, entry["active"], int(entry["version"]))
                    imported.append(EditView(layer.header, entry, True))
        return imported

    def info(self) -> EngineInfo:
        m = self.loaded
        cfg = m.model.config
        return EngineInfo(
            model_id=m.model_id,
            family=m.spec.family,
            architecture=(cfg.architectures or [type(m.model).__name__])[0],
            dtype=m.dtype_name,
            device=str(m.device),
            num_parameters=m.num_parameters,
            num_layers=m.num_layers,
            hidden_size=int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0)),
            vocab_size=int(cfg.vocab_size),
            head_version=self.edit_version,
            active_layers=self.active_layers,
            limits=self.limits,
            max_prompt_tokens=self.max_prompt_tokens,
            load_seconds=m.load_seconds,
            version=__version__,
            active_streams=self._active_streams,
        )

    @contextlib.contextmanager
    def _stream_slot(self):  # noqa: ANN202
        with self._streams_lock:
            if self._active_streams >= self.limits.max_concurrent_streams:
                raise ResourceExhausted(
                    f"{self._active_streams} streams are running, the limit "
                    f"max_concurrent_streams={self.limits.max_concurrent_streams} is reached: retry later"
                )
            self._active_streams += 1
        try:
            yield
        finally:
            with self._streams_lock:
                self._active_streams -= 1


def _next_or_none(it: object) -> GenerationChunk | None:
    return next(it, None)


def _context_length(loaded: LoadedModel) -> int:
    cfg = loaded.model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return 1 << 30


async def _aiter(items: AsyncIterable[T] | Iterable[T]) -> AsyncIterator[T]:
    """Iterate a list or an async stream alike (import_edits takes either)."""
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
