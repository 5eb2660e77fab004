"""The jobs of the ``rome-gateway`` command that load a model in this process (no server):
the paper's Figure-2 trace summary over a facts file, the CounterFact evaluation, and the
sequential evaluation (many edits in a row, never reverted).

Each is one call from the command line's arguments to its result; the command draws and
prints it. Each runs on the calling thread, alone with the model it loads.

    summary = summarize_facts("gpt2", "known_1000.json", kind="mlp", max_facts=50)
    print(summary_table(summary))
    report = evaluate_counterfact("gpt2", "counterfact.json", n=100)
    print(report.format_table())
    report = evaluate_sequential(None, "counterfact.json", SequentialConfig(checkpoints=(10, 100)), start=1000)
    print(report.format_tables())
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from .editing import ProgressFn
from .evaluation import EvalProgress, EvalReport, load_counterfact, run_eval
from .loading import default_cache_dir, load_model
from .rome import RomeCache
from .sequential import Checkpoint, SequentialConfig, SequentialReport, load_known_answers, run_sequential
from .tracing import Progress, TraceSummary, load_known_facts, trace_summary


def summarize_facts(
    model: str | None,
    data: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    kind: str = "mlp",
    samples: int = 10,
    window: int = 10,
    min_clean_prob: float = 0.0,
    max_facts: int | None = None,
    progress: Progress | None = None,
) -> TraceSummary:
    """Load ``model`` and average the indirect effect by layer over the facts of ``data``
    (``known_1000.json`` records); ``progress(done_facts, total_facts)`` after each fact."""
    loaded = load_model(model, device=device, dtype=dtype)
    facts = load_known_facts(data)
    return trace_summary(
        loaded, facts, kind=kind, samples=samples, window=window, min_clean_prob=min_clean_prob,
        max_facts=max_facts, progress=progress,
    )  # fmt: skip


def summary_table(summary: TraceSummary) -> str:
    """The summary as text: the counts, then the indirect effect at both tokens, one line per layer."""
    lines = [
        f"{summary.n_facts} facts ({summary.n_skipped} skipped), {summary.seconds:.0f} s",
        "layer  IE@last-subject  IE@last-token",
    ]
    for layer, (a, b) in enumerate(zip(summary.last_subject_effect, summary.last_token_effect, strict=True)):
        lines.append(f"{layer:5d}  {a:15.4f}  {b:13.4f}")
    return "\n".join(lines) + "\n"


def evaluate_counterfact(
    model: str | None,
    data: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    start: int = 0,
    n: int | None = None,
    cache_dir: Path | None = None,
    corpus: Path | None = None,
    hparams: Mapping[str, float] | None = None,
    layer: int | None = None,
    progress: EvalProgress | None = None,
) -> EvalReport:
    """Load ``model`` and evaluate ROME on ``n`` CounterFact records of ``data`` from ``start``
    (edit, measure, undo, one at a time); the statistics are cached under ``cache_dir``."""
    loaded = load_model(model, device=device, dtype=dtype, cache_dir=cache_dir)
    records = load_counterfact(data, start=start, n=n)
    cache = RomeCache(cache_dir or default_cache_dir(), corpus=corpus)
    return run_eval(loaded, records, cache, hparams=hparams, layer=layer, progress=progress)


def evaluate_sequential(
    model: str | None,
    data: str | Path,
    config: SequentialConfig,
    *,
    device: str = "auto",
    dtype: str = "auto",
    start: int = 0,
    known: Path | None = None,
    known_n: int | None = None,
    cache_dir: Path | None = None,
    corpus: Path | None = None,
    store_dir: Path | None = None,
    out: Path | None = None,
    progress: ProgressFn | None = None,
    on_checkpoint: Callable[[SequentialReport, Checkpoint], None] | None = None,
) -> SequentialReport:
    """Load ``model`` and run the sequential evaluation on ``config.n_edits`` CounterFact records of
    ``data`` from ``start``, with the first ``known_n`` facts of ``known`` (``known_1000.json``) for
    the retention measure; the JSON report is rewritten to ``out`` after every checkpoint."""
    loaded = load_model(model, device=device, dtype=dtype, cache_dir=cache_dir)
    records = load_counterfact(data, start=start, n=config.n_edits)
    facts = load_known_answers(known, n=known_n) if known is not None else []
    return run_sequential(
        loaded, records, config, known=facts, cache_dir=cache_dir, corpus=corpus, store_dir=store_dir, out=out,
        progress=progress, on_checkpoint=on_checkpoint,
    )  # fmt: skip
