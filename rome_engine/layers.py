"""Live weights = pristine base + an ordered list of edit layers (low-rank factors).

The first time a matrix is touched, its pristine base is copied aside. From
then on its weights are always *rebuilt*: the base in float32 plus every
active layer's delta, oldest first, then cast to the model's dtype. The same
active list therefore always gives the same bits, and an empty list gives the
base back exactly (reverting never subtracts in floating point).

    weights = LayerWeights(loaded)
    weights.materialize([layer_1, layer_2])   # the weights of a version
    weights.materialize([])                   # the base model, bit for bit

Serving swaps versions through it, and evaluation applies and removes a
computed edit through it too (``materialize_factors``): there is one way to
apply an edit. The arithmetic itself is ``delta.rebuilt``'s. The float32 sum of each touched
matrix is kept (up to ``sum_cache_bytes`` in all), so that a version made of the last one's
layers plus new ones adds only the new deltas: the same additions in the same order, so the
same bits, but one dense add per new factor instead of one per active factor.

Gated factors (``delta`` module docstring) are not weight changes: each touched projection
gets a forward hook that adds its ``GatedSlots`` (the version's gated columns, oldest first)
to the output. ``materialize``/``install_slots`` swap them with the weights; ``LiveVersions``
tells the hook, through ``row_slots``, which rows of a pass serve another version's slots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .arch import get_module
from .delta import GatedSlots, LowRankFactor, accumulated, gated_slots
from .edit_store import EditLayer, tensor_sha256
from .loading import LoadedModel
from .records import BaseFingerprint

# module name -> the rows of this pass that serve other slots than the installed ones: (row index
# tensor or None for every row, their slots or None for none)
RowSlots = Callable[[str], Sequence[tuple[torch.Tensor | None, GatedSlots | None]]]

# float32 sums kept per touched matrix (the newest first to go past it): a version on top of the
# last needs one delta added, not all of them (at 1,000 active edits: 1 instead of 1,000 dense adds)
SUM_CACHE_BYTES = 256 * 1024 * 1024


class LayerWeights:
    def __init__(self, loaded: LoadedModel, sum_cache_bytes: int = SUM_CACHE_BYTES) -> None:
        self.loaded = loaded
        self._base: dict[str, torch.Tensor] = {}  # pristine copies of touched matrices
        # name -> (the factors summed, oldest first; base + their sum in float32)
        self._sums: dict[str, tuple[tuple[LowRankFactor, ...], torch.Tensor]] = {}
        self._sum_cache_bytes = sum_cache_bytes
        self._slots: dict[str, GatedSlots] = {}  # module name -> the installed gated columns
        self._slot_hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self.row_slots: RowSlots | None = None  # set by LiveVersions (see install_slots)

    def parameter(self, name: str) -> torch.nn.Parameter:
        try:
            return self.loaded.model.get_parameter(name)
        except AttributeError as e:
            raise LookupError(name) from e

    def base(self, name: str) -> torch.Tensor:
        """The pristine matrix (the live one when it has never been touched)."""
        return self._base[name] if name in self._base else self.parameter(name).detach()

    def fingerprint(self, params: list[str]) -> BaseFingerprint:
        """What a layer was computed on: the model id and the sha256 of each touched base matrix."""
        return BaseFingerprint(self.loaded.model_id, {p: tensor_sha256(self.base(p)) for p in sorted(params)})

    def check_fingerprint(self, fingerprint: BaseFingerprint, params: list[str] | None = None) -> str | None:
        """None when a layer computed on ``fingerprint`` fits this base, else why not.

        With ``params`` (the layer's touched matrices), the fingerprint must name each of them.
        """
        digests = fingerprint.matrices
        if not digests:
            return "the layer's base fingerprint lists no matrices"
        if params is not None and set(params) != set(digests):
            return f"the base fingerprint names {sorted(digests)}, the layer touches {sorted(params)}"
        for name, digest in digests.items():
            try:
                ours = tensor_sha256(self.base(name))
            except LookupError:
                return f"the model has no parameter {name}"
            if ours != digest:
                return f"base matrix {name} differs (sha256 {ours[:12]} here, {digest[:12]} in the layer)"
        return None

    def check_shapes(self, layer: EditLayer) -> str | None:
        for f in layer.factors:
            try:
                w = self.loaded.spec.as_out_in(self.parameter(f.param))
            except LookupError:
                return f"the model has no parameter {f.param}"
            if tuple(w.shape) != f.shape:
                factors = f"{f.shape[0]} x {f.shape[1]}"
                return f"{f.param} is {tuple(w.shape)} (out, in) but the layer's factors are {factors}"
        return None

    def check_targets(self, layer: EditLayer, allowed: frozenset[str]) -> str | None:
        """None when every matrix the layer touches is one an editing method may touch, else why not."""
        for f in layer.factors:
            if f.param not in allowed:
                return f"{f.param} is not a matrix edits may change (allowed: the MLP output projections)"
        return None

    def check_norms(self, layer: EditLayer, max_ratio: float) -> str | None:
        """None when no update is large next to its matrix, else why not.

        ||u v^T||_F = ||u|| ||v|| must be at most max_ratio * ||W||_F (W the pristine base).
        """
        for f in layer.factors:
            base_norm = float(self.base(f.param).float().norm())
            if not f.norm <= max_ratio * base_norm:
                ratio = f.norm / base_norm if base_norm else float("inf")
                return (
                    f"the update of {f.param} has norm {f.norm:.4g}, {ratio:.3g} times the matrix's {base_norm:.4g}: "
                    f"over the limit max_update_norm_ratio={max_ratio}"
                )
        return None

    def materialize(self, layers: Sequence[EditLayer]) -> None:
        """Set every touched matrix to base + the deltas of ``layers`` (in order): a version's weights."""
        self.materialize_factors([f for layer in layers for f in layer.factors])

    def materialize_factors(self, factors: Sequence[LowRankFactor]) -> None:
        """Set every touched matrix to base + its ``factors`` (in order); no factors: the base, bit for bit.
        Gated factors become the projections' slots (none: no side path at all)."""
        self.install(self.prepare_factors(factors))
        self.install_slots(gated_slots(factors, self.loaded.device))

    def slots_of(self, layers: Sequence[EditLayer]) -> dict[str, GatedSlots]:
        """Module name -> the gated columns of ``layers`` on it (the same layers give the same tensors)."""
        return gated_slots([f for layer in layers for f in layer.factors], self.loaded.device)

    def install_slots(self, slots: dict[str, GatedSlots]) -> None:
        """Serve ``slots`` from the next pass on (replaced whole: no pass sees half of them)."""
        for name in slots:
            if name not in self._slot_hooks:
                self._hook(name)
        self._slots = dict(slots)

    @property
    def slots(self) -> dict[str, GatedSlots]:
        return self._slots

    def rehook(self) -> None:
        """Register the slot hooks again, so that they run after every hook registered since (the
        versions' side paths recompute a pinned row's output first; the slots add to it)."""
        for name, handle in list(self._slot_hooks.items()):
            handle.remove()
            self._hook(name)

    def _hook(self, name: str) -> None:
        self._slot_hooks[name] = get_module(self.loaded.model, name).register_forward_hook(self._slot_hook(name))

    def _slot_hook(self, name: str):
        def hook(_module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            live = self._slots.get(name)
            other = self.row_slots(name) if self.row_slots is not None else ()
            if not other:
                return None if live is None else out + live.apply(args[0]).to(out.dtype)
            x = args[0]
            if len(other) == 1 and other[0][0] is None:  # every row on one other version
                slots = other[0][1]
                return out if slots is None else out + slots.apply(x).to(out.dtype)
            add = live.apply(x) if live is not None else torch.zeros(out.shape, dtype=torch.float32, device=out.device)
            for index, slots in other:
                rows = x.index_select(0, index)
                part = slots.apply(rows) if slots is not None else torch.zeros_like(add.index_select(0, index))
                add = add.index_copy(0, index, part)
            return out + add.to(out.dtype)

        return hook

    def prepare(self, layers: Sequence[EditLayer], only: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """A version's touched matrices (or those named in ``only``), built aside, the live weights
        unchanged: name -> weights. The same layers always give the same bits."""
        return self.prepare_factors([f for layer in layers for f in layer.factors], only)

    @torch.no_grad()
    def prepare_factors(
        self, factors: Sequence[LowRankFactor], only: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        deltas: dict[str, list[LowRankFactor]] = {}
        for f in factors:
            if not f.gated:  # a gated factor is served beside the weights (install_slots)
                deltas.setdefault(f.param, []).append(f)
        for name in (*deltas, *(only or ())):
            if name not in self._base:
                self._base[name] = self.parameter(name).detach().clone()
        names = self._base if only is None else only
        return {name: self._rebuilt(name, deltas.get(name, [])) for name in names}

    def _rebuilt(self, name: str, factors: list[LowRankFactor]) -> torch.Tensor:
        """``delta.rebuilt`` of the matrix, bit for bit, continuing the kept sum when its factors
        are a prefix of ``factors`` (the same objects, in order)."""
        base = self._base[name]
        if not factors:
            return base
        done, start = (), base.float()
        kept = self._sums.get(name)
        if kept is not None and _is_prefix(kept[0], factors):
            done, start = kept
        acc = accumulated(self.loaded.spec, start, factors[len(done) :])
        self._keep(name, tuple(factors), acc)
        return acc.to(base.dtype)

    def _keep(self, name: str, factors: tuple[LowRankFactor, ...], acc: torch.Tensor) -> None:
        self._sums.pop(name, None)
        size = acc.numel() * acc.element_size()
        while self._sums and sum(a.numel() * a.element_size() for _, a in self._sums.values()) + size > (
            self._sum_cache_bytes
        ):
            del self._sums[next(iter(self._sums))]  # the matrix summed longest ago
        if size <= self._sum_cache_bytes:
            self._sums[name] = (factors, acc)

    @torch.no_grad()
    def install(self, prepared: dict[str, torch.Tensor]) -> None:
        """Copy prepared matrices into the live weights (no forward pass may run meanwhile)."""
        for name, weights in prepared.items():
            self.parameter(name).copy_(weights)

    @property
    def touched(self) -> list[str]:
        return sorted(self._base)


def _is_prefix(done: Sequence[LowRankFactor], factors: Sequence[LowRankFactor]) -> bool:
    """The same factor objects, in the same order, begin ``factors``."""
    return len(done) <= len(factors) and all(a is b for a, b in zip(done, factors[: len(done)], strict=True))
