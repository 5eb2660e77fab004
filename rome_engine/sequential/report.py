"""The sequential evaluation's results: per edit, per checkpoint, per method; as JSON and text.

The report is rebuilt (frozen) after every checkpoint, so what is written then
says how far the run got (``complete``, ``done``) and survives an interruption.

    report.to_json()            # the whole run so far
    report.format_tables()      # one table per checkpoint, one column per method
    report.curves()             # {method: {metric: [(edits, value), ...]}} for a plot
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..evaluation import _pct
from .measure import Metrics


@dataclass(frozen=True)
class EditOutcome:
    """One edit through the ApplyEdit path (compute the layer, store it, serve it)."""

    index: int  # 1-based: the index-th edit of its method
    case_id: int
    seconds: float  # compute + store + activate
    compute_seconds: float
    store_seconds: float
    activate_seconds: float
    version: int  # the head version it made (0: refused)
    target_before: float  # P(target | edit prompt) before and with the layer, as the layer header records
    target_after: float
    error: str = ""  # why the path refused it ("": applied)


def _quantile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank quantile: the ceil(q n)-th smallest value."""
    if not xs:
        return float("nan")
    ordered = sorted(xs)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@dataclass(frozen=True)
class EditTimes:
    """Seconds per edit over the edits so far (refused ones included: they cost the same work)."""

    n: int
    median: float
    p95: float
    first10_median: float  # the first 10 edits
    last10_median: float  # the 10 latest: next to first10_median, whether time grows with active edits
    compute_median: float  # the parts of an edit: computing the layer (v* steps, probabilities) ...
    store_median: float  # ... writing the layer file and the manifest ...
    activate_median: float  # ... rebuilding the live weights from the base and every active layer
    # store + activate, the part of the path that grows with the number of active layers, early vs late
    overhead_first10_median: float
    overhead_last10_median: float

    @staticmethod
    def of(edits: Sequence[EditOutcome]) -> EditTimes:
        s = [e.seconds for e in edits]
        return EditTimes(
            n=len(s),
            median=_median(s),
            p95=_quantile(s, 0.95),
            first10_median=_median(s[:10]),
            last10_median=_median(s[-10:]),
            compute_median=_median([e.compute_seconds for e in edits]),
            store_median=_median([e.store_seconds for e in edits]),
            activate_median=_median([e.activate_seconds for e in edits]),
            overhead_first10_median=_median([e.store_seconds + e.activate_seconds for e in edits[:10]]),
            overhead_last10_median=_median([e.store_seconds + e.activate_seconds for e in edits[-10:]]),
        )


@dataclass(frozen=True)
class Checkpoint:
    """All edits so far of one method, measured: ``edited`` vs the same records ``unedited``."""

    method: str
    n_edits: int  # records edited so far (refused ones included, measured as they are)
    n_failed: int  # of which the ApplyEdit path refused
    edited: Metrics
    unedited: Metrics
    times: EditTimes
    edit_seconds: float  # wall time of all edits so far
    measure_seconds: float  # wall time of measuring this checkpoint


@dataclass(frozen=True)
class MethodRun:
    method: str
    store: str  # the edit store folder the method's layers went to
    checkpoints: tuple[Checkpoint, ...]
    edits: tuple[EditOutcome, ...]


@dataclass(frozen=True)
class RunProgress:
    """How far a run got: the method running last, its edits and last checkpoint so far."""

    method: str | None
    edits: int
    checkpoint: int
    methods_done: int  # methods that made all their edits


@dataclass(frozen=True)
class SequentialReport:
    model_id: str
    case_ids: tuple[int, ...]  # the records, in edit order
    checkpoints: tuple[int, ...]
    methods: tuple[str, ...]
    hparams: Mapping[str, float]
    layer: int | None
    unedited: Metrics  # over all the records, before any edit
    known_tried: int  # known facts asked of the unedited model
    known_correct: int  # ... answered right: the retention set
    baseline_seconds: float
    runs: tuple[MethodRun, ...]
    complete: bool
    seconds: float

    @property
    def done(self) -> RunProgress:
        if not self.runs:
            return RunProgress(None, 0, 0, 0)
        last = self.runs[-1]
        return RunProgress(
            method=last.method,
            edits=len(last.edits),
            checkpoint=last.checkpoints[-1].n_edits if last.checkpoints else 0,
            methods_done=sum(len(r.edits) == len(self.case_ids) for r in self.runs),
        )

    def to_json(self) -> str:
        data = dataclasses.asdict(dataclasses.replace(self, hparams={}))  # a mappingproxy does not deep-copy
        data["hparams"] = dict(self.hparams)
        data["done"] = dataclasses.asdict(self.done)
        return json.dumps(_finite(data), indent=1, default=str)

    def checkpoint(self, method: str, n_edits: int) -> Checkpoint | None:
        for run in self.runs:
            if run.method == method:
                return next((c for c in run.checkpoints if c.n_edits == n_edits), None)
        return None

    def format_checkpoint(self, n_edits: int) -> str:
        """One checkpoint as a table: the unedited model and each method that reached it."""
        cps = [c for c in (self.checkpoint(m, n_edits) for m in self.methods) if c is not None]
        if not cps:
            return ""
        head = f"{'metric':<34}{'unedited':>10}" + "".join(f"{c.method:>12}" for c in cps)
        lines = [f"After {n_edits} sequential edits ({self.model_id})", head]
        for name, label in _ROWS:
            cells = [getattr(cps[0].unedited, name)] + [getattr(c.edited, name) for c in cps]
            fmt = _num if name in ("fluency", "perplexity") else _pct
            lines.append(f"{label:<34}{fmt(cells[0]):>10}" + "".join(f"{fmt(x):>12}" for x in cells[1:]))
        lines.append(f"{'Edits refused':<34}{'':>10}" + "".join(f"{c.n_failed:>12}" for c in cps))
        for label, attr, digits in (
            ("Edit s median / p95", ("median", "p95"), 1),
            ("Edit s first 10 / last 10 (median)", ("first10_median", "last10_median"), 1),
            ("Store+activate s first/last 10", ("overhead_first10_median", "overhead_last10_median"), 2),
        ):
            cells = ["/".join(_num(getattr(c.times, a), digits) for a in attr) for c in cps]
            lines.append(f"{label:<34}{'':>10}" + "".join(f"{x:>12}" for x in cells))
        cells = [f"{c.measure_seconds:.0f}" for c in cps]
        lines.append(f"{'Measuring this checkpoint (s)':<34}{'':>10}" + "".join(f"{x:>12}" for x in cells))
        return "\n".join(lines)

    def format_tables(self) -> str:
        known = f"{self.known_correct}/{self.known_tried} known facts right unedited"
        state = "complete" if self.complete else f"interrupted or running: {self.done}"
        tables = [self.format_checkpoint(n) for n in self.checkpoints]
        head = f"Sequential CounterFact edits on {self.model_id}: {len(self.case_ids)} records, {known}; {state}"
        return "\n\n".join([head, *(t for t in tables if t)]) + "\n"

    def curves(self) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """{line: {metric: [(edits, value), ...]}}: one line per method, and "unedited" (the same
        records before any edit, from the first method's checkpoints)."""
        out: dict[str, dict[str, list[tuple[int, float]]]] = {}
        for run in self.runs:
            if not run.checkpoints:
                continue
            if "unedited" not in out:
                out["unedited"] = _series([(c.n_edits, c.unedited) for c in run.checkpoints])
            out[run.method] = _series([(c.n_edits, c.edited) for c in run.checkpoints])
        return out


_ROWS = (
    ("efficacy", "Efficacy (P new > P true)"),
    ("paraphrase", "Paraphrase (P new > P true)"),
    ("neighborhood", "Neighborhood (P true > P new)"),
    ("score", "Score (harmonic mean)"),
    ("greedy_efficacy", "Greedy answer = new object"),
    ("greedy_paraphrase", "Greedy paraphrase = new object"),
    ("neighbor_unchanged", "Neighbour greedy unchanged"),
    ("known_retention", "Known facts retained (greedy)"),
    ("fluency", "Fluency (n-gram entropy, bits)"),
    ("perplexity", "Held-text perplexity"),
)
METRIC_NAMES = tuple(name for name, _ in _ROWS)


def _series(points: Sequence[tuple[int, Metrics]]) -> dict[str, list[tuple[int, float]]]:
    return {name: [(n, getattr(m, name)) for n, m in points] for name in METRIC_NAMES}


def _num(x: float, digits: int = 3) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _finite(x: object) -> object:
    """NaN and infinities become null (JSON has neither)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
