"""Admission control: what one request may cost, and how much work runs at once.

Two questions are asked before expensive work starts, both answered at once
(no queue): does this one call fit (``check_memory``: a per-call estimate of
the bytes it allocates against ``max_request_memory_mb``), and is there room
beside the work already running (``Admission.admit``: concurrent traces,
concurrent scores, tokens in flight, and the sum of the running work's memory
estimates against ``max_memory_in_flight_mb``). A refusal is RESOURCE_EXHAUSTED with
the limit's name, so a caller knows what to lower or when to retry.

The estimates are upper-bound sketches of the dominant tensors, not exact
accounting (activations of one layer at a time, float32 logits, eager
attention scores); they are pure functions of the model's shape below, each
with its formula in a comment.

    shape = ModelShape.of(loaded)
    check_memory("score", score_bytes(shape, rows=8, tokens=1900), limit_mb=2048)
    with admission.admit("score", tokens=8 * 1900):
        ...

Concurrency: ``Admission`` is shared by the event loop and worker threads;
its counters are guarded by one ``threading.Lock``, and a slot is released by
the context manager that took it, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .arch import config_sizes
from .errors import ResourceExhausted

if TYPE_CHECKING:
    from .loading import LoadedModel

MB = 1 << 20
LOGIT_BYTES = 4  # logits and their softmax are computed in float32 whatever the model's dtype


@dataclass(frozen=True)
class ModelShape:
    """The sizes the estimates need, read once from the model's config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelShape:
        s = config_sizes(loaded.model.config)
        dtype_bytes = next(loaded.model.parameters()).element_size()
        return cls(loaded.num_layers, s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.vocab, dtype_bytes)


# -- estimates (bytes) ----------------------------------------------------------


def kv_cache_bytes(shape: ModelShape, *, rows: int, tokens: int) -> int:
    # keys and values of every layer: 2 * layers * kv_heads * head_dim * tokens * rows * dtype bytes
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * rows * shape.dtype_bytes


def activation_bytes(shape: ModelShape, *, rows: int, tokens: int) -> int:
    # one layer's working set at a time: residual + MLP inner (B * T * (4 D + I)) in the model's
    # dtype, plus eager attention scores and their softmax (2 * B * H * T^2 float32)
    per_layer = rows * tokens * (4 * shape.hidden + shape.intermediate) * shape.dtype_bytes
    return per_layer + 2 * rows * shape.heads * tokens * tokens * 4


def score_bytes(shape: ModelShape, *, rows: int, tokens: int) -> int:
    # full logits and their log_softmax over every position: 2 * B * T * V * 4, plus one layer's activations
    return 2 * rows * tokens * shape.vocab * LOGIT_BYTES + activation_bytes(shape, rows=rows, tokens=tokens)


def trace_bytes(shape: ModelShape, *, tokens: int, samples: int, batch_rows: int) -> int:
    # clean and corrupted states of every layer kept for replay: 2 * L * S * T * D,
    # the per-sample prefix KV cache copied into each batch of R rows,
    # one batch's activations, and its last-position logits R * V * 4 (x2 for softmax)
    rows = min(batch_rows, max(tokens * shape.layers * samples, 1))
    states = 2 * shape.layers * samples * tokens * shape.hidden * shape.dtype_bytes
    caches = kv_cache_bytes(shape, rows=rows + samples, tokens=tokens)
    return states + caches + activation_bytes(shape, rows=rows, tokens=tokens) + 2 * rows * shape.vocab * LOGIT_BYTES


def generate_bytes(shape: ModelShape, *, prompt_tokens: int, new_tokens: int) -> int:
    # the KV cache at its full length, the prefill's activations and one row of logits
    total = prompt_tokens + new_tokens
    return (
        kv_cache_bytes(shape, rows=1, tokens=total)
        + activation_bytes(shape, rows=1, tokens=prompt_tokens)
        + shape.vocab * LOGIT_BYTES
    )


def edit_bytes(shape: ModelShape, *, prompts: int, tokens: int, prefix_tokens: int, mom2_rows: int,
               mom2_seq_len: int) -> int:  # fmt: skip
    # v*: the prompts batch (N rewrite prompts + 1 KL) through every layer with autograd kept:
    #     L * B * T * (4 D + I) activations, the prefix KV cache, target logits B * T * V * 4 (x2);
    # covariance: one batch of mom2_batch_size texts of mom2_seq_len tokens, and C (D_in^2 float64);
    # prefixes: one sampled stream of prefix_tokens
    rows = prompts + 1
    grad = shape.layers * rows * tokens * (4 * shape.hidden + shape.intermediate) * shape.dtype_bytes
    v_star = grad + kv_cache_bytes(shape, rows=rows, tokens=tokens) + 2 * rows * tokens * shape.vocab * LOGIT_BYTES
    cov = activation_bytes(shape, rows=mom2_rows, tokens=mom2_seq_len) + 8 * shape.intermediate**2
    prefixes = generate_bytes(shape, prompt_tokens=2, new_tokens=prefix_tokens)
    return max(v_star, cov, prefixes)


def check_memory(what: str, estimate: int, limit_mb: int) -> None:
    """ResourceExhausted when ``estimate`` bytes exceed ``limit_mb`` (0: no limit)."""
    if limit_mb > 0 and estimate > limit_mb * MB:
        raise ResourceExhausted(
            f"this {what} needs about {estimate / MB:.0f} MB, over the limit max_request_memory_mb={limit_mb}: "
            "use fewer or shorter inputs"
        )


# -- concurrency ----------------------------------------------------------------


class Admission:
    """Counts running work by kind (``max_concurrent_<kind>s``), tokens and memory estimates in
    flight; refuses at once when a limit is reached, or when one call's estimate alone is over
    ``max_request_memory_mb``.

    A limit of 0 means no limit. Thread-safe (one lock around the counters).
    """

    def __init__(
        self,
        *,
        max_concurrent: dict[str, int],
        max_tokens_in_flight: int,
        max_memory_in_flight_mb: int = 0,
        max_request_memory_mb: int = 0,
    ) -> None:
        self._max = dict(max_concurrent)
        self._max_request_mb = max_request_memory_mb
        self._max_tokens = max_tokens_in_flight
        self._max_bytes = max_memory_in_flight_mb * MB
        self._lock = threading.Lock()
        self._running: dict[str, int] = dict.fromkeys(self._max, 0)
        self._tokens = 0
        self._bytes = 0  # the memory estimates of the admitted work

    @property
    def tokens_in_flight(self) -> int:
        return self._tokens

    @property
    def memory_in_flight(self) -> int:
        """Bytes: the sum of the running work's memory estimates."""
        return self._bytes

    def running(self, kind: str) -> int:
        return self._running.get(kind, 0)

    @contextlib.contextmanager
    def admit(self, kind: str, *, tokens: int, memory: int = 0) -> Iterator[None]:
        """Hold a slot of ``kind``, ``tokens`` tokens and ``memory`` estimated bytes for the block;
        ResourceExhausted if the call alone is over ``max_request_memory_mb`` or any of them is not free."""
        check_memory(kind, memory, self._max_request_mb)
        with self._lock:
            limit = self._max.get(kind, 0)
            if limit > 0 and self._running.get(kind, 0) >= limit:
                raise ResourceExhausted(
                    f"{self._running[kind]} {kind} calls are running, the limit max_concurrent_{kind}s={limit} "
                    "is reached: retry later"
                )
            if self._max_tokens > 0 and self._tokens + tokens > self._max_tokens:
                raise ResourceExhausted(
                    f"{self._tokens} tokens are in flight and this {kind} adds {tokens}, over the limit "
                    f"max_tokens_in_flight={self._max_tokens}: retry later or send less"
                )
            if self._max_bytes > 0 and self._bytes + memory > self._max_bytes:
                raise ResourceExhausted(
                    f"running work holds about {self._bytes / MB:.0f} MB and this {kind} needs about "
                    f"{memory / MB:.0f} MB more, over the limit max_memory_in_flight_mb={self._max_bytes // MB}: "
                    "retry later or send less"
                )
            self._running[kind] = self._running.get(kind, 0) + 1
            self._tokens += tokens
            self._bytes += memory
        try:
            yield
        finally:
            with self._lock:
                self._running[kind] -= 1
                self._tokens -= tokens
                self._bytes -= memory
