"""Running the sequential evaluation: N edits one after another, never reverted, measured at checkpoints.

Each edit goes through the path ApplyEdit takes (``editing.EditManager`` over a
real ``EditStore``): compute the layer on the current weights, store it as the
next version, make that version live. Methods run one after another on the same
records, each with its own store folder, and the live weights go back to the
base (bit for bit, ``LayerWeights.materialize([])``) between methods and at the
end. The unedited model is measured once, before the first edit.

A method is a name mapped to a factory of its compute function (the one
``EditManager`` calls); adding a method is one entry of ``METHODS``.

    config = SequentialConfig(checkpoints=(10, 100, 300), methods=("rome",))
    report = run_sequential(loaded, records, config, known=facts, out=Path("seq.json"))
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from ..edit_store import EditLayer, EditStore
from ..editing import ComputeFn, EditManager, ProgressFn, method_compute
from ..errors import EngineError, FailedPrecondition, InvalidRequest
from ..evaluation import CounterFactRecord, FactScores
from ..fileio import atomic_write
from ..loading import LoadedModel
from ..records import METHODS as METHOD_NAMES
from ..rome import EditRequest
from .measure import (
    KnownAnswer,
    Metrics,
    held_perplexity,
    known_answered,
    known_window,
    measure_records,
    metrics_of,
    record_window,
    unrelated_known,
)
from .report import Checkpoint, EditOutcome, EditTimes, MethodRun, SequentialReport

log = logging.getLogger(__name__)

# (cache_dir, corpus) -> the compute function EditManager calls (see editing.ComputeFn), which gets
# the method's name with every edit
MethodFactory = Callable[[Path | None, Path | None], ComputeFn]
METHODS: Mapping[str, MethodFactory] = MappingProxyType(dict.fromkeys(METHOD_NAMES, method_compute))


@dataclass(frozen=True)
class SequentialConfig:
    checkpoints: tuple[int, ...]  # edits after which to measure, ascending; the last is the number of edits
    methods: tuple[str, ...] = ("rome",)
    hparams: Mapping[str, float] = field(default_factory=dict)  # overrides sent with every edit
    layer: int | None = None  # None: the model's default layer
    fluency_tokens: int = 40  # greedy tokens per record for the fluency entropy (0: not measured)
    author: str = "sequential-eval"

    def __post_init__(self) -> None:
        cps = self.checkpoints
        if not cps or any(b <= a for a, b in zip(cps, cps[1:], strict=False)) or cps[0] < 1:
            raise InvalidRequest(f"checkpoints must be ascending edit counts >= 1, got {list(cps)}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise InvalidRequest(f"methods must be distinct names, got {list(self.methods)}")
        object.__setattr__(self, "hparams", MappingProxyType(dict(self.hparams)))

    @property
    def n_edits(self) -> int:
        return self.checkpoints[-1]


def parse_checkpoints(text: str | None, n_edits: int) -> tuple[int, ...]:
    """"10,100,300" -> (10, 100, 300), with ``n_edits`` added as the last; None: (10, 100, 300, 1000)
    up to ``n_edits``. InvalidRequest for a checkpoint past ``n_edits`` or a non-number."""
    if n_edits < 1:
        raise InvalidRequest(f"the number of sequential edits must be >= 1, got {n_edits}")
    try:
        given = [int(x) for x in text.split(",") if x.strip()] if text else [10, 100, 300, 1000]
    except ValueError as e:
        raise InvalidRequest(f"checkpoints must be comma-separated edit counts, got {text!r}") from e
    if text and any(c > n_edits for c in given):
        raise InvalidRequest(f"checkpoints {given} go past the {n_edits} edits")
    return tuple(sorted({c for c in given if 1 <= c <= n_edits} | {n_edits}))


# -- the unedited model, measured once ------------------------------------------


@dataclass(frozen=True)
class Baseline:
    scores: tuple[FactScores, ...]  # per record, before any edit
    windows: tuple[int, ...]  # greedy tokens read per record
    known: tuple[tuple[KnownAnswer, int], ...]  # the facts answered right unedited, with their windows
    known_tried: int
    perplexity: float  # of the held text
    seconds: float

    def metrics(self, n: int) -> Metrics:
        """The unedited model over the first ``n`` records."""
        scores = self.scores[:n]
        retention = 1.0 if self.known else float("nan")
        return metrics_of(scores, scores, known_retention=retention, perplexity=self.perplexity)


def measure_baseline(
    loaded: LoadedModel,
    records: Sequence[CounterFactRecord],
    known: Sequence[KnownAnswer],
    *,
    fluency_tokens: int,
    progress: ProgressFn | None = None,
) -> Baseline:
    t0 = time.perf_counter()
    windows = tuple(record_window(loaded, r) for r in records)
    counted = _stage(progress, "baseline")
    scores = measure_records(loaded, records, windows, fluency_tokens=fluency_tokens, progress=counted)
    known_windows = [known_window(loaded, f) for f in known]
    answered = known_answered(loaded, known, known_windows, progress=_stage(progress, "baseline: known facts"))
    right = tuple((f, w) for f, w, ok in zip(known, known_windows, answered, strict=True) if ok)
    baseline = Baseline(tuple(scores), windows, right, len(known), held_perplexity(loaded), time.perf_counter() - t0)
    log.info(
        "unedited model: %d records measured, %d/%d known facts right, held-text perplexity %.2f, %.0f s",
        len(records), len(right), len(known), baseline.perplexity, baseline.seconds,
    )  # fmt: skip
    return baseline


def measure_edited(
    loaded: LoadedModel,
    records: Sequence[CounterFactRecord],
    baseline: Baseline,
    *,
    fluency_tokens: int,
    progress: ProgressFn | None = None,
) -> Metrics:
    """The live model over ``records`` (the first of the baseline's), against their unedited scores."""
    n = len(records)
    windows = baseline.windows[:n]
    counted = _stage(progress, "measure")
    scores = measure_records(loaded, records, windows, fluency_tokens=fluency_tokens, progress=counted)
    asked = unrelated_known(baseline.known, {r.subject for r in records})
    facts, windows = [f for f, _ in asked], [w for _, w in asked]
    kept = known_answered(loaded, facts, windows, progress=_stage(progress, "measure: known facts"))
    retention = sum(kept) / len(kept) if kept else float("nan")
    return metrics_of(
        scores, baseline.scores[:n], known_retention=retention, perplexity=held_perplexity(loaded),
        known_excluded=len(baseline.known) - len(asked),
    )  # fmt: skip


def _stage(progress: ProgressFn | None, stage: str) -> Callable[[int, int], None] | None:
    return None if progress is None else lambda done, total: progress(stage, done, total)


def _report(progress: ProgressFn | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


# -- one edit through the ApplyEdit path ------------------------------------------
# The two functions below are the only ones that read what EditManager returns (a layer
# header and a manifest entry).


def _commit(manager: EditManager, layer: EditLayer) -> tuple[int, float]:
    """Store the layer as the next version and serve it, as ApplyEdit does: (version, seconds storing)."""
    t0 = time.perf_counter()
    entry = manager.store_layer(layer)
    stored = time.perf_counter() - t0
    manager.activate(entry.active, entry.version)
    return entry.version, stored


def _target_probabilities(layer: EditLayer) -> tuple[float, float]:
    """P(target | edit prompt) before and with the layer, as its header records them."""
    probs = layer.header.fact_probabilities
    return probs.target_before, probs.target_after


def apply_record(
    manager: EditManager, method: str, rec: CounterFactRecord, index: int, config: SequentialConfig
) -> EditOutcome:
    """Edit one record in; an edit the path refuses (a typed engine error) is recorded, not raised."""
    t0 = time.perf_counter()
    try:
        request = EditRequest(rec.prompt, rec.subject, rec.target_new, layer=config.layer, hparams=config.hparams)
        comment = f"sequential eval: CounterFact case {rec.case_id}"
        layer = manager.compute_layer([request], method, author=config.author, comment=comment)
        computed = time.perf_counter()
        version, stored = _commit(manager, layer)
    except EngineError as e:
        seconds = time.perf_counter() - t0
        log.warning("edit %d (case %d, %r -> %r) refused: %s", index, rec.case_id, rec.subject, rec.target_new, e)
        nan = float("nan")
        return EditOutcome(index, rec.case_id, seconds, seconds, 0.0, 0.0, 0, nan, nan, f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    before, after = _target_probabilities(layer)
    return EditOutcome(
        index=index,
        case_id=rec.case_id,
        seconds=end - t0,
        compute_seconds=computed - t0,
        store_seconds=stored,
        activate_seconds=end - computed - stored,
        version=version,
        target_before=before,
        target_after=after,
    )


# -- the run --------------------------------------------------------------------------


def run_sequential(
    loaded: LoadedModel,
    records: Sequence[CounterFactRecord],
    config: SequentialConfig,
    *,
    known: Sequence[KnownAnswer] = (),
    cache_dir: Path | None = None,
    corpus: Path | None = None,
    store_dir: Path | None = None,
    out: Path | None = None,
    methods: Mapping[str, MethodFactory] = METHODS,
    progress: ProgressFn | None = None,
    on_checkpoint: Callable[[SequentialReport, Checkpoint], None] | None = None,
) -> SequentialReport:
    """Edit the first ``config.n_edits`` records in with each method in turn, measuring at each checkpoint.

    ``out``: the report's JSON, rewritten (atomically) after every checkpoint. ``store_dir``: a folder
    for the methods' edit stores (``<store_dir>/<method>``, which must be new); None: a temporary one.
    ``progress(stage, done, total)``: "edit" counts the edits of all methods together; "baseline" and
    "measure" (then "...: known facts") count the greedy continuations of a measurement.
    The model ends as it started (its base weights).
    """
    t0 = time.perf_counter()
    unknown = [m for m in config.methods if m not in methods]
    if unknown:
        raise InvalidRequest(f"unknown method(s) {', '.join(unknown)}: known are {', '.join(methods)}")
    if len(records) < config.n_edits:
        raise InvalidRequest(f"{config.n_edits} edits asked, but only {len(records)} records given")
    records = list(records[: config.n_edits])
    for method in config.methods if store_dir is not None else ():
        _check_new(Path(store_dir) / method)
    baseline = measure_baseline(loaded, records, known, fluency_tokens=config.fluency_tokens, progress=progress)
    report = SequentialReport(
        model_id=loaded.model_id,
        case_ids=tuple(r.case_id for r in records),
        checkpoints=config.checkpoints,
        methods=config.methods,
        hparams=config.hparams,
        layer=config.layer,
        unedited=baseline.metrics(len(records)),
        known_tried=baseline.known_tried,
        known_correct=len(baseline.known),
        baseline_seconds=baseline.seconds,
        runs=(),
        complete=False,
        seconds=time.perf_counter() - t0,
    )
    _write(out, report)
    runner = _Runner(loaded, records, baseline, config, progress, out, on_checkpoint, t0, report)
    with _store_root(store_dir) as root:
        for m, method in enumerate(config.methods):
            compute = methods[method](cache_dir, corpus)
            _check_new(root / method)
            store = EditStore(root / method, loaded.model_id)
            runner.run_method(m, method, EditManager(loaded, store, compute=compute))
    report = replace(runner.report, complete=True, seconds=time.perf_counter() - t0)
    _write(out, report)
    return report


@dataclass
class _Runner:
    """The state of one run between checkpoints: the report so far, and where it goes."""

    loaded: LoadedModel
    records: list[CounterFactRecord]
    baseline: Baseline
    config: SequentialConfig
    progress: ProgressFn | None
    out: Path | None
    on_checkpoint: Callable[[SequentialReport, Checkpoint], None] | None
    t0: float
    report: SequentialReport

    def run_method(self, m: int, method: str, manager: EditManager) -> None:
        """The ``m``-th method: every record edited in, checkpoints measured, then the base weights back."""
        n, cfg = len(self.records), self.config
        run = MethodRun(method, str(manager.store.root), (), ())
        try:
            for i, rec in enumerate(self.records):
                run = replace(run, edits=(*run.edits, apply_record(manager, method, rec, i + 1, cfg)))
                _report(self.progress, "edit", m * n + i + 1, n * len(cfg.methods))
                if i + 1 in cfg.checkpoints:
                    run = self.checkpoint(m, run)
        finally:
            manager.activate([], 0)  # the base weights again, bit for bit, for the next method

    def checkpoint(self, m: int, run: MethodRun) -> MethodRun:
        """Measure the live model over the edits so far; the report is rewritten and announced."""
        cp = _checkpoint(self.loaded, self.records[: len(run.edits)], self.baseline, run, self.config, self.progress)
        run = replace(run, checkpoints=(*run.checkpoints, cp))
        self.report = replace(self.report, runs=(*self.report.runs[:m], run), seconds=time.perf_counter() - self.t0)
        _write(self.out, self.report)
        e = cp.edited
        log.info(
            "%s after %d edits: efficacy %.3f, paraphrase %.3f, neighborhood %.3f, greedy %.3f, retention %.3f, "
            "perplexity %.2f; edit median %.1f s; measured in %.0f s",
            run.method, cp.n_edits, e.efficacy, e.paraphrase, e.neighborhood, e.greedy_efficacy, e.known_retention,
            e.perplexity, cp.times.median, cp.measure_seconds,
        )  # fmt: skip
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.report, cp)
        return run


def _check_new(folder: Path) -> None:
    """A method's edit store starts empty: the run never builds on earlier edits."""
    if folder.exists() and any(folder.iterdir()):
        raise FailedPrecondition(f"edit store {folder} is not empty: give a new store folder")


def _checkpoint(
    loaded: LoadedModel,
    records: Sequence[CounterFactRecord],
    baseline: Baseline,
    run: MethodRun,
    config: SequentialConfig,
    progress: ProgressFn | None,
) -> Checkpoint:
    t0 = time.perf_counter()
    edited = measure_edited(loaded, records, baseline, fluency_tokens=config.fluency_tokens, progress=progress)
    return Checkpoint(
        method=run.method,
        n_edits=len(records),
        n_failed=sum(bool(e.error) for e in run.edits),
        edited=edited,
        unedited=baseline.metrics(len(records)),
        times=EditTimes.of(run.edits),
        edit_seconds=sum(e.seconds for e in run.edits),
        measure_seconds=time.perf_counter() - t0,
    )


@contextlib.contextmanager
def _store_root(store_dir: Path | None) -> Iterator[Path]:
    if store_dir is not None:
        yield Path(store_dir)
        return
    with tempfile.TemporaryDirectory(prefix="romegw-seq-") as tmp:
        yield Path(tmp)


def _write(out: Path | None, report: SequentialReport) -> None:
    if out is not None:
        atomic_write(Path(out), report.to_json().encode("utf-8"))
