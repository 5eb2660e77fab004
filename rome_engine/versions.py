"""Every version of the edit history served at once: the head in place, the others beside it.

The head's touched matrices are materialized in the model (``layers.LayerWeights``,
bit-exact from base + layers). A forward pass on another version v gets, at each
projection where v and the head differ, v's own output for its rows:

* **exact** (the default): v's matrices, built by the same arithmetic as the head's
  (``LayerWeights.prepare``: base + v's deltas in float32, cast), and the
  projection recomputed with them for v's rows (``ArchSpec.project``). A pinned
  row computes what a single-version run of v computes, with v's bits.
* **low rank**, when v's differing matrices do not fit the cache bound: the
  difference as a side path on the head's output, in float32,

      W_v x = W_head x + U_d (V_d^T x),   U_d V_d^T = sum_{layers in v, not head} u v^T - sum_{in head, not v} u v^T

  (one dense (out, in) difference where r (in + out) > in * out). Equal to v within
  float32 rounding of the correction, not bit-identical.

Gated factors (``delta``) are not in the matrices: a version whose gated columns differ
from the installed ones gets its own ``GatedSlots`` for its rows (``VersionDiff.slots``,
served by ``LayerWeights``' slot hook through ``row_slots``), built from its layers as
the head's are, so a pinned row sees exactly its version's columns.

Rows of one decode batch may be on different versions; each group of rows gets
its own term (``index_copy``/``index_add`` on the projection's output). A pass
on the head does nothing extra and runs exactly as before.

The terms are cached per (version, head) in an LRU bounded in bytes
(``cache_bytes``); a swap of the head drops the old head's entries, and keeps
the old head's matrices (copied before the swap) for the requests still on it.

Which version a pass serves is per thread (``pinned(v)`` for a Score, a Trace, a
stream decoded alone; ``rows([v0, v1, ...])`` for the batch scheduler's passes).
Every top-level pass holds the swap gate's read lease (``gate.SwapGate``) and
reads the head once, at its start: a swap lands between passes, never inside one.

    versions = LiveVersions(loaded, weights, layers_at=manager.version_layers)
    with versions.pinned(3):
        model(...)                     # version 3, whatever the head is
    versions.swap(7, layers)           # the head moves; passes in flight finish first
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .arch import get_module
from .delta import GatedSlots
from .edit_store import EditLayer
from .gate import SwapGate
from .layers import LayerWeights
from .loading import LoadedModel

DEFAULT_CACHE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class SideTerm:
    """One projection on another version: its own ``weight`` (storage layout, the model's dtype:
    exact), or the difference x -> (x @ v) @ u.T (low rank) or x @ dense.T, in float32."""

    u: torch.Tensor | None = None  # (out, r), the signs folded in
    v: torch.Tensor | None = None  # (in, r)
    dense: torch.Tensor | None = None  # (out, in)
    weight: torch.Tensor | None = None  # the version's matrix: the projection is recomputed with it

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.u, self.v, self.dense, self.weight) if t is not None)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.dense is not None:
            return x @ self.dense.T
        return (x @ self.v) @ self.u.T


@dataclass(frozen=True, eq=False)
class VersionDiff:
    """What a pass on ``version`` adds at each projection while ``head`` is live (module name -> term)."""

    version: int
    head: int
    terms: dict[str, SideTerm]
    slots: dict[str, GatedSlots | None] = dataclasses.field(default_factory=dict)  # module -> the version's
    #   gated columns where they differ from the installed ones (None: it has none there)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.terms.values()) + sum(s.nbytes for s in self.slots.values() if s)


def side_terms(plus: Sequence[EditLayer], minus: Sequence[EditLayer], device: torch.device) -> dict[str, SideTerm]:
    """Module name -> the term of sum(plus) - sum(minus) over the layers' factors."""
    us: dict[str, list[torch.Tensor]] = {}
    vs: dict[str, list[torch.Tensor]] = {}
    for sign, layers in ((1.0, plus), (-1.0, minus)):
        for layer in layers:
            for f in layer.factors:
                if f.gated:  # not in the matrices: the version's slots (VersionDiff.slots)
                    continue
                name = f.param.removesuffix(".weight")
                us.setdefault(name, []).append(sign * f.u.float())
                vs.setdefault(name, []).append(f.v.float())
    terms: dict[str, SideTerm] = {}
    for name, u_parts in us.items():
        u, v = torch.cat(u_parts, dim=1).to(device), torch.cat(vs[name], dim=1).to(device)
        (out, r), d_in = u.shape, v.shape[0]
        if r * (out + d_in) > out * d_in:  # denser than the matrix itself: keep the product
            terms[name] = SideTerm(dense=u @ v.T)
        else:
            terms[name] = SideTerm(u=u, v=v)
    return terms


def _only_in(layers: Sequence[EditLayer], other: Sequence[EditLayer]) -> list[EditLayer]:
    ids = {layer.edit_id for layer in other}
    return [layer for layer in layers if layer.edit_id not in ids]


def _touched_between(a: Sequence[EditLayer], b: Sequence[EditLayer], *, gated: bool = False) -> list[str]:
    """The matrices whose weights (``gated``: whose gated columns) differ between two versions' layer
    lists (by the layers in one only)."""
    layers = (*_only_in(a, b), *_only_in(b, a))
    return sorted({f.param for layer in layers for f in layer.factors if f.gated == gated})


def _slots_between(
    layers: Sequence[EditLayer], other: Sequence[EditLayer], own: Callable[[], dict[str, GatedSlots]]
) -> dict[str, GatedSlots | None]:
    """Module -> the gated columns of ``layers`` (``own()``, built only when some differ) where they
    differ from ``other``'s (None: none there)."""
    differ = [p.removesuffix(".weight") for p in _touched_between(layers, other, gated=True)]
    if not differ:
        return {}
    slots = own()
    return {name: slots.get(name) for name in differ}


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes: int = 0
    entries: int = 0


class _Pin(threading.local):
    pin: int | tuple[int, ...] | None = None  # the version of every row, or of each row
    groups: list[tuple[torch.Tensor | None, VersionDiff]] | None = None  # this pass's side paths
    depth: int = 0


class LiveVersions:
    def __init__(
        self,
        loaded: LoadedModel,
        weights: LayerWeights,
        *,
        layers_at: Callable[[int], list[EditLayer]],
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        gate: SwapGate | None = None,
    ) -> None:
        self.loaded = loaded
        self.weights = weights
        self.layers_at = layers_at  # version -> its active layers, loaded (the caller checked it exists)
        self.cache_bytes = cache_bytes
        self.gate = gate or SwapGate()
        # (version, its layers), each replaced whole: the head unpinned requests get, and the version
        # whose matrices are in the model (the same but between a swap's two steps)
        self._head: tuple[int, tuple[EditLayer, ...]] = (0, ())
        self._placed: tuple[int, tuple[EditLayer, ...]] = (0, ())
        self._cache: collections.OrderedDict[tuple[int, int], VersionDiff] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self.stats = CacheStats()
        self._local = _Pin()
        self._in_use: collections.Counter[int] = collections.Counter()
        self._use_lock = threading.Lock()
        self.last_swap_seconds = 0.0  # the last swap's stored -> live: build the matrices, publish
        self._handles = []
        # a pass enters through the model, or through its base model alone (``generation.last_logits``)
        for entry in dict.fromkeys((loaded.model, loaded.model.base_model)):
            self._handles.append(entry.register_forward_pre_hook(self._enter_pass))
            self._handles.append(entry.register_forward_hook(self._leave_pass, always_call=True))
        for param in sorted(loaded.spec.editable_weight_names(loaded.num_layers)):
            name = param.removesuffix(".weight")
            self._handles.append(get_module(loaded.model, name).register_forward_hook(self._side_path(name)))
        self.exact_terms = 0  # differences served exactly (the version's own matrices) ...
        self.low_rank_terms = 0  # ... and as a float32 side path (over the cache bound)
        weights.row_slots = self._slot_rows
        weights.rehook()  # the gated columns add to what the side paths above recomputed

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.weights.row_slots == self._slot_rows:
            self.weights.row_slots = None

    def _slot_rows(self, name: str) -> list[tuple[torch.Tensor | None, GatedSlots | None]]:
        """The rows of this thread's pass that serve other gated columns on ``name`` than the installed."""
        groups = self._local.groups
        if not groups:
            return []
        return [(index, diff.slots[name]) for index, diff in groups if name in diff.slots]

    # -- which version this thread's passes serve ------------------------------

    def pinned(self, version: int) -> contextlib.AbstractContextManager[None]:
        """Every pass of this thread inside serves ``version``."""
        return self._serving(version)

    def rows(self, versions: Sequence[int]) -> contextlib.AbstractContextManager[None]:
        """The next passes of this thread serve ``versions[i]`` on batch row i."""
        return self._serving(tuple(versions))

    @contextlib.contextmanager
    def _serving(self, pin: int | tuple[int, ...]) -> Iterator[None]:
        before, self._local.pin = self._local.pin, pin
        try:
            yield
        finally:
            self._local.pin = before

    def _enter_pass(self, _module: torch.nn.Module, _args: tuple) -> None:
        local = self._local
        local.depth += 1
        if local.depth > 1:
            return
        self.gate.acquire_read()
        try:
            local.groups = self._groups(local.pin)
        except BaseException:
            local.depth = 0
            self.gate.release_read()
            raise

    def _leave_pass(self, _module: torch.nn.Module, _args: tuple, output: object) -> object:
        local = self._local
        if local.depth == 0:
            return output
        local.depth -= 1
        if local.depth == 0:
            local.groups = None
            self.gate.release_read()
        return output

    def _groups(self, pin: int | tuple[int, ...] | None) -> list[tuple[torch.Tensor | None, VersionDiff]]:
        """The side paths of one pass: every row whose version is not the one in place (stable while
        the pass holds the read lease; unpinned rows serve the head, which may be published already)."""
        placed = self._placed[0]
        if pin is None:
            pin = self.head
        if isinstance(pin, int):
            return [] if pin == placed else [(None, self.diff(pin))]
        if all(v == placed for v in pin):
            return []
        if len(set(pin)) == 1:
            return [(None, self.diff(pin[0]))]
        by_version: dict[int, list[int]] = {}
        for row, v in enumerate(pin):
            if v != placed:
                by_version.setdefault(v, []).append(row)
        device = self.loaded.device
        return [(torch.tensor(rows, device=device), self.diff(v)) for v, rows in by_version.items()]

    def _side_path(self, name: str):
        spec = self.loaded.spec

        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            groups = self._local.groups
            if not groups:
                return None
            x = args[0]
            for index, diff in groups:
                term = diff.terms.get(name)
                if term is None:
                    continue
                rows = x if index is None else x.index_select(0, index)
                if term.weight is not None:  # exact: the version's own matrix
                    new = spec.project(module, rows, term.weight)
                    out = new if index is None else out.index_copy(0, index, new)
                elif index is None:
                    out = out + term.apply(rows).to(out.dtype)
                else:
                    out = out.index_add(0, index, term.apply(rows).to(out.dtype))
            return out

        return hook

    # -- the differences ---------------------------------------------------------

    def diff(self, version: int) -> VersionDiff:
        """The terms of ``version`` against the weights in place (cached)."""
        head, head_layers = self._placed  # one read: a swap may land meanwhile (outside a pass)
        key = (version, head)
        with self._cache_lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                self.stats.hits += 1
                return found
            self.stats.misses += 1
        made = self._build(version, self.layers_at(version), head, head_layers)
        self._keep(key, made)
        return made

    def _build(
        self, version: int, layers: Sequence[EditLayer], head: int, head_layers: Sequence[EditLayer]
    ) -> VersionDiff:
        params = _touched_between(layers, head_layers)
        matrices = [self.weights.parameter(p) for p in params]
        if sum(w.numel() * w.element_size() for w in matrices) <= self.cache_bytes:
            built = self.weights.prepare(layers, only=params)
            self.exact_terms += 1
            terms = {p.removesuffix(".weight"): SideTerm(weight=built[p]) for p in params}
        else:
            self.low_rank_terms += 1
            terms = side_terms(_only_in(layers, head_layers), _only_in(head_layers, layers), self.loaded.device)
        slots = _slots_between(layers, head_layers, lambda: self.weights.slots_of(layers))
        return VersionDiff(version, head, terms, slots)

    def _keep(self, key: tuple[int, int], made: VersionDiff) -> None:
        with self._cache_lock:
            if made.nbytes <= self.cache_bytes and key not in self._cache:
                self._cache[key] = made
                self.stats.bytes += made.nbytes
                while self.stats.bytes > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self.stats.bytes -= old.nbytes
                self.stats.entries = len(self._cache)

    # -- the head ----------------------------------------------------------------

    def swap(self, version: int, layers: Sequence[EditLayer]) -> float:
        """Make ``version`` (its active ``layers``) the head, in two steps:

        1. *live*: its matrices are built aside and published as the head; every pass that starts
           from here on serves it (through the exact term of the new head against the weights still
           in place). Nothing waits for a running pass. Returns the seconds of this step.
        2. *in place*: the matrices are copied into the model once the passes in flight end (new
           passes wait for the copy, a millisecond), and the terms against the old weights go.
        """
        t0 = time.perf_counter()
        placed, placed_layers = self._placed
        params = _touched_between(placed_layers, layers)  # every other matrix in place has its bits already
        prepared = self.weights.prepare(layers, only=params)
        slots = self.weights.slots_of(layers)
        new_slots = _slots_between(layers, placed_layers, lambda: slots)
        if version != placed:  # the new head against the weights in place: exactly the prepared matrices
            terms = {p.removesuffix(".weight"): SideTerm(weight=prepared[p]) for p in params}
            self._keep((version, placed), VersionDiff(version, placed, terms, new_slots))
        # the requests still on the old weights keep them: the live ones, copied (no rebuild)
        kept = {p: self.weights.parameter(p).detach().clone() for p in params} if placed in self.in_use() else {}
        old_slots = {name: self.weights.slots.get(name) for name in new_slots}
        self._head = (version, tuple(layers))
        self.last_swap_seconds = time.perf_counter() - t0
        with self.gate.writing():
            self.weights.install(prepared)
            self.weights.install_slots(slots)
            self._placed = self._head
        with self._cache_lock:
            for key in [k for k in self._cache if k[1] != version]:
                self.stats.bytes -= self._cache.pop(key).nbytes
            self.stats.entries = len(self._cache)
        if (kept or old_slots) and placed in self.in_use() and placed != version:
            terms = {p.removesuffix(".weight"): SideTerm(weight=w) for p, w in kept.items()}
            self._keep((placed, version), VersionDiff(placed, version, terms, old_slots))
        return self.last_swap_seconds

    def set_head(self, version: int, layers: Sequence[EditLayer]) -> None:
        """Record the head the weights already hold (at start, before any pass)."""
        self._head = self._placed = (version, tuple(layers))

    @property
    def head(self) -> int:
        """The version unpinned passes serve (published; in place once the swap's copy is done)."""
        return self._head[0]

    # -- what runs on which version ---------------------------------------------

    @contextlib.contextmanager
    def using(self, version: int) -> Iterator[None]:
        """Count a request on ``version`` while it runs (GetModelInfo, the metrics)."""
        with self._use_lock:
            self._in_use[version] += 1
        try:
            yield
        finally:
            with self._use_lock:
                self._in_use[version] -= 1
                if self._in_use[version] <= 0:
                    del self._in_use[version]

    def in_use(self) -> dict[int, int]:
        """version -> running requests on it."""
        with self._use_lock:
            return dict(self._in_use)
