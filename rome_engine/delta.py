"""The rank-one delta: the one place that turns a factor into a weight change.

Every edit, however computed, is stored and applied as factors of the matrices
it touches. This module owns that arithmetic, for both ways of using it:

* ``rebuilt``: a matrix's weights as base + its deltas (``layers.LayerWeights``
  calls it to serve a version, evaluation through the same class);
* ``as_if_applied``: the model evaluated *as if* the deltas were applied, by a
  forward hook that only the installing thread sees (measuring an edit before it
  is stored, while streams run on the live weights).

**The u/v convention**, stated once for the whole project: a factor of the
matrix W in its (out, in) layout (``nn.Linear``'s; GPT-2's ``Conv1D`` stores W
transposed, ``ArchSpec.as_out_in``/``from_out_in`` convert) is

    delta W = outer(u, v),   u: (out,)  the value side,  u = v* - W k*
                             v: (in,)   the key side,    v = C^-1 k* / (k*^T C^-1 k*)

so that W' k* = W k* + u (v . k*) = v*. The ROME authors' code names the same
two vectors the other way round for its (in, out) GPT-2 layout: its
``left_vector`` (in,) is our v and its ``right_vector`` (out,) our u.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .arch import ArchSpec
from .loading import LoadedModel


@dataclass(frozen=True)
class RankOneFactor:
    """One matrix's update in (out, in) layout: delta = outer(u, v) (see the module docstring)."""

    param: str  # the weight's parameter name, e.g. "model.layers.4.mlp.down_proj.weight"
    u: torch.Tensor  # (out,) float32, the value side
    v: torch.Tensor  # (in,) float32, the key side

    @property
    def norm(self) -> float:
        # ||u v^T||_F = ||u|| ||v||
        return float(self.u.norm() * self.v.norm())

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.u).all()) and bool(torch.isfinite(self.v).all())


def storage_delta(spec: ArchSpec, factor: RankOneFactor) -> torch.Tensor:
    """outer(u, v) in the weight's storage layout ((in, out) for Conv1D), float32."""
    return spec.from_out_in(torch.outer(factor.u.float(), factor.v.float()))


@torch.no_grad()
def rebuilt(spec: ArchSpec, base: torch.Tensor, factors: Sequence[RankOneFactor]) -> torch.Tensor:
    """W = base + sum_i outer(u_i, v_i), summed in float32 in order, cast to the base's dtype.

    The same base and factors always give the same bits; no factors gives the base itself.
    """
    if not factors:
        return base
    acc = base.float()
    if acc.data_ptr() == base.data_ptr():  # a float32 base: never add into it
        acc = acc.clone()
    for f in factors:
        acc += storage_delta(spec, f).to(acc.device)
    return acc.to(base.dtype)


class as_if_applied:  # used like a function in a with statement
    """Evaluate the model *as if* ``factors`` were applied, without touching its weights.

    A forward hook on each edited projection adds u (v . x) to its output:
    W' x = W x + u (v . x). Only forward passes of the installing thread see
    it, so streams served meanwhile keep the live weights.
    """

    def __init__(self, loaded: LoadedModel, factors: Sequence[RankOneFactor]) -> None:
        owner = threading.get_ident()
        self._handles = []
        for f in factors:
            module = loaded.model.get_submodule(f.param.removesuffix(".weight"))
            u, v = f.u, f.v

            def hook(_m: torch.nn.Module, args: tuple, output: torch.Tensor, u=u, v=v) -> torch.Tensor:
                if threading.get_ident() != owner:
                    return output
                x = args[0]  # (..., in)
                coeff = x.float() @ v.to(x.device)  # (...,) = v . x
                return output + (coeff.unsqueeze(-1) * u.to(x.device)).to(output.dtype)

            self._handles.append(module.register_forward_hook(hook))

    def __enter__(self) -> as_if_applied:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
