"""The batched (T, L) grid: many (cell, sample) restorations per forward pass.

Rows of the same restored token share a batch, the KV cache of the positions
before it, and the replayed corrupted blocks below their first restored layer
(``CorruptedRuns.run_rows``); cells before the subject, which the noise never
reaches, score the corrupted probability without a pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from ..errors import InvalidRequest
from ..loading import LoadedModel
from .noise import NoiseCache, resolve_noise
from .request import Progress, TraceRequest, TraceResult
from .runs import CorruptedRuns, run_clean

log = logging.getLogger(__name__)


def restore_cells(
    runs: CorruptedRuns,
    cells: Sequence[tuple[int, int]],
    *,
    max_batch_rows: int,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Mean restored P(answer) of each (token, layer) cell, (C,).

    Rows (cell, sample) of the same token share batches of at most
    ``max_batch_rows`` rows. A state before the subject is the same in the
    clean and corrupted runs (the noise has not reached it), so those cells
    score the corrupted probability without a pass.
    """
    num_samples, subject_start = runs.num_samples, runs.clean.subject_range[0]
    first_restored = runs.clean.first_restored
    scores = torch.full((len(cells),), runs.prob)
    by_token: dict[int, list[int]] = {}
    for i, (token, _layer) in enumerate(cells):
        if token >= subject_start:
            by_token.setdefault(token, []).append(i)
    done_rows = (len(cells) - sum(map(len, by_token.values()))) * num_samples
    sums = torch.zeros(len(cells))
    for token, cell_ids in sorted(by_token.items()):
        # rows in order of the first layer they restore, so that a batch can skip the blocks below its first
        rows = sorted(
            ((c, s) for c in cell_ids for s in range(num_samples)), key=lambda r: first_restored[cells[r[0]][1]]
        )
        n_batches = -(-len(rows) // max_batch_rows)
        size = -(-len(rows) // n_batches)  # even batches: 300 rows by 128 -> 100, 100, 100
        for first in range(0, len(rows), size):
            batch = rows[first : first + size]
            skip = first_restored[cells[batch[0][0]][1]]
            probs = runs.run_rows([s for _, s in batch], [cells[c] for c, _ in batch], start=token, skip=skip)
            sums.index_add_(0, torch.tensor([c for c, _ in batch]), probs.float().cpu())
            done_rows += len(batch)
            if progress is not None:
                progress(done_rows // num_samples, len(cells))
        scores[cell_ids] = sums[cell_ids] / num_samples
    return scores


def start_runs(loaded: LoadedModel, req: TraceRequest, noise_std: float) -> CorruptedRuns:
    """The clean run of ``req`` (one forward pass) and its corrupted runs, not yet run."""
    clean = run_clean(loaded, req)
    return CorruptedRuns(loaded, clean, noise_std, samples=req.samples, seed=req.seed)


def trace_result(
    req: TraceRequest, runs: CorruptedRuns, scores: torch.Tensor, t0: float, *, extra_passes: int = 0
) -> TraceResult:
    """The result of a trace that started at ``t0``; forward passes: the clean run's, ``runs``'
    and ``extra_passes`` run outside them."""
    clean = runs.clean
    corrupted_prob = runs.prob  # before counting the passes: the corrupted runs may run here
    return TraceResult(
        tokens=list(clean.tokens),
        subject_range=clean.subject_range,
        answer=clean.answer,
        answer_id=clean.answer_id,
        clean_prob=clean.prob,
        corrupted_prob=corrupted_prob,
        scores=scores,
        kind=req.kind,
        noise=runs.noise_std,
        samples=req.samples,
        window=req.window,
        seconds=time.perf_counter() - t0,
        forward_passes=1 + runs.passes + extra_passes,
    )


def trace(
    loaded: LoadedModel,
    req: TraceRequest,
    *,
    noise_cache: NoiseCache | None = None,
    progress: Progress | None = None,
    max_batch_rows: int = 128,
) -> TraceResult:
    """The (T, L) causal trace of ``req``, many restorations per forward pass.

    A batch holds at most ``max_batch_rows`` (cell, sample) rows, which bounds
    activation memory on big models. ``progress(done_cells, total_cells)`` runs
    after each batch; an exception it raises aborts the trace.
    """
    if max_batch_rows < 1:
        raise InvalidRequest(f"max_batch_rows must be >= 1, got {max_batch_rows}")
    t0 = time.perf_counter()
    with torch.inference_mode():
        runs = start_runs(loaded, req, resolve_noise(loaded, req.noise, noise_cache))
        num_tokens, num_layers = runs.clean.num_tokens, runs.clean.num_layers
        cells = [(t, layer) for t in range(num_tokens) for layer in range(num_layers)]
        scores = restore_cells(runs, cells, max_batch_rows=max_batch_rows, progress=progress)
    result = trace_result(req, runs, scores.view(num_tokens, num_layers), t0)
    log.info(
        "traced %s over %d x %d cells in %.2f s (%d forward passes)",
        req.kind,
        num_tokens,
        num_layers,
        result.seconds,
        result.forward_passes,
    )
    return result
