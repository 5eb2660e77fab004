"""The runs one trace is made of: the clean run (immutable, ``CleanRun``) and the
corrupted runs with their restorations (``CorruptedRuns``, which computes what
the restorations share once and keeps it).

A ``CorruptedRuns`` belongs to one trace on one thread; it is not shared.

    clean = run_clean(loaded, req)                            # 1 forward pass
    runs = CorruptedRuns(loaded, clean, noise_std, samples=req.samples, seed=req.seed)
    runs.prob                                                 # mean corrupted P(answer)
    runs.run_rows([0, 1], [(5, 2), (5, 2)], start=5, skip=2)  # restored P(answer), (2,)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import InvalidRequest
from ..generation import cache_kwarg, last_logits
from ..hooks import Trace, first_tensor, replace_first, replay
from ..loading import LoadedModel
from ..scoring import encode_prompt, split_continuation
from .modules import first_restored, restored_modules, state_names
from .request import TraceRequest

log = logging.getLogger(__name__)


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


def forward(
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


def answer_probs(logits: torch.Tensor, answer_id: int) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)[:, answer_id]  # (B,)


# -- the clean run ----------------------------------------------------------


@dataclass(frozen=True)
class CleanRun:
    """The prompt's clean run: the answer, its probability, and the states a restoration writes back."""

    input_ids: torch.Tensor  # (1, T)
    tokens: tuple[str, ...]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int
    prob: float  # clean P(answer)
    states: Mapping[str, torch.Tensor]  # module name -> its clean output, (T, D)
    modules_by_layer: tuple[tuple[str, ...], ...]  # layer -> modules a restoration at that layer sets back
    first_restored: tuple[int, ...]  # layer -> the lowest layer of those modules (blocks below run as corrupted)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_layers(self) -> int:
        return len(self.modules_by_layer)


@torch.inference_mode()
def run_clean(loaded: LoadedModel, req: TraceRequest) -> CleanRun:
    """Tokenize, record the clean states of ``req.kind`` and pick the answer (one forward pass)."""
    tok, spec, model = loaded.tokenizer, loaded.spec, loaded.model
    subject_range = find_subject_range(tok, req.prompt, req.subject)
    ids = encode_prompt(tok, req.prompt)
    input_ids = torch.tensor([ids], device=loaded.device)  # (1, T)
    num_layers = spec.num_layers(model)
    names = state_names(spec, req.kind, num_layers)
    with Trace(model, names) as tr:
        logits, _ = forward(loaded, input_ids)  # (1, V)
    if req.answer is None:
        answer_id = int(torch.argmax(logits[0]))
    else:
        _, cont = split_continuation(tok, req.prompt, req.answer)
        if not cont:
            raise InvalidRequest(f"answer {req.answer!r} tokenizes to no token after prompt {req.prompt!r}")
        answer_id = cont[0]
    layers = range(num_layers)
    return CleanRun(
        input_ids=input_ids,
        tokens=tuple(tok.decode([i]) for i in ids),
        subject_range=subject_range,
        answer=tok.decode([answer_id]),
        answer_id=answer_id,
        prob=float(answer_probs(logits, answer_id)[0]),
        states={n: tr[n].output[0] for n in names},  # (T, D) each
        modules_by_layer=tuple(tuple(restored_modules(spec, req.kind, i, req.window, num_layers)) for i in layers),
        first_restored=tuple(first_restored(req.kind, i, req.window, num_layers) for i in layers),
    )


# -- the corrupted runs -----------------------------------------------------


class CorruptedRuns:
    """The corrupted runs of one request, and its restorations batched as rows.

    Sample s adds ``noise[s]`` (drawn once, from ``seed``) to the subject's
    embeddings in every row that uses it. What the restorations share is
    computed on first use and kept: the corrupted runs themselves (``prob``,
    and each block's output, replayed by rows that skip the blocks below
    their first restored layer), and the KV cache of the positions before the
    restored token. ``passes`` counts the forward passes run here.
    """

    def __init__(self, loaded: LoadedModel, clean: CleanRun, noise_std: float, *, samples: int, seed: int) -> None:
        self.loaded = loaded
        self.clean = clean
        self.noise_std = noise_std
        start, end = clean.subject_range
        dim = loaded.spec.embedding(loaded.model).embedding_dim
        gen = torch.Generator(device="cpu").manual_seed(seed)
        noise = noise_std * torch.randn((samples, end - start, dim), generator=gen)  # (S, E, D)
        self.noise = noise.to(device=loaded.device, dtype=loaded.dtype)
        self.passes = 0
        self._runs: tuple[float, list[object]] | None = None  # see ``_corrupted``
        self._prefix: tuple[int, object] | None = None  # (start, KV cache of positions < start per sample)

    @property
    def num_samples(self) -> int:
        return self.noise.shape[0]

    @property
    def prob(self) -> float:
        """Mean P(answer) of the corrupted runs."""
        return self._corrupted()[0]

    def _corrupted(self) -> tuple[float, list[object]]:
        """The corrupted runs' mean P(answer) and each block's output as the block returned it
        (first tensor (S, T, D)): run on first use, kept after."""
        if self._runs is None:
            spec = self.loaded.spec
            blocks = [spec.block_name(layer) for layer in range(self.clean.num_layers)]
            samples = range(self.num_samples)
            with torch.inference_mode(), Trace(self.loaded.model, blocks) as tr:
                probs = self.run_rows(samples, [None] * len(samples))
            self._runs = (float(probs.mean()), [tr[name].raw_output for name in blocks])
        return self._runs

    def corrupt(self, sample_of_row: torch.Tensor, offset: int = 0) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """An edit_output hook adding each row's noise sample to the subject's token embeddings,
        for a pass whose first position is ``offset``."""
        start, end = self.clean.subject_range
        noise = self.noise[sample_of_row]  # (B, E, D)

        def corrupt(_name: str, emb: torch.Tensor) -> torch.Tensor:  # emb: (B, T', D), T' positions from offset
            lo, hi = max(start, offset), min(end, offset + emb.shape[1])  # subject positions in this pass
            if lo >= hi:
                return emb
            emb = emb.clone()
            emb[:, lo - offset : hi - offset] += noise[:, lo - start : hi - start]
            return emb

        return corrupt

    def _prefix_cache(self, start: int, sample_of_row: torch.Tensor) -> object:
        """Each row's copy of the KV cache of positions < ``start`` (one pass per new ``start``)."""
        if self._prefix is None or self._prefix[0] != start:
            all_samples = torch.arange(self.num_samples, device=self.loaded.device)
            prefix = self.clean.input_ids[:, :start].expand(self.num_samples, -1)  # (S, start)
            corrupt = self.corrupt(all_samples)
            with Trace(self.loaded.model, [self.loaded.spec.embed], capture_output=False, edit_output=corrupt):
                _, cache = forward(self.loaded, prefix, keep_cache=True)
            self.passes += 1
            self._prefix = (start, cache)  # the next batch of rows restoring from ``start`` shares it
        cache = copy.deepcopy(self._prefix[1])  # the pass appends to it
        if hasattr(cache, "batch_select_indices"):
            cache.batch_select_indices(sample_of_row)  # (S, ...) -> (B, ...): each row's sample
            return cache
        log.debug("no reorderable KV cache (%s): full passes", type(cache).__name__)
        return None  # a cache type we cannot reorder: recompute the prefix in every row

    def run_rows(
        self,
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
        corrupted run with its noise sample, recorded once (``_corrupted``) and
        replayed (``hooks.replay``).
        """
        loaded, clean = self.loaded, self.clean
        model, spec = loaded.model, loaded.spec
        sample_of_row = torch.tensor(list(samples), device=loaded.device)
        cache = self._prefix_cache(start, sample_of_row) if start > 0 else None
        if cache is None:
            start = 0

        rows_by_module: dict[str, tuple[list[int], list[int]]] = {}
        for row, cell in enumerate(cells):
            if cell is None:
                continue
            token, layer = cell
            for name in clean.modules_by_layer[layer]:
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
            out[rows, positions - start] = clean.states[name][positions]  # (n, D)
            return out

        ids = clean.input_ids[:, start:].expand(len(cells), -1)  # (B, T - start)
        lower: dict[str, object] = {}
        if skip > 0:
            raw = self._corrupted()[1][skip - 1]
            below = first_tensor(raw)[sample_of_row][:, start:]  # (B, T - start, D)
            out = replace_first(raw, below)
            lower = {spec.block_name(layer): out for layer in range(skip)}
        with (
            replay(model, lower),
            Trace(model, [spec.embed], capture_output=False, edit_output=self.corrupt(sample_of_row, offset=start)),
            Trace(model, index, capture_output=False, edit_output=restore),
        ):
            logits, _ = forward(loaded, ids, start, cache)  # (B, V)
        self.passes += 1
        return answer_probs(logits, clean.answer_id)
