"""Continuous batching: one decode step for every running stream per forward pass.

A scheduler thread owns the model's decode loop. Requests join at token
boundaries: the prompts that arrived since the last step are prefilled
together in one forward pass (left-padded, positions counted per row), then
their KV caches are merged into the running batch, left-padded with zeros
to the batch's length (the attention mask hides the padding; zeros, not
garbage, so a masked weight of 0 times a padded value stays 0). Every step
samples each row with its own parameters and stop rules (``DecodeState``),
retires finished, cancelled or failed rows at once (their rows are dropped
from the cache), and runs one forward pass for the rest. A row whose sampling
raises gets that error and the others go on; a failed prefill fails only the
prompts it admitted; only a failed decode pass fails the whole batch.

    input_ids (B, 1), attention_mask (B, L + 1), position_ids (B, 1) = each row's own length

    scheduler = BatchScheduler(loaded, max_batch_size=32)
    scheduler.submit(prompt_ids, params, emit=queue.put, cancelled=event.is_set)

Rows may be on different edit versions: each forward pass tells the live
versions (``versions.LiveVersions.rows``) which version each row serves, and
the rows off the head get their difference as a side path on the touched
projections. An edit going live lands between two passes: the running rows
keep their version.

Greedy output equals a stream decoded alone (tests check it), up to float
rounding of batched matrix products.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .generation import DecodeState, GenerationChunk, SamplingParams, cache_kwarg, last_logits
from .loading import LoadedModel
from .versions import LiveVersions

log = logging.getLogger(__name__)

Emit = Callable[[GenerationChunk | BaseException], None]


@dataclass
class _Row:
    state: DecodeState
    emit: Emit
    cancelled: Callable[[], bool]
    length: int  # real tokens in this row's cache
    logits: torch.Tensor | None = None  # (V,) for the next token


@dataclass
class _Pending:
    prompt_ids: list[int]
    state: DecodeState
    emit: Emit
    cancelled: Callable[[], bool]


class BatchScheduler:
    def __init__(
        self, loaded: LoadedModel, *, max_batch_size: int = 32, versions: LiveVersions | None = None
    ) -> None:
        self.loaded = loaded
        self.versions = versions
        self.max_batch_size = max_batch_size
        self._cache_kw = cache_kwarg(loaded.model)
        self._pending: collections.deque[_Pending] = collections.deque()
        self._rows: list[_Row] = []
        self._keys: list[torch.Tensor] = []  # per layer (B, H, L, D)
        self._values: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None  # (B, L) 1 = real token
        self._cache: DynamicCache | None = None  # the model's cache object over _keys/_values, until rows change
        self._cond = threading.Condition()
        self._stop = False
        self.steps = 0
        self.prefills = 0  # prefill forward passes (one per group of prompts admitted together)
        self._pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # rows per decode step
        self.on_step: Callable[[int], None] | None = None  # called with the batch size of each step
        self._thread = threading.Thread(target=self._loop, name="romegw-batcher", daemon=True)
        self._thread.start()

    # -- API ------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        emit: Emit,
        cancelled: Callable[[], bool],
        edit_version: int = 0,
    ) -> None:
        """Queue a sequence; ``emit`` gets each chunk (the last has a finish_reason) or an exception."""
        state = DecodeState(self.loaded, prompt_ids, params, edit_version)
        with self._cond:
            if self._stop:
                raise RuntimeError("the batch scheduler is stopped")
            self._pending.append(_Pending(prompt_ids, state, emit, cancelled))
            self._cond.notify()

    @property
    def running(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- the loop -------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._pending and not self._rows:
                    self._cond.wait()
                if self._stop:
                    self._fail_all(RuntimeError("the server is shutting down"))
                    return
                admitted = []
                while self._pending and len(self._rows) + len(admitted) < self.max_batch_size:
                    admitted.append(self._pending.popleft())
            with torch.inference_mode():
                if admitted:
                    try:
                        self._admit(admitted)
                    except Exception as e:  # a failed prefill fails the prompts it held, no other row
                        log.exception("prefill of %d prompts failed", len(admitted))
                        for p in admitted:
                            p.emit(e)
                try:
                    self._step()
                except Exception as e:  # a failed forward pass fails its streams, not the server
                    log.exception("decode step failed")
                    self._fail_all(e)

    def _on_versions(self, versions: list[int]) -> contextlib.AbstractContextManager:
        """The next pass serves row i on ``versions[i]``."""
        return self.versions.rows(versions) if self.versions is not None else contextlib.nullcontext()

    def _fail_all(self, error: BaseException) -> None:
        for row in self._rows:
            row.emit(error)
        self._rows, self._keys, self._values, self._mask, self._cache = [], [], [], None, None

    def _step(self) -> None:
        # sample every row; retire the finished, the cancelled and the failed
        keep: list[int] = []
        for i, row in enumerate(self._rows):
            try:
                chunk = row.state.cancel() if row.cancelled() else row.state.step(row.logits)
            except Exception as e:  # a row that fails is finished with its own error
                log.warning("a stream failed while sampling (the others go on): %r", e)
                row.emit(e)
                continue
            row.emit(chunk)
            if not row.state.finished:
                keep.append(i)
        if len(keep) < len(self._rows):
            self._select(keep)
        if not self._rows:
            return
        self._forward()

    def _admit(self, admitted: list[_Pending]) -> None:
        """Prefill the new prompts in one forward pass (left-padded) and merge their caches into the batch."""
        model, device = self.loaded.model, self.loaded.device
        lengths = [len(p.prompt_ids) for p in admitted]
        width = max(lengths)
        ids = torch.full((len(admitted), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(admitted), width), dtype=torch.long)
        for i, p in enumerate(admitted):
            ids[i, width - lengths[i] :] = torch.tensor(p.prompt_ids)
            mask[i, width - lengths[i] :] = 1
        ids, mask = ids.to(device), mask.to(device)
        with self._on_versions([p.state.edit_version for p in admitted]):
            if len(admitted) == 1:  # no padding: the plain call, as a stream alone makes it
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                logits, cache = out.logits[:, -1], getattr(out, self._cache_kw)
            else:
                positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # each row counts from its first real token
                logits, cache = last_logits(
                    self.loaded, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True
                )
        keys = [layer.keys for layer in cache.layers]  # (k, H, W, D)
        values = [layer.values for layer in cache.layers]
        if len(admitted) > 1:
            # padded positions hold whatever the model made of them (NaN where a query saw no key):
            # zeros instead, so that a masked weight of 0 times the value stays 0
            real = mask.bool()[:, None, :, None]  # (k, 1, W, 1)
            keys = [torch.where(real, k, 0.0) for k in keys]
            values = [torch.where(real, v, 0.0) for v in values]
        rows = [_Row(p.state, p.emit, p.cancelled, len(p.prompt_ids), logits[i]) for i, p in enumerate(admitted)]
        self.prefills += 1
        self._merge(rows, keys, values, mask)

    def _merge(
        self, rows: list[_Row], keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor
    ) -> None:
        """Append rows (per-layer caches (k, H, W, D), mask (k, W)) to the batch, left-padding the narrower side."""
        self._cache = None
        if not self._rows:
            self._keys, self._values, self._mask, self._rows = keys, values, mask, rows
            return
        width, n = self._mask.shape[1], mask.shape[1]
        if n > width:  # widen the batch on the left
            self._pad_batch(n - width)
            width = n
        pad = width - n
        self._keys = [torch.cat([k, _left_pad(nk, pad)], dim=0) for k, nk in zip(self._keys, keys, strict=True)]
        self._values = [torch.cat([v, _left_pad(nv, pad)], dim=0) for v, nv in zip(self._values, values, strict=True)]
        zeros = torch.zeros((mask.shape[0], pad), dtype=self._mask.dtype, device=self._mask.device)
        self._mask = torch.cat([self._mask, torch.cat([zeros, mask.to(self._mask.dtype)], dim=1)], dim=0)
        self._rows.extend(rows)

    def _pad_batch(self, pad: int) -> None:
        self._cache = None
        self._keys = [_left_pad(k, pad) for k in self._keys]
        self._values = [_left_pad(v, pad) for v in self._values]
        zeros = torch.zeros((self._mask.shape[0], pad), dtype=self._mask.dtype, device=self._mask.device)
        self._mask = torch.cat([zeros, self._mask], dim=1)

    def _select(self, keep: list[int]) -> None:
        self._cache = None
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._keys, self._values, self._mask = [], [], None
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        # drop leading columns that are padding in every remaining row
        first = int(mask.any(dim=0).nonzero()[0])
        self._mask = mask[:, first:]
        self._keys = [k.index_select(0, index)[:, :, first:] for k in self._keys]
        self._values = [v.index_select(0, index)[:, :, first:] for v in self._values]

    def _forward(self) -> None:
        rows = self._rows
        device = self._mask.device
        input_ids = torch.tensor([[r.state.last_token] for r in rows], device=device)  # (B, 1)
        positions = torch.tensor([[r.length] for r in rows], device=device)  # (B, 1)
        ones = torch.ones((len(rows), 1), dtype=self._mask.dtype, device=device)
        mask = torch.cat([self._mask, ones], dim=1)  # (B, L + 1)
        cache = self._cache  # kept from the last step while the rows stay the same
        if cache is None:
            cache = DynamicCache(ddp_cache_data=list(zip(self._keys, self._values, strict=True)))
        padded = not bool(self._mask.all())  # no padding (e.g. one row): no mask to build
        with self._on_versions([r.state.edit_version for r in rows]):
            out = self.loaded.model(
                input_ids=input_ids,
                attention_mask=mask if padded else None,
                position_ids=positions,
                use_cache=True,
                **{self._cache_kw: cache},
            )
        cache = getattr(out, self._cache_kw)
        self._cache = cache
        self._keys = [layer.keys for layer in cache.layers]
        self._values = [layer.values for layer in cache.layers]
        self._mask = mask
        logits = out.logits[:, -1]  # (B, V)
        for i, r in enumerate(rows):
            r.logits = logits[i]
            r.length += 1
        self.steps += 1
        self.batch_sizes[len(rows)] += 1
        if self.on_step is not None:
            self.on_step(len(rows))


def _left_pad(t: torch.Tensor, pad: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, pad + T, D) with zeros in front."""
    if pad == 0:
        return t
    zeros = t.new_zeros((t.shape[0], t.shape[1], pad, t.shape[3]))
    return torch.cat([zeros, t], dim=2)
