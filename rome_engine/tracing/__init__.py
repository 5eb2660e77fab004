"""Causal tracing: where in the network does the model recall a fact?

Meng et al. 2022 ("Locating and Editing Factual Associations in GPT", Sec. 2.1):

1. clean run: P(answer | prompt), and every state h_t^l is recorded;
2. corrupted run: Gaussian noise N(0, noise^2) is added to the token embeddings
   of the subject, and P(answer) drops to ``corrupted_prob``;
3. corrupted-with-restoration run: one state (token t, layer l) is set back to
   its clean value; the restored P(answer) measures how much that state carries
   the fact. Indirect effect IE(t, l) = P_restored(t, l) - P_corrupted.

``kind`` picks the state restored: ``hidden`` is the output of block l (the
residual stream), ``mlp`` and ``attn`` are the outputs of the MLP or attention
modules of a window of ``window`` layers centred on l.

Each probability is a mean over ``samples`` noise draws. Sample s uses the same
noise for every restoration, so a cell's score does not depend on how cells are
batched: ``trace`` packs many (cell, sample) rows into one forward pass, and
``trace_per_position`` (one forward pass per cell, the samples as the batch) is
the plain reference it is tested against. ``trace`` also skips work that
causal attention makes redundant: positions before the restored token are
computed once per sample and shared through the KV cache, and cells before the
subject (which the noise never reaches) score ``corrupted_prob`` without a pass.

Concurrency: the hooks act only on forward passes of the thread that installed
them (``hooks``), so other threads' passes on the same model run untouched. A
trace runs many passes and reuses states across them, so all must serve one
version: the engine pins its thread to the version the trace started on
(``versions.LiveVersions.pinned``); an edit that goes live meanwhile lands between
two passes and changes nothing the trace sees.

    req = TraceRequest("The Eiffel Tower is in", "The Eiffel Tower", kind="mlp")
    result = trace(loaded, req, noise_cache=NoiseCache())
    result.scores            # (T, L) restored probabilities
    result.peak              # (token, layer) of the strongest restoration

Modules and their public names:
    request    TraceRequest, TraceResult, Progress, KINDS   - what is asked, what comes back
    noise      noise_level, NoiseCache, DEFAULT_NOISE_SUBJECTS - the paper's default noise
    modules    window_layers, restored_modules               - which modules a cell restores
    runs       find_subject_range, CleanRun, CorruptedRuns   - the clean run, the corrupted runs
    grid       trace                                         - the batched (T, L) grid
    reference  trace_per_position                            - one pass per cell, for tests
    summary    Fact, load_known_facts, TraceSummary, trace_summary - averages over many facts (Fig. 2)
"""

from .grid import trace
from .modules import restored_modules, window_layers
from .noise import DEFAULT_NOISE_SUBJECTS, NoiseCache, noise_level
from .reference import trace_per_position
from .request import KINDS, MAX_NOISE, MAX_SAMPLES, MAX_WINDOW, Progress, TraceRequest, TraceResult
from .runs import CleanRun, CorruptedRuns, find_subject_range
from .summary import Fact, TraceSummary, load_known_facts, trace_summary

__all__ = [
    "DEFAULT_NOISE_SUBJECTS",
    "KINDS",
    "MAX_NOISE",
    "MAX_SAMPLES",
    "MAX_WINDOW",
    "CleanRun",
    "CorruptedRuns",
    "Fact",
    "NoiseCache",
    "Progress",
    "TraceRequest",
    "TraceResult",
    "TraceSummary",
    "find_subject_range",
    "load_known_facts",
    "noise_level",
    "restored_modules",
    "trace",
    "trace_per_position",
    "trace_summary",
    "window_layers",
]
