"""Averages over many facts (the paper's Figure 2): the indirect effect by layer
at the last subject token and at the last token, and the ROME authors' fact list.

    facts = load_known_facts("known_1000.json", limit=100)
    s = trace_summary(loaded, facts, kind="mlp")
    s.peak_layer          # where restoring the last subject token helps most
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import InvalidRequest
from ..loading import LoadedModel
from .grid import restore_cells, start_runs
from .noise import NoiseCache, resolve_noise
from .request import Progress, TraceRequest
from .runs import CorruptedRuns

log = logging.getLogger(__name__)


class Fact(NamedTuple):
    prompt: str
    subject: str
    answer: str | None = None  # None: trace the model's own greedy prediction


def load_known_facts(path: str | Path, *, limit: int | None = None, use_attribute: bool = False) -> list[Fact]:
    """Facts of the ROME authors' ``known_1000.json`` (records: subject, attribute, template,
    prompt, relation_id). ``use_attribute`` traces " <attribute>" instead of the model's prediction."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    facts = [
        Fact(r["prompt"], r["subject"], " " + r["attribute"].lstrip() if use_attribute else None)
        for r in records[:limit]
    ]
    log.info("loaded %d facts from %s", len(facts), path)
    return facts


@dataclass(frozen=True)
class TraceSummary:
    kind: str
    num_layers: int
    n_facts: int  # facts averaged
    n_skipped: int  # facts left out (subject not found, clean probability below the threshold)
    last_subject_effect: list[float]  # (L,) mean IE restoring at the last subject token
    last_token_effect: list[float]  # (L,) mean IE restoring at the last prompt token
    mean_clean_prob: float
    mean_corrupted_prob: float
    noise: float  # one std for every fact
    samples: int
    window: int
    seconds: float
    forward_passes: int  # over all facts, skipped ones included

    @property
    def peak_layer(self) -> int:
        """The layer where restoring at the last subject token helps most."""
        return max(range(self.num_layers), key=self.last_subject_effect.__getitem__)


def _trace_two_tokens(
    loaded: LoadedModel, req: TraceRequest, noise_std: float, min_clean_prob: float, max_batch_rows: int
) -> tuple[CorruptedRuns | None, torch.Tensor | None]:
    """Restored P(answer) at the last subject token and the last token, (2, L); None when
    the fact cannot be traced (no runs) or its clean P(answer) is below ``min_clean_prob``."""
    try:
        with torch.inference_mode():
            runs = start_runs(loaded, req, noise_std)
    except InvalidRequest as e:
        log.warning("skipping a fact: %s", e)
        return None, None
    clean = runs.clean
    if clean.prob < min_clean_prob:
        log.debug("skipping %r: P(answer) %.3f < %.3f", req.prompt, clean.prob, min_clean_prob)
        return runs, None
    rows = (clean.subject_range[1] - 1, clean.num_tokens - 1)
    with torch.inference_mode():
        cells = [(t, layer) for t in rows for layer in range(clean.num_layers)]
        scores = restore_cells(runs, cells, max_batch_rows=max_batch_rows)
    return runs, scores.view(2, clean.num_layers)


def trace_summary(
    loaded: LoadedModel,
    facts: Sequence[tuple[str, str, str | None]],
    *,
    kind: str = "mlp",
    samples: int = 10,
    window: int = 10,
    noise: float | None = None,
    seed: int = 0,
    min_clean_prob: float = 0.0,
    max_facts: int | None = None,
    noise_cache: NoiseCache | None = None,
    progress: Progress | None = None,
    max_batch_rows: int = 128,
) -> TraceSummary:
    """Average indirect effect by layer at the last subject token and at the last token.

    Only those two token rows of each fact's grid are computed. Facts whose
    subject is missing from the prompt, or whose clean P(answer) is below
    ``min_clean_prob``, are skipped (and counted); the work stops once ``max_facts``
    facts are averaged. ``progress(done_facts, total_facts)`` runs after each fact,
    e.g. with tqdm: ``progress=lambda d, n: bar.update(d - bar.n)``.
    """
    t0 = time.perf_counter()
    noise_std = resolve_noise(loaded, noise, noise_cache)
    num_layers = loaded.spec.num_layers(loaded.model)
    subject_sum = torch.zeros(num_layers)
    last_sum = torch.zeros(num_layers)
    clean_sum = corrupted_sum = 0.0
    used = skipped = passes = 0
    for i, (prompt, subject, answer) in enumerate(facts):
        # each fact gets its own noise draws (seed + i); a bad kind/samples/window raises here
        req = TraceRequest(prompt, subject, answer, kind, noise_std, samples, window, seed + i)
        runs, scores = _trace_two_tokens(loaded, req, noise_std, min_clean_prob, max_batch_rows)
        passes += 1 + runs.passes if runs is not None else 0  # the clean run, then the corrupted ones
        if runs is None or scores is None:
            skipped += 1
        else:
            subject_sum += scores[0] - runs.prob
            last_sum += scores[1] - runs.prob
            clean_sum += runs.clean.prob
            corrupted_sum += runs.prob
            used += 1
        if progress is not None:
            progress(i + 1, len(facts))
        if max_facts is not None and used >= max_facts:
            break
    if used == 0:
        raise InvalidRequest(
            f"none of the {len(facts)} facts could be traced (subject missing from the prompt, "
            f"or clean probability below min_clean_prob={min_clean_prob})"
        )
    summary = TraceSummary(
        kind=kind,
        num_layers=num_layers,
        n_facts=used,
        n_skipped=skipped,
        last_subject_effect=(subject_sum / used).tolist(),
        last_token_effect=(last_sum / used).tolist(),
        mean_clean_prob=clean_sum / used,
        mean_corrupted_prob=corrupted_sum / used,
        noise=noise_std,
        samples=samples,
        window=window,
        seconds=time.perf_counter() - t0,
        forward_passes=passes,
    )
    log.info(
        "trace summary (%s) over %d facts (%d skipped) in %.1f s: peak at layer %d",
        kind,
        used,
        skipped,
        summary.seconds,
        summary.peak_layer,
    )
    return summary
