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
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from . import __version__
from .errors import InvalidRequest, ResourceExhausted, Unavailable
from .generation import GenerationChunk, SamplingParams, generate_tokens
from .loading import LoadedModel
from .scoring import ContinuationScore, encode_prompt, score_continuations

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class EngineLimits:
    max_prompt_tokens: int = 2048  # also capped by the model's context length
    max_new_tokens: int = 1024
    default_max_new_tokens: int = 64
    max_concurrent_streams: int = 16
    max_stop_sequences: int = 8
    max_stop_length: int = 128
    max_top_logprobs: int = 20
    max_continuations: int = 64
    max_prompt_chars: int = 100_000  # cheap guard before tokenizing


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
    def __init__(self, loaded: LoadedModel, limits: EngineLimits | None = None) -> None:
        self.loaded = loaded
        self.limits = limits or EngineLimits()
        context = _context_length(loaded)
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens, context - 1)
        self._pool = ThreadPoolExecutor(
            max_workers=self.limits.max_concurrent_streams + 4, thread_name_prefix="romegw-torch"
        )
        self._streams_lock = threading.Lock()
        self._active_streams = 0
        self._closed = False
        self.edit_version = 0
        self.active_layers = 0

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
            raise InvalidRequest(
                f"top_logprobs must be in [0, {lim.max_top_logprobs}], got {params.top_logprobs}"
            )

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
        with self._stream_slot():
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

    async def score(self, prompt: str, continuations: list[str]) -> list[ContinuationScore]:
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
        return await self.run(score_continuations, self.loaded, prompt, list(continuations))

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
