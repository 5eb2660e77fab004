"""The engine the server calls: request validation, limits, threads, streams.

Torch work runs on worker threads (``asyncio.to_thread``-style, on a pool of
our own) so the asyncio loop that serves gRPC keeps answering health checks
and other RPCs while a long generation runs. A stream is stepped one token
at a time: when its consumer goes away (the client cancels, its deadline
passes), the generator is closed and no further step runs.

Expensive work is admitted first (``admission.py``): a per-call memory
estimate against ``max_request_memory_mb``, then a slot among the running
traces / scores and the tokens in flight, refused at once (RESOURCE_EXHAUSTED)
when none is free. Tokenizing runs on the worker threads too, after a cheap
character-count check. Edit computations and traces get a ``should_stop``
(``run_to_end``): a caller that goes away, or ``close()``, stops them at their
next step, and the coroutine that holds the edit lock or the admission slot
keeps holding it until the worker thread has actually ended.

The edit operations (ApplyEdit, RevertEdit, listings, export, import) live in
``engine_edits.EngineEdits``, a mixin of ``Engine``.

    engine = Engine(load_model(None), EngineLimits())
    async for chunk in engine.generate("The capital of France is", SamplingParams()):
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from . import __version__
from .admission import (
    Admission,
    ModelShape,
    generate_bytes,
    score_bytes,
    trace_bytes,
)
from .arch import config_sizes
from .batching import BatchScheduler
from .editing import DEFAULT_MAX_UPDATE_NORM_RATIO, EditManager
from .engine_edits import EngineEdits
from .errors import FailedPrecondition, InvalidRequest, NotFound, Unavailable
from .generation import GenerationChunk, SamplingParams, generate_tokens
from .loading import LoadedModel
from .methods import default_method
from .records import AUTO_METHOD, METHODS, UNPINNED, VersionPin
from .scoring import ContinuationScore, encode_prompt, score_continuations
from .tracing import NoiseCache, TraceRequest, TraceResult
from .tracing import trace as trace_grid
from .versions import LiveVersions

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
    version_cache_mb: int = 256  # side paths of pinned versions kept between passes (versions.py)
    max_version_wait: float = 30.0  # a request's min_edit_version waits at most this long (and its deadline)
    max_queued_edits: int = 8  # edits waiting behind the one being computed
    max_trace_cells: int = 20_000  # tokens x layers of one trace grid
    max_trace_samples: int = 64
    max_import_files: int = 256  # layer files of one ImportEdits call
    max_import_bytes: int = 64 * 1024 * 1024  # their total size (one SmolLM2 layer file is ~9 KB)
    # refuse a layer with ||u v^T||_F > ratio * ||W||_F (on import and at start)
    max_update_norm_ratio: float = DEFAULT_MAX_UPDATE_NORM_RATIO
    # an edit whose P(target) on its prompt stays below this is refused (a request may set its own)
    min_target_prob: float = 0.0
    # how an edit is computed unless its request names a method (records.METHODS), or "auto": the
    # gated method on the embedded model, projected on the MEMIT paper's ranges, else rome (methods.default_method)
    edit_method: str = AUTO_METHOD
    max_batch_facts: int = 64  # facts of one ApplyEdits call (one layer, one version)
    # -- admission control: refused at once with RESOURCE_EXHAUSTED (0: no limit)
    max_concurrent_traces: int = 2
    max_concurrent_scores: int = 4
    max_tokens_in_flight: int = 262_144  # prompt + new tokens of every running generate/score/trace/edit
    max_request_memory_mb: int = 2048  # per-call estimate (rome_engine.admission) refused above this
    max_memory_in_flight_mb: int = 8192  # the sum of the running calls' estimates refused above this
    max_continuation_chars: int = 20_000  # cheap guard on each Score continuation before tokenizing
    # -- edit requests (INVALID_ARGUMENT above these)
    max_edit_chars: int = 2048  # each of prompt, subject, target, checked before tokenizing
    max_edit_prompt_tokens: int = 512
    max_edit_subject_tokens: int = 64
    max_edit_target_tokens: int = 32


# temperature: 0 (greedy) or a finite value in [MIN_TEMPERATURE, MAX_TEMPERATURE]; below it the
# scaled logits overflow to inf and sampling fails (1e-40 did)
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0
TRACE_BATCH_ROWS = 128  # rows per trace forward pass (tracing.trace's max_batch_rows)
TOKENIZING_AT_ONCE = 2  # requests tokenized at once, before they are admitted (the others wait their turn)


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
    known_version: int  # the newest version of the history this server knows
    default_edit_method: str  # the method of an edit that names none ("auto" resolved)
    versions_in_use: dict[int, int]  # version -> requests running on it


class Engine(EngineEdits):
    def __init__(
        self, loaded: LoadedModel, limits: EngineLimits | None = None, edits: EditManager | None = None
    ) -> None:
        self.loaded = loaded
        self.limits = limits or EngineLimits()
        if self.limits.max_concurrent_streams < 1:
            raise ValueError(f"max_concurrent_streams must be >= 1, got {self.limits.max_concurrent_streams}")
        if self.limits.version_cache_mb < 0:
            raise ValueError(f"version_cache_mb must be >= 0, got {self.limits.version_cache_mb}")
        if not 0.0 <= self.limits.max_version_wait < math.inf:  # NaN too
            raise ValueError(f"max_version_wait must be a number of seconds >= 0, got {self.limits.max_version_wait}")
        if self.limits.edit_method not in (AUTO_METHOD, *METHODS):
            raise ValueError(f"edit_method must be {AUTO_METHOD} or one of {', '.join(METHODS)}, "
                             f"got {self.limits.edit_method!r}")  # fmt: skip
        # the method of an edit that names none
        self.default_edit_method = (
            default_method(loaded) if self.limits.edit_method == AUTO_METHOD else self.limits.edit_method
        )
        context = config_sizes(loaded.model.config).context_length
        self.context_length = context
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens, context - 1)
        self._pool = ThreadPoolExecutor(
            max_workers=self.limits.max_concurrent_streams + 4, thread_name_prefix="romegw-torch"
        )
        self._closed = False
        self.edits = edits
        self.versions = (
            LiveVersions(loaded, edits.weights, layers_at=edits.version_layers,
                         cache_bytes=self.limits.version_cache_mb * 1024 * 1024)
            if edits is not None
            else None
        )  # fmt: skip
        if self.versions is not None:  # the weights hold the restored head already
            self.versions.set_head(edits.head_version, edits.version_layers(edits.head_version))
        self.scheduler = (
            BatchScheduler(loaded, max_batch_size=self.limits.max_batch_size, versions=self.versions)
            if self.limits.max_batch_size > 0
            else None
        )
        self._history: asyncio.Condition | None = None  # notified when the head moves (min_edit_version)
        self.on_live: Callable[[float], None] | None = None  # gets each change of the head's stored -> live seconds
        self.waiting_for_version = 0
        self._edit_lock: asyncio.Lock | None = None
        self._queued_edits = 0
        self.noise_cache = NoiseCache()
        self.shape = ModelShape.of(loaded)
        lim = self.limits
        self.admission = Admission(
            max_concurrent={
                "stream": lim.max_concurrent_streams,
                "trace": lim.max_concurrent_traces,
                "score": lim.max_concurrent_scores,
            },
            max_tokens_in_flight=lim.max_tokens_in_flight,
            max_memory_in_flight_mb=lim.max_memory_in_flight_mb,
            max_request_memory_mb=lim.max_request_memory_mb,
        )
        self._tokenizing: asyncio.Semaphore | None = None
        # set by close(): every running edit computation and trace stops at its next step
        self._stopping = threading.Event()

    @property
    def edit_version(self) -> int:
        """The head: the version a request without a pin runs on."""
        return self.versions.head if self.versions is not None else 0

    @property
    def live_history_version(self) -> int:
        """The newest version of the history as far as it is live here (min_edit_version waits for it):
        a version read from a shared history is counted once it is served, not when it is read."""
        return self.edits.served_history_version if self.edits is not None else 0

    @property
    def known_version(self) -> int:
        """The newest version of the history this server knows (min_edit_version compares with it)."""
        return self.edits.store.manifest.max_version if self.edits is not None else 0

    def versions_in_use(self) -> dict[int, int]:
        """version -> requests running on it."""
        return self.versions.in_use() if self.versions is not None else {}

    def _history_changed(self) -> asyncio.Condition:
        if self._history is None:  # created on the serving loop at first use
            self._history = asyncio.Condition()
        return self._history

    async def notify_history(self) -> None:
        """Wake the requests waiting for a min_edit_version (after every change of the head)."""
        cond = self._history_changed()
        async with cond:
            cond.notify_all()

    async def resolve_version(self, pin: VersionPin) -> int:
        """The version a request runs on: its ``edit_version``, else the head, once the server knows
        ``min_edit_version`` (waiting at most ``max_version_wait`` and the request's own time left).
        NotFound for a version not in the history; FailedPrecondition when the wait ends first."""
        for name, value in (("edit_version", pin.edit_version), ("min_edit_version", pin.min_edit_version)):
            if value is not None and value < 0:
                raise InvalidRequest(f"{name} must be >= 0, got {value}")
        version, least = pin.edit_version, pin.min_edit_version
        if version is not None and least is not None and version < least:
            raise InvalidRequest(f"edit_version {version} is older than min_edit_version {least}: send one of them")
        if least is not None and self.live_history_version < least:
            await self._wait_for_history(least, pin.wait_seconds)
        if version is None or version == self.edit_version:
            return self.edit_version
        if self.edits is None:
            raise NotFound(f"version {version} does not exist: this server has no edit store (version 0 only)")
        if version > self.known_version:
            raise NotFound(f"version {version} does not exist (versions 0..{self.known_version} exist)")
        await self.run(self.edits.version_layers, version)  # loads and verifies (FailedPrecondition), once
        return version

    async def _prepare_version(self, version: int) -> None:
        """Build a pinned version's matrices (cached) on a worker thread, once the request is admitted:
        not in the decode loop's first pass, and not for a request that admission refuses."""
        if self.versions is not None and version != self.edit_version:
            await self.run(self.versions.diff, version)

    async def _wait_for_history(self, wanted: int, wait_seconds: float | None) -> None:
        limit = self.limits.max_version_wait
        timeout = limit if wait_seconds is None else max(0.0, min(limit, wait_seconds))
        cond = self._history_changed()
        self.waiting_for_version += 1
        try:
            async with cond:
                await asyncio.wait_for(cond.wait_for(lambda: self.live_history_version >= wanted), timeout)
        except TimeoutError:
            raise FailedPrecondition(
                f"min_edit_version {wanted} is newer than what this server serves (its history up to version "
                f"{self.live_history_version} is live, {self.known_version} is known; "
                f"head {self.edit_version}) after waiting {timeout:.1f} s: retry, or send it to the server that "
                "made the edit"
            ) from None
        finally:
            self.waiting_for_version -= 1

    def _using(self, version: int) -> contextlib.AbstractContextManager:
        """Count a request on ``version`` while it runs."""
        return self.versions.using(version) if self.versions is not None else contextlib.nullcontext()

    def _pinned(self, version: int) -> contextlib.AbstractContextManager:
        """This thread's forward passes serve ``version``."""
        return self.versions.pinned(version) if self.versions is not None else contextlib.nullcontext()

    @property
    def active_layers(self) -> int:
        return len(self.edits.active) if self.edits else 0

    @property
    def edit_store_up(self) -> bool:
        """Whether the edit store answered the last time it was asked (a folder: always)."""
        return bool(getattr(self.edits.store, "up", True)) if self.edits else True

    def edit_free_dims(self) -> dict[str, int]:
        """param -> dimensions a projected edit may still write along (``EditManager.free_dims``)."""
        return self.edits.free_dims() if self.edits else {}

    @property
    def history_lag(self) -> int:
        """Entries of a shared history (versions other replicas made) this server does not serve yet."""
        return self.edits.history_lag if self.edits else 0

    # -- plumbing -----------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run blocking (torch) work on a worker thread."""
        if self._closed:
            raise Unavailable("the engine is shutting down")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def run_to_end(self, fn: Callable[[Callable[[], bool]], T]) -> T:
        """Run ``fn(should_stop)`` on a worker thread; if the caller is cancelled (its RPC was
        cancelled or its deadline passed), ``should_stop()`` turns true and this coroutine still
        waits for the thread to end before it re-raises, so whatever the caller holds (the edit
        lock, an admission slot) stays held until the computation has actually stopped.
        ``close()`` turns every ``should_stop`` true as well."""
        stop = threading.Event()

        def should_stop() -> bool:
            return stop.is_set() or self._stopping.is_set()

        job = asyncio.ensure_future(self.run(fn, should_stop))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            stop.set()
            while not job.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({job})
            if not job.cancelled() and job.exception() is None:
                log.info("a cancelled computation finished before it saw the stop")
            raise

    @property
    def active_streams(self) -> int:
        return self.admission.running("stream")

    def close(self) -> None:
        """Refuse new work, stop running edit computations and traces at their next step
        (an edit already storing its layer finishes its commit), stop the batch scheduler."""
        self._closed = True
        self._stopping.set()
        if self.scheduler is not None:
            self.scheduler.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.versions is not None:
            self.versions.close()
        if self.edits is not None:
            self.edits.store.close()  # a database store's connections; a folder has nothing to release

    # -- requests -----------------------------------------------------------

    def validate_sampling(self, params: SamplingParams) -> None:
        lim = self.limits
        if params.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        if params.max_new_tokens > lim.max_new_tokens:
            raise InvalidRequest(
                f"max_new_tokens {params.max_new_tokens} exceeds the limit max_new_tokens={lim.max_new_tokens}"
            )
        t = params.temperature
        if not (t == 0.0 or (math.isfinite(t) and MIN_TEMPERATURE <= t <= MAX_TEMPERATURE)):
            raise InvalidRequest(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {t}"
            )
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

    def check_prompt_chars(self, prompt: str) -> None:
        """The cheap checks, before any tokenizing."""
        if not prompt:
            raise InvalidRequest("prompt must not be empty")
        if len(prompt) > self.limits.max_prompt_chars:
            raise InvalidRequest(
                f"prompt has {len(prompt)} characters, over the limit max_prompt_chars={self.limits.max_prompt_chars}"
            )

    async def encode_prompt_async(self, prompt: str) -> list[int]:
        """``encode_prompt`` with the tokenizing on a worker thread (never on the event loop)."""
        self.check_prompt_chars(prompt)
        return await self.tokenize(self.encode_prompt, prompt)

    async def tokenize(self, fn: Callable[..., T], *args: object) -> T:
        """Run a tokenizing step on a worker thread, at most ``TOKENIZING_AT_ONCE`` at a time: the
        work comes before admission (its result sizes it), so its own memory is bounded here."""
        if self._tokenizing is None:  # created on the serving loop at first use
            self._tokenizing = asyncio.Semaphore(TOKENIZING_AT_ONCE)
        async with self._tokenizing:
            return await self.run(fn, *args)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Tokenize a prompt, enforcing the prompt limits (blocking: call it off the event loop)."""
        self.check_prompt_chars(prompt)
        ids = encode_prompt(self.loaded.tokenizer, prompt)
        if len(ids) > self.max_prompt_tokens:
            raise InvalidRequest(
                f"prompt has {len(ids)} tokens, over the limit max_prompt_tokens={self.max_prompt_tokens}"
            )
        return ids

    async def generate(
        self, prompt: str, params: SamplingParams, pin: VersionPin = UNPINNED
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the completion of ``prompt`` on one version (the pin's, else the head at the start);
        the last chunk has a finish_reason."""
        self.validate_sampling(params)
        prompt_ids = await self.encode_prompt_async(prompt)
        if len(prompt_ids) + params.max_new_tokens > self.context_length:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"model's context length of {self.context_length} tokens: lower max_new_tokens"
            )
        estimate = generate_bytes(self.shape, prompt_tokens=len(prompt_ids), new_tokens=params.max_new_tokens)
        tokens = len(prompt_ids) + params.max_new_tokens
        version = await self.resolve_version(pin)
        with self.admission.admit("stream", tokens=tokens, memory=estimate), self._using(version):
            await self._prepare_version(version)
            if self.scheduler is not None:
                stream = self._batched(prompt_ids, params, version)
            else:
                stream = self._alone(prompt_ids, params, version)
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    yield chunk

    async def _batched(
        self, prompt_ids: list[int], params: SamplingParams, version: int
    ) -> AsyncIterator[GenerationChunk]:
        """One row of the continuous batch."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: GenerationChunk | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens any more
                loop.call_soon_threadsafe(queue.put_nowait, item)

        self.scheduler.submit(prompt_ids, params, emit=emit, cancelled=cancelled.is_set, edit_version=version)
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

    async def _alone(
        self, prompt_ids: list[int], params: SamplingParams, version: int
    ) -> AsyncIterator[GenerationChunk]:
        """The stream decoded on its own, one worker-thread step per token."""
        cancelled = threading.Event()
        steps = generate_tokens(self.loaded, prompt_ids, params, cancelled=cancelled.is_set, edit_version=version)

        def step() -> GenerationChunk | None:
            with self._pinned(version):
                return next(steps, None)

        try:
            while True:
                chunk = await self.run(step)
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

    async def score(
        self, prompt: str, continuations: list[str], pin: VersionPin = UNPINNED
    ) -> tuple[list[ContinuationScore], int]:
        """Scores of the continuations, and the edit version they were computed on."""
        lim = self.limits
        if not continuations:
            raise InvalidRequest("continuations must name at least one continuation")
        if len(continuations) > lim.max_continuations:
            raise InvalidRequest(
                f"{len(continuations)} continuations exceed the limit max_continuations={lim.max_continuations}"
            )
        if any(not c for c in continuations):
            raise InvalidRequest("continuations must not be empty strings")
        longest_chars = max(len(c) for c in continuations)
        if longest_chars > lim.max_continuation_chars:
            raise InvalidRequest(
                f"a continuation has {longest_chars} characters, over the limit "
                f"max_continuation_chars={lim.max_continuation_chars}"
            )
        self.check_prompt_chars(prompt)

        def lengths() -> tuple[int, list[int]]:
            tok = self.loaded.tokenizer
            return len(self.encode_prompt(prompt)), [len(encode_prompt(tok, c)) for c in continuations]

        n_prompt, n_conts = await self.tokenize(lengths)
        if n_prompt + max(n_conts) > self.max_prompt_tokens:
            raise InvalidRequest(
                f"prompt plus continuation is {n_prompt + max(n_conts)} tokens, "
                f"over the limit max_prompt_tokens={self.max_prompt_tokens}"
            )
        width = n_prompt + max(n_conts)  # the batch is padded to its longest row
        estimate = score_bytes(self.shape, rows=len(continuations), tokens=width)
        version = await self.resolve_version(pin)
        with self.admission.admit("score", tokens=len(continuations) * width, memory=estimate), self._using(version):
            await self._prepare_version(version)

            def compute(_stop: Callable[[], bool]) -> list[ContinuationScore]:
                with self._pinned(version):
                    return score_continuations(self.loaded, prompt, list(continuations))

            return await self.run_to_end(compute), version

    # -- tracing --------------------------------------------------------------

    async def trace(self, request: TraceRequest, pin: VersionPin = UNPINNED) -> AsyncIterator[TraceEvent]:
        """Progress events while the grid is computed, then the result (on one version).

        The trace stops at its next batch when the caller goes away or ``close()`` runs; its
        admission slot is held until the worker thread has actually ended."""
        lim = self.limits
        if request.samples > lim.max_trace_samples:
            raise InvalidRequest(
                f"samples {request.samples} exceeds the limit max_trace_samples={lim.max_trace_samples}"
            )
        for name, text in (("subject", request.subject), ("answer", request.answer or "")):
            if len(text) > lim.max_edit_chars:  # cheap, before anything is tokenized
                raise InvalidRequest(
                    f"trace {name} has {len(text)} characters, over the limit max_edit_chars={lim.max_edit_chars}"
                )
        num_layers = self.loaded.num_layers
        n_tokens = len(await self.encode_prompt_async(request.prompt))
        cells = n_tokens * num_layers
        if cells > lim.max_trace_cells:
            raise InvalidRequest(
                f"the trace grid has {n_tokens} tokens x {num_layers} layers = {cells} cells, "
                f"over the limit max_trace_cells={lim.max_trace_cells}: shorten the prompt"
            )
        estimate = trace_bytes(self.shape, tokens=n_tokens, samples=request.samples, batch_rows=TRACE_BATCH_ROWS)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TraceProgress] = asyncio.Queue()
        rows = min(TRACE_BATCH_ROWS, cells * request.samples)
        version = await self.resolve_version(pin)
        with self.admission.admit("trace", tokens=rows * n_tokens, memory=estimate), self._using(version):
            await self._prepare_version(version)

            def compute(should_stop: Callable[[], bool]) -> TraceResult:
                def progress(done: int, total: int) -> None:
                    if should_stop():
                        raise Unavailable("trace cancelled")
                    loop.call_soon_threadsafe(events.put_nowait, TraceProgress(done, total))

                with self._pinned(version):
                    return trace_grid(
                        self.loaded, request, noise_cache=self.noise_cache, progress=progress,
                        max_batch_rows=TRACE_BATCH_ROWS,
                    )  # fmt: skip

            job = asyncio.ensure_future(self.run_to_end(compute))
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
                if not job.done():
                    job.cancel()  # run_to_end sets the stop and waits for the thread
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await job

    def info(self) -> EngineInfo:
        m = self.loaded
        cfg = m.model.config
        sizes = config_sizes(cfg)
        return EngineInfo(
            model_id=m.model_id,
            family=m.spec.family,
            architecture=(cfg.architectures or [type(m.model).__name__])[0],
            dtype=m.dtype_name,
            device=str(m.device),
            num_parameters=m.num_parameters,
            num_layers=m.num_layers,
            hidden_size=sizes.hidden,
            vocab_size=sizes.vocab,
            head_version=self.edit_version,
            active_layers=self.active_layers,
            limits=self.limits,
            max_prompt_tokens=self.max_prompt_tokens,
            load_seconds=m.load_seconds,
            version=__version__,
            active_streams=self.active_streams,
            known_version=self.known_version,
            default_edit_method=self.default_edit_method,
            versions_in_use=self.versions_in_use(),
        )
