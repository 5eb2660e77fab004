"""The sequential evaluation (issue #12): many CounterFact edits one after another through
the ApplyEdit path, never reverted, measured over all edits so far at checkpoints.

Public names:
    SequentialConfig, parse_checkpoints  - what to run (checkpoints, methods, overrides)
    METHODS, MethodFactory               - method name -> factory of its compute function
    run_sequential(loaded, records, config, *, known, store_dir, out, progress, on_checkpoint)
    SequentialReport, Checkpoint, MethodRun, EditOutcome, EditTimes, RunProgress - the results
    Metrics                              - one state of the model over the records edited so far
    KnownAnswer, load_known_answers      - known_1000.json facts for the retention measure
    HELD_TEXT, held_perplexity           - the fixed text whose perplexity is tracked

    records = load_counterfact("counterfact-train.json", start=1000, n=100)
    config = SequentialConfig(checkpoints=parse_checkpoints("10,50", 100))
    report = run_sequential(loaded, records, config, known=load_known_answers("known_1000.json"))
    print(report.format_tables())
"""

from .measure import HELD_TEXT, KnownAnswer, Metrics, held_perplexity, load_known_answers
from .report import Checkpoint, EditOutcome, EditTimes, MethodRun, RunProgress, SequentialReport
from .run import METHODS, MethodFactory, SequentialConfig, parse_checkpoints, run_sequential

__all__ = [
    "HELD_TEXT",
    "METHODS",
    "Checkpoint",
    "EditOutcome",
    "EditTimes",
    "KnownAnswer",
    "MethodFactory",
    "MethodRun",
    "RunProgress",
    "Metrics",
    "SequentialConfig",
    "SequentialReport",
    "held_perplexity",
    "load_known_answers",
    "parse_checkpoints",
    "run_sequential",
]
