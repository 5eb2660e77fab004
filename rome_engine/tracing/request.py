"""What a trace is asked for and what it returns: ``TraceRequest`` (validated on
construction, with the library's bounds) and ``TraceResult`` (the (T, L) grid).

The bounds here are sanity bounds of the library (values past them are
meaningless or overflow); what a server accepts is its own, tighter limit
(``EngineLimits.max_trace_samples``, ``max_trace_cells``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InvalidRequest

KINDS = ("hidden", "mlp", "attn")
MAX_SAMPLES = 4096  # noise draws per cell: far past any use (the paper takes 10); servers limit lower
# noise std at most this: the paper's default is 3 x the embeddings' std (about 0.1 - 1); far above,
# corrupted activations overflow (3e38 gave NaN grids)
MAX_NOISE = 1000.0
MAX_WINDOW = 1024  # layers restored together: more than any supported model has

Progress = Callable[[int, int], None]  # (done, total); may raise to abort the work


@dataclass(frozen=True)
class TraceRequest:
    prompt: str
    subject: str  # must occur in the prompt
    answer: str | None = None  # None: the model's greedy next token; else its first token is traced
    kind: str = "hidden"  # hidden | mlp | attn
    noise: float | None = None  # std of the embedding noise; None: 3 x std of subject embeddings
    samples: int = 10  # noise draws averaged per cell
    window: int = 10  # layers restored together for mlp/attn (hidden restores one block)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.prompt:
            raise InvalidRequest("prompt must not be empty")
        if not self.subject.strip():
            raise InvalidRequest("subject must not be empty: give the words of the prompt to corrupt")
        if self.kind not in KINDS:
            raise InvalidRequest(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 1 <= self.samples <= MAX_SAMPLES:
            raise InvalidRequest(f"samples must be in [1, {MAX_SAMPLES}], got {self.samples}")
        if not 1 <= self.window <= MAX_WINDOW:
            raise InvalidRequest(f"window must be in [1, {MAX_WINDOW}], got {self.window}")
        if self.noise is not None and not (math.isfinite(self.noise) and 0.0 <= self.noise <= MAX_NOISE):
            raise InvalidRequest(
                f"noise must be a number in [0, {MAX_NOISE}] (or unset for the default), got {self.noise}"
            )
        if self.answer is not None and not self.answer:
            raise InvalidRequest("answer must not be an empty string (leave it unset for the greedy token)")
        if self.seed < 0:
            raise InvalidRequest(f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class TraceResult:
    tokens: list[str]  # the prompt's tokens, decoded one by one
    subject_range: tuple[int, int]  # [start, end) in tokens
    answer: str  # the traced answer token, decoded
    answer_id: int
    clean_prob: float
    corrupted_prob: float
    scores: torch.Tensor  # (T, L) restored probabilities P(answer), float32 on the CPU
    kind: str
    noise: float  # the std used: the request's, or the model's default level
    samples: int
    window: int
    seconds: float
    forward_passes: int  # the clean run, the corrupted runs and their KV prefixes, the restorations

    @property
    def indirect_effect(self) -> torch.Tensor:
        # IE(t, l) = P_restored(t, l) - P_corrupted
        return self.scores - self.corrupted_prob  # (T, L)

    @property
    def peak(self) -> tuple[int, int]:
        """(token index, layer) of the highest restored probability."""
        flat = int(torch.argmax(self.scores))
        return divmod(flat, self.scores.shape[1])
