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

Hooks are global state on the model: callers serialise traces with every other
forward pass on the same model (the engine's model lock).

    req = TraceRequest("The Eiffel Tower is in", "The Eiffel Tower", kind="mlp")
    result = trace(loaded, req, noise_cache=NoiseCache())
    result.scores            # (T, L) restored probabilities
    result.peak              # (token, layer) of the strongest restoration

Public names:
    TraceRequest, TraceResult, trace, trace_per_position - one prompt, the (T, L) grid
    find_subject_range                                  - the subject's token range
    noise_level, NoiseCache, DEFAULT_NOISE_SUBJECTS     - the paper's default noise
    window_layers, restored_modules                     - which modules a cell restores
    Fact, load_known_facts, TraceSummary, trace_summary  - averages over many facts (Fig. 2)
    Progress                                            - the (done, total) callback type
"""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .arch import ArchSpec
from .errors import InvalidRequest
from .generation import cache_kwarg, last_logits
from .hooks import Trace, first_tensor, replace_first, replay
from .loading import LoadedModel
from .scoring import encode_prompt, split_continuation

log = logging.getLogger(__name__)

KINDS = ("hidden", "mlp", "attn")
MAX_SAMPLES = 64
# noise std at most this: the paper's default is 3 x the embeddings' std (about 0.1 - 1); far above,
# corrupted activations overflow (3e38 gave NaN grids)
MAX_NOISE = 1000.0
MAX_WINDOW = 1024  # layers restored together: more than any supported model has
NOISE_STD_FACTOR = 3.0  # the paper: noise std = 3 x the std of subject-token embeddings

Progress = Callable[[int, int], None]  # (done, total); may raise to abort the work

# Well-known entities whose token embeddings set the default noise level
# (the paper uses the subjects of its 1,209 known facts; any broad sample works).
# fmt: off
DEFAULT_NOISE_SUBJECTS: tuple[str, ...] = (
    "Eiffel Tower", "Barack Obama", "Microsoft", "Albert Einstein", "Mount Everest",
    "Amazon River", "William Shakespeare", "Toyota", "Leonardo da Vinci", "Great Wall of China",
    "Apple", "Nelson Mandela", "the Beatles", "Statue of Liberty", "Google",
    "Pablo Picasso", "Sahara Desert", "Coca-Cola", "Isaac Newton", "Taj Mahal",
    "Mozart", "Pacific Ocean", "Sony", "Napoleon Bonaparte", "Colosseum",
    "Marie Curie", "Nike", "Charles Darwin", "Danube", "Volkswagen",
    "Big Ben", "Mahatma Gandhi", "Samsung", "Winston Churchill", "Mount Kilimanjaro",
    "Beethoven", "IBM", "Vincent van Gogh", "Lake Victoria", "Nintendo",
    "Abraham Lincoln", "Louvre", "BMW", "Cleopatra", "Golden Gate Bridge",
    "Michael Jordan", "Intel", "Frida Kahlo", "Stonehenge", "Harvard University",
)
# fmt: on


# -- requests and results ---------------------------------------------------


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


@dataclass
class TraceResult:
    tokens: list[str]  # the prompt's tokens, decoded one by one
    subject_range: tuple[int, int]  # [start, end) in tokens
    answer: str  # the traced answer token, decoded
    answer_id: int
    clean_prob: float
    corrupted_prob: float
    scores: torch.Tensor  # (T, L) restored probabilities P(answer), float32 on the CPU
    kind: str
    noise: float
    samples: int
    window: int
    seconds: float
    forward_passes: int

    @property
    def indirect_effect(self) -> torch.Tensor:
        # IE(t, l) = P_restored(t, l) - P_corrupted
        return self.scores - self.corrupted_prob  # (T, L)

    @property
    def peak(self) -> tuple[int, int]:
        """(token index, layer) of the highest restored probability."""
        flat = int(torch.argmax(self.scores))
        return divmod(flat, self.scores.shape[1])


# -- tokens -----------------------------------------------------------------


def find_subject_range(tokenizer: object, prompt: str, subject: str) -> tuple[int, int]:
    """Token range [start, end) covering the first occurrence of ``subject`` in ``prompt``.

    The prompt is tokenized as ``scoring.encode_prompt`` does (special tokens
    included); a token belongs to the subject when its characters overlap the
    subject's, so a leading space merged into a token does not matter.
    """
    char_start = prompt.find(subject)
    if not subject or char_start < 0:
        raise InvalidRequest(f"subject {subject!r} does not occur in prompt {prompt!r}: quote it exactly")
    char_end = char_start + len(subject)
    enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    hits = [
        i
        for i, (a, b) in enumerate(enc["offset_mapping"])
        if b > a and a < char_end and b > char_start  # overlaps [char_start, char_end)
    ]
    if not hits:
        raise InvalidRequest(f"subject {subject!r} covers no token of prompt {prompt!r}")
    return hits[0], hits[-1] + 1


# -- noise ------------------------------------------------------------------


@torch.inference_mode()
def noise_level(loaded: LoadedModel, subjects: Sequence[str] | None = None) -> float:
    """The paper's default noise: NOISE_STD_FACTOR x std of the subjects' token embeddings."""
    subjects = list(subjects or DEFAULT_NOISE_SUBJECTS)
    ids = [i for s in subjects for i in loaded.tokenizer(s, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise InvalidRequest("noise_level needs at least one subject with tokens")
    emb = loaded.spec.embedding(loaded.model)(torch.tensor(ids, device=loaded.device))  # (N, D)
    return NOISE_STD_FACTOR * float(emb.float().std())


class NoiseCache:
    """Default noise levels by model, computed once each; the engine holds one.

    cache = NoiseCache()
    cache.get(loaded)   # computed on the first call, remembered after
    """

    def __init__(self, subjects: Sequence[str] | None = None) -> None:
        self._subjects = tuple(subjects or DEFAULT_NOISE_SUBJECTS)
        self._levels: dict[tuple[str, tuple[int, ...]], float] = {}
        self._lock = threading.Lock()

    def get(self, loaded: LoadedModel) -> float:
        # ROME edits MLP weights only, so the embeddings (and this level) never change.
        key = (loaded.model_id, tuple(loaded.spec.embedding(loaded.model).weight.shape))
        with self._lock:
            if key not in self._levels:
                self._levels[key] = noise_level(loaded, self._subjects)
                log.info("noise level for %s: %.4f", loaded.model_id, self._levels[key])
            return self._levels[key]


# -- which modules a cell restores -----------------------------------------


def window_layers(layer: int, window: int, num_layers: int) -> range:
    """Layers restored together for a cell at ``layer``: ``window`` layers centred on it, clamped.

    layers max(0, l - w//2) .. min(L, l - w//2 + w) - 1 (the paper's convention)
    """
    start = layer - window // 2
    return range(max(0, start), min(num_layers, start + window))


def restored_modules(spec: ArchSpec, kind: str, layer: int, window: int, num_layers: int) -> list[str]:
    """Names of the modules whose outputs a (token, ``layer``) restoration sets back."""
    if kind == "hidden":
        return [spec.block_name(layer)]
    name = spec.mlp_name if kind == "mlp" else spec.attn_name
    return [name(i) for i in window_layers(layer, window, num_layers)]


def _state_names(spec: ArchSpec, kind: str, num_layers: int) -> list[str]:
    """Every module of ``kind``, one per layer: the clean run records their outputs."""
    return [name for layer in range(num_layers) for name in restored_modules(spec, kind, layer, 1, num_layers)]


# -- the runs ---------------------------------------------------------------


@dataclass
class _Prepared:
    """Everything the corrupted runs of one request share."""

    input_ids: torch.Tensor  # (1, T)
    tokens: list[str]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int
    clean_prob: float
    clean: dict[str, torch.Tensor]  # module name -> its clean output, (T, D)
    noise: torch.Tensor  # (S, E, D): the scaled noise of each sample on the E subject tokens
    noise_std: float
    modules_by_layer: list[list[str]]  # layer -> modules a restoration at that layer sets back
    first_restored: list[int]  # layer -> the lowest layer of those modules (blocks below run as corrupted)
    corrupted_prob: float = math.nan
    # per layer, the corrupted run's block output as the block returned it (its first tensor
    # (S, T, D) per noise sample): rows restoring only above a layer replay it instead of recomputing
    corrupted_blocks: list[object] = field(default_factory=list)
    prefix_cache: tuple[int, object] | None = None  # (start, KV cache of positions < start per sample)
    forward_passes: int = 0

    @property
    def num_samples(self) -> int:
        return self.noise.shape[0]


def _forward(
    loaded: LoadedModel,
    ids: torch.Tensor,
    start: int = 0,
    cache: object | None = None,
    keep_cache: bool = False,
) -> tuple[torch.Tensor, object | None]:
    """Forward pass over positions start .. start + ids.shape[1] - 1, after an optional KV cache
    of positions 0 .. start - 1. Returns the last position's logits (B, V) and the new cache."""
    kwargs: dict[str, object] = {"use_cache": keep_cache or cache is not None}
    if cache is not None:
        kwargs[cache_kwarg(loaded.model)] = cache
    positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)  # (1, T')
    logits, new_cache = last_logits(loaded, input_ids=ids, position_ids=positions, **kwargs)
    return logits, new_cache if keep_cache else None


def _answer_probs(logits: torch.Tensor, answer_id: int) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)[:, answer_id]  # (B,)


def _prepare(loaded: LoadedModel, req: TraceRequest, noise_std: float) -> _Prepared:
    """Tokenize, pick the answer, record the clean states and draw the noise."""
    tok, spec, model = loaded.tokenizer, loaded.spec, loaded.model
    subject_range = find_subject_range(tok, req.prompt, req.subject)
    ids = encode_prompt(tok, req.prompt)
    input_ids = torch.tensor([ids], device=loaded.device)  # (1, T)
    num_layers = spec.num_layers(model)
    names = _state_names(spec, req.kind, num_layers)
    with Trace(model, names) as tr:
        logits, _ = _forward(loaded, input_ids)  # (1, V)
    if req.answer is None:
        answer_id = int(torch.argmax(logits[0]))
    else:
        _, cont = split_continuation(tok, req.prompt, req.answer)
        if not cont:
            raise InvalidRequest(f"answer {req.answer!r} tokenizes to no token after prompt {req.prompt!r}")
        answer_id = cont[0]
    start, end = subject_range
    gen = torch.Generator(device="cpu").manual_seed(req.seed)
    dim = spec.embedding(model).embedding_dim
    # sample s adds noise[s] to the subject's embeddings in every row that uses it
    noise = noise_std * torch.randn((req.samples, end - start, dim), generator=gen)  # (S, E, D)
    return _Prepared(
        input_ids=input_ids,
        tokens=[tok.decode([i]) for i in ids],
        subject_range=subject_range,
        answer=tok.decode([answer_id]),
        answer_id=answer_id,
        clean_prob=float(_answer_probs(logits, answer_id)[0]),
        clean={n: tr[n].output[0] for n in names},  # (T, D) each
        noise=noise.to(device=loaded.device, dtype=loaded.dtype),
        noise_std=noise_std,
        modules_by_layer=[
            restored_modules(spec, req.kind, layer, req.window, num_layers) for layer in range(num_layers)
        ],
        first_restored=[
            layer if req.kind == "hidden" else window_layers(layer, req.window, num_layers).start
            for layer in range(num_layers)
        ],
        forward_passes=1,
    )


def _corrupt_embeddings(
    prep: _Prepared, sample_of_row: torch.Tensor, offset: int = 0
) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """An edit_output hook adding each row's noise sample to the subject's token embeddings,
    for a pass whose first position is ``offset``."""
    start, end = prep.subject_range
    noise = prep.noise[sample_of_row]  # (B, E, D)

    def corrupt(_name: str, emb: torch.Tensor) -> torch.Tensor:  # emb: (B, T', D), T' positions from offset
        lo, hi = max(start, offset), min(end, offset + emb.shape[1])  # subject positions in this pass
        if lo >= hi:
            return emb
        emb = emb.clone()
        emb[:, lo - offset : hi - offset] += noise[:, lo - start : hi - start]
        return emb

    return corrupt


def _run_rows(
    loaded: LoadedModel,
    prep: _Prepared,
    samples: Sequence[int],
    cells: Sequence[tuple[int, int] | None],
    start: int = 0,
    skip: int = 0,
) -> torch.Tensor:
    """P(answer) of corrupted rows, (B,): row i uses noise sample ``samples[i]`` and restores
    ``cells[i]`` = (token, layer) (None: nothing).

    With ``start`` > 0 (every restored token >= start), positions before ``start``
    are not recomputed for every row: they do not depend on the restoration
    (causal attention), so one pass over them per noise sample fills a KV
    cache that the rows share (and the next call with the same ``start``).

    With ``skip`` > 0 (no row restores a module below layer ``skip``), blocks
    0 .. skip - 1 are not run: every row's states there are those of the
    corrupted run with its noise sample, recorded once (``prep.corrupted_blocks``)
    and replayed (``hooks.replay``).
    """
    model, spec = loaded.model, loaded.spec
    sample_of_row = torch.tensor(list(samples), device=loaded.device)
    cache = None
    if start > 0:
        if prep.prefix_cache is None or prep.prefix_cache[0] != start:
            all_samples = torch.arange(prep.num_samples, device=loaded.device)
            prefix = prep.input_ids[:, :start].expand(prep.num_samples, -1)  # (S, start)
            corrupt = _corrupt_embeddings(prep, all_samples)
            with Trace(model, [spec.embed], capture_output=False, edit_output=corrupt):
                _, cache = _forward(loaded, prefix, keep_cache=True)
            prep.forward_passes += 1
            prep.prefix_cache = (start, cache)  # the next batch of rows restoring from ``start`` shares it
        cache = copy.deepcopy(prep.prefix_cache[1])  # the pass appends to it
        if hasattr(cache, "batch_select_indices"):
            cache.batch_select_indices(sample_of_row)  # (S, ...) -> (B, ...): each row's sample
        else:  # a cache type we cannot reorder: recompute the prefix in every row
            log.debug("no reorderable KV cache (%s): full passes", type(cache).__name__)
            cache, start = None, 0

    rows_by_module: dict[str, tuple[list[int], list[int]]] = {}
    for row, cell in enumerate(cells):
        if cell is None:
            continue
        token, layer = cell
        for name in prep.modules_by_layer[layer]:
            rows, positions = rows_by_module.setdefault(name, ([], []))
            rows.append(row)
            positions.append(token)
    index = {
        name: (torch.tensor(rows, device=loaded.device), torch.tensor(positions, device=loaded.device))
        for name, (rows, positions) in rows_by_module.items()
    }

    def restore(name: str, out: torch.Tensor) -> torch.Tensor:  # out: (B, T - start, D)
        rows, positions = index[name]
        out = out.clone()
        out[rows, positions - start] = prep.clean[name][positions]  # (n, D)
        return out

    ids = prep.input_ids[:, start:].expand(len(cells), -1)  # (B, T - start)
    corrupt = _corrupt_embeddings(prep, sample_of_row, offset=start)
    lower: dict[str, object] = {}
    if skip > 0 and prep.corrupted_blocks:
        raw = prep.corrupted_blocks[skip - 1]
        below = first_tensor(raw)[sample_of_row][:, start:]  # (B, T - start, D)
        out = replace_first(raw, below)
        lower = {spec.block_name(layer): out for layer in range(skip)}
    with (
        replay(model, lower),
        Trace(model, [spec.embed], capture_output=False, edit_output=corrupt),
        Trace(model, index, capture_output=False, edit_output=restore),
    ):
        logits, _ = _forward(loaded, ids, start, cache)  # (B, V)
    prep.forward_passes += 1
    return _answer_probs(logits, prep.answer_id)


def _corrupted_prob(loaded: LoadedModel, prep: _Prepared) -> float:
    """Mean P(answer) of the corrupted runs; records their block outputs for ``_run_rows``'s skip."""
    samples = range(prep.num_samples)
    spec = loaded.spec
    blocks = [spec.block_name(layer) for layer in range(len(prep.modules_by_layer))]
    with Trace(loaded.model, blocks) as tr:
        probs = _run_rows(loaded, prep, samples, [None] * len(samples))
    prep.corrupted_blocks = [tr[name].raw_output for name in blocks]
    return float(probs.mean())


def _restore_cells(
    loaded: LoadedModel,
    prep: _Prepared,
    cells: Sequence[tuple[int, int]],
    *,
    max_batch_rows: int,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Mean restored P(answer) of each (token, layer) cell, (C,).

    Rows (cell, sample) of the same token share batches of at most
    ``max_batch_rows`` rows. A state before the subject is the same in the
    clean and corrupted runs (the noise has not reached it), so those cells
    score ``corrupted_prob`` without a pass.
    """
    num_samples, subject_start = prep.num_samples, prep.subject_range[0]
    scores = torch.full((len(cells),), prep.corrupted_prob)
    by_token: dict[int, list[int]] = {}
    for i, (token, _layer) in enumerate(cells):
        if token >= subject_start:
            by_token.setdefault(token, []).append(i)
    done_rows = (len(cells) - sum(map(len, by_token.values()))) * num_samples
    sums = torch.zeros(len(cells))
    for token, cell_ids in sorted(by_token.items()):
        # rows in order of the first layer they restore, so that a batch can skip the blocks below its first
        rows = sorted(
            ((c, s) for c in cell_ids for s in range(num_samples)), key=lambda r: prep.first_restored[cells[r[0]][1]]
        )
        n_batches = -(-len(rows) // max_batch_rows)
        size = -(-len(rows) // n_batches)  # even batches: 300 rows by 128 -> 100, 100, 100
        for first in range(0, len(rows), size):
            batch = rows[first : first + size]
            skip = prep.first_restored[cells[batch[0][0]][1]]
            probs = _run_rows(
                loaded, prep, [s for _, s in batch], [cells[c] for c, _ in batch], start=token, skip=skip
            )
            sums.index_add_(0, torch.tensor([c for c, _ in batch]), probs.float().cpu())
            done_rows += len(batch)
            if progress is not None:
                progress(done_rows // num_samples, len(cells))
        scores[cell_ids] = sums[cell_ids] / num_samples
    return scores


def _resolve_noise(loaded: LoadedModel, noise: float | None, noise_cache: NoiseCache | None) -> float:
    if noise is not None:
        return noise
    return noise_cache.get(loaded) if noise_cache is not None else noise_level(loaded)


def _result(req: TraceRequest, prep: _Prepared, scores: torch.Tensor, t0: float) -> TraceResult:
    return TraceResult(
        tokens=prep.tokens,
        subject_range=prep.subject_range,
        answer=prep.answer,
        answer_id=prep.answer_id,
        clean_prob=prep.clean_prob,
        corrupted_prob=prep.corrupted_prob,
        scores=scores,
        kind=req.kind,
        noise=prep.noise_std,
        samples=req.samples,
        window=req.window,
        seconds=time.perf_counter() - t0,
        forward_passes=prep.forward_passes,
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
        prep = _prepare(loaded, req, _resolve_noise(loaded, req.noise, noise_cache))
        prep.corrupted_prob = _corrupted_prob(loaded, prep)
        num_tokens, num_layers = len(prep.tokens), len(prep.modules_by_layer)
        cells = [(t, layer) for t in range(num_tokens) for layer in range(num_layers)]
        scores = _restore_cells(loaded, prep, cells, max_batch_rows=max_batch_rows, progress=progress)
    result = _result(req, prep, scores.view(num_tokens, num_layers), t0)
    log.info(
        "traced %s over %d x %d cells in %.2f s (%d forward passes)",
        req.kind,
        num_tokens,
        num_layers,
        result.seconds,
        result.forward_passes,
    )
    return result


def trace_per_position(loaded: LoadedModel, req: TraceRequest, *, noise_cache: NoiseCache | None = None) -> TraceResult:
    """Reference implementation of ``trace``: one full forward pass per (token, layer)
    cell, the ``samples`` noise draws as the batch. Slow; for tests and benchmarks."""
    t0 = time.perf_counter()
    model, spec = loaded.model, loaded.spec
    with torch.inference_mode():
        prep = _prepare(loaded, req, _resolve_noise(loaded, req.noise, noise_cache))
        prep.corrupted_prob = _corrupted_prob(loaded, prep)
        corrupt = _corrupt_embeddings(prep, torch.arange(req.samples, device=loaded.device))
        ids = prep.input_ids.expand(req.samples, -1)  # (S, T)
        num_tokens, num_layers = len(prep.tokens), len(prep.modules_by_layer)
        scores = torch.zeros(num_tokens, num_layers)
        for t in range(num_tokens):
            for layer in range(num_layers):

                def restore(name: str, out: torch.Tensor, t: int = t) -> torch.Tensor:  # out: (S, T, D)
                    out = out.clone()
                    out[:, t] = prep.clean[name][t]
                    return out

                with (
                    Trace(model, [spec.embed], capture_output=False, edit_output=corrupt),
                    Trace(model, prep.modules_by_layer[layer], capture_output=False, edit_output=restore),
                ):
                    logits, _ = _forward(loaded, ids)  # (S, V)
                prep.forward_passes += 1
                scores[t, layer] = _answer_probs(logits, prep.answer_id).mean()
    return _result(req, prep, scores, t0)


# -- many facts (the paper's Figure 2) --------------------------------------


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


@dataclass
class TraceSummary:
    kind: str
    num_layers: int
    n_facts: int  # facts averaged
    n_skipped: int  # facts left out (subject not found, clean probability below the threshold)
    last_subject_effect: list[float]  # (L,) mean IE restoring at the last subject token
    last_token_effect: list[float]  # (L,) mean IE restoring at the last prompt token
    mean_clean_prob: float
    mean_corrupted_prob: float
    noise: float
    samples: int
    window: int
    seconds: float
    forward_passes: int

    @property
    def peak_layer(self) -> int:
        """The layer where restoring at the last subject token helps most."""
        return max(range(self.num_layers), key=self.last_subject_effect.__getitem__)


def _trace_two_tokens(
    loaded: LoadedModel, req: TraceRequest, noise_std: float, min_clean_prob: float, max_batch_rows: int
) -> tuple[_Prepared | None, torch.Tensor | None]:
    """Restored P(answer) at the last subject token and the last token, (2, L); None when
    the fact cannot be traced (no prep) or its clean P(answer) is below ``min_clean_prob``."""
    try:
        with torch.inference_mode():
            prep = _prepare(loaded, req, noise_std)
    except InvalidRequest as e:
        log.warning("skipping a fact: %s", e)
        return None, None
    if prep.clean_prob < min_clean_prob:
        log.debug("skipping %r: P(answer) %.3f < %.3f", req.prompt, prep.clean_prob, min_clean_prob)
        return prep, None
    num_layers = len(prep.modules_by_layer)
    rows = (prep.subject_range[1] - 1, len(prep.tokens) - 1)
    with torch.inference_mode():
        prep.corrupted_prob = _corrupted_prob(loaded, prep)
        cells = [(t, layer) for t in rows for layer in range(num_layers)]
        scores = _restore_cells(loaded, prep, cells, max_batch_rows=max_batch_rows)
    return prep, scores.view(2, num_layers)


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
    noise_std = _resolve_noise(loaded, noise, noise_cache)
    num_layers = loaded.spec.num_layers(loaded.model)
    subject_sum = torch.zeros(num_layers)
    last_sum = torch.zeros(num_layers)
    clean_sum = corrupted_sum = 0.0
    used = skipped = passes = 0
    for i, (prompt, subject, answer) in enumerate(facts):
        # each fact gets its own noise draws (seed + i); a bad kind/samples/window raises here
        req = TraceRequest(prompt, subject, answer, kind, noise_std, samples, window, seed + i)
        prep, scores = _trace_two_tokens(loaded, req, noise_std, min_clean_prob, max_batch_rows)
        passes += prep.forward_passes if prep is not None else 0
        if prep is None or scores is None:
            skipped += 1
        else:
            subject_sum += scores[0] - prep.corrupted_prob
            last_sum += scores[1] - prep.corrupted_prob
            clean_sum += prep.clean_prob
            corrupted_sum += prep.corrupted_prob
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
