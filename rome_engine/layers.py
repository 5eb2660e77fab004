"""Live weights = pristine base + an ordered list of rank-one layers.

The first time a matrix is touched, its pristine base is copied aside. From
then on its weights are always *rebuilt*: the base in float32 plus every
active layer's delta, oldest first, then cast to the model's dtype. The same
active list therefore always gives the same bits, and an empty list gives the
base back exactly (reverting never subtracts in floating point).

    weights = LayerWeights(loaded)
    weights.materialize([layer_1, layer_2])   # the weights of a version
    weights.materialize([])                   # the base model, bit for bit
"""

from __future__ import annotations

import torch

from .edit_store import EditLayer, RankOneFactor, tensor_sha256
from .loading import LoadedModel


def storage_delta(loaded: LoadedModel, factor: RankOneFactor) -> torch.Tensor:
    """The float32 update of one matrix in its storage layout: outer(u, v) in (out, in)."""
    delta = torch.outer(factor.u.float(), factor.v.float())  # (out, in)
    return loaded.spec.from_out_in(delta)


class LayerWeights:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._base: dict[str, torch.Tensor] = {}  # pristine copies of touched matrices

    def parameter(self, name: str) -> torch.nn.Parameter:
        try:
            return self.loaded.model.get_parameter(name)
        except AttributeError as e:
            raise LookupError(name) from e

    def base(self, name: str) -> torch.Tensor:
        """The pristine matrix (the live one when it has never been touched)."""
        return self._base[name] if name in self._base else self.parameter(name).detach()

    def fingerprint(self, params: list[str]) -> dict:
        """What a layer was computed on: the model id and the sha256 of each touched base matrix."""
        return {"model_id": self.loaded.model_id, "matrices": {p: tensor_sha256(self.base(p)) for p in sorted(params)}}

    def check_fingerprint(self, fingerprint: dict, params: list[str] | None = None) -> str | None:
        """None when a layer computed on ``fingerprint`` fits this base, else why not.

        With ``params`` (the layer's touched matrices), the fingerprint must name each of them.
        """
        digests = fingerprint.get("matrices") if isinstance(fingerprint, dict) else None
        if not isinstance(digests, dict) or not digests:
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
            if tuple(w.shape) != (f.u.numel(), f.v.numel()):
                factors = f"{f.u.numel()} x {f.v.numel()}"
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

    @torch.no_grad()
    def materialize(self, layers: list[EditLayer]) -> None:
        """Set every touched matrix to base + the deltas of ``layers`` (in order)."""
        deltas: dict[str, list[RankOneFactor]] = {}
        for layer in layers:
            for f in layer.factors:
                deltas.setdefault(f.param, []).append(f)
        for name in deltas:
            if name not in self._base:
                self._base[name] = self.parameter(name).detach().clone()
        for name, base in self._base.items():
            param = self.parameter(name)
            factors = deltas.get(name, [])
            if not factors:
                param.copy_(base)
                continue
            acc = base.float()  # W = base + sum_i u_i v_i^T, accumulated in float32
            if acc.data_ptr() == base.data_ptr():
                acc = acc.clone()
            for f in factors:
                acc += storage_delta(self.loaded, f).to(acc.device)
            param.copy_(acc.to(param.dtype))

    @property
    def touched(self) -> list[str]:
        return sorted(self._base)


class rank_one_patch:  # used like a function in a with statement
    """Evaluate the model *as if* ``factors`` were applied, without touching its weights.

    A forward hook on each edited projection adds (x . v) u to its output:
    W' x = W x + u (v . x). Only forward passes of the installing thread see
    it, so streams served meanwhile keep the live weights.
    """

    def __init__(self, loaded: LoadedModel, factors: tuple[RankOneFactor, ...] | list[RankOneFactor]) -> None:
        import threading

        owner = threading.get_ident()
        self._handles = []
        for f in factors:
            module_name = f.param.removesuffix(".weight")
            module = loaded.model.get_submodule(module_name)
            u, v = f.u, f.v

            def hook(_m: torch.nn.Module, args: tuple, output: torch.Tensor, u=u, v=v) -> torch.Tensor:
                if threading.get_ident() != owner:
                    return output
                x = args[0]  # (..., in)
                coeff = x.float() @ v.to(x.device)  # (...,)
                return output + (coeff.unsqueeze(-1) * u.to(x.device)).to(output.dtype)

            self._handles.append(module.register_forward_hook(hook))

    def __enter__(self) -> rank_one_patch:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
