"""The low-rank delta: the one place that turns a factor into a weight change.

Every edit, however computed (ROME's rank one, MEMIT's rank r for a batch of r
facts, a truncated SVD of a fine-tuning change), is stored and applied as
factors of the matrices it touches. This module owns that arithmetic, for both
ways of using it:

* ``rebuilt``: a matrix's weights as base + its deltas (``layers.LayerWeights``
  calls it to serve a version, evaluation through the same class);
* ``as_if_applied``: the model evaluated *as if* the deltas were applied, by a
  hook that only the installing thread sees (measuring an edit before it is
  stored, MEMIT's lower layers while it computes the higher ones, while
  streams run on the live weights).

**The u/v convention**, stated once for the whole project: a factor of the
matrix W in its (out, in) layout (``nn.Linear``'s; GPT-2's ``Conv1D`` stores W
transposed, ``ArchSpec.as_out_in``/``from_out_in`` convert) is

    delta W = u @ v.T,   u: (out, r)  the value side,  ROME: u = v* - W k*
                         v: (in, r)   the key side,    ROME: v = C^-1 k* / (k*^T C^-1 k*)

so that for ROME W' k* = W k* + u (v . k*) = v*. The ROME authors' code names
the same two vectors the other way round for its (in, out) GPT-2 layout: its
``left_vector`` (in,) is our v and its ``right_vector`` (out,) our u.

**Gated factors** (``threshold`` set, the ``gated`` method): column j acts only on inputs
whose response s_j = v_j . x exceeds the threshold,

    delta(x) = sum_j u_j phi(v_j . x),   phi(s) = s if s > threshold else 0

so an input the edit was not written for gets exactly nothing (a plain factor adds
u (v . x) to every input, and 1,000 small additions add up). Such a factor is not a
weight change: it is never summed into W; ``LayerWeights`` serves it as a side path
beside the projection (``GatedSlots``), and ``as_if_applied`` through ``apply``.

**A cosine condition** (``CosineGate``, optional, the ``gate_min_cosine`` hparam): column j
also needs its input to point the way of its edit key k_j once each input dimension is
scaled by its spread in C (scale = diag(C)^-1/2):

    cos_j(x) = (x * scale) . (k_j * scale) / (||x * scale|| ||k_j * scale||) > min_cosine

which tells apart two subjects whose keys answer alike (s) but differ in the directions
ordinary text barely uses (``bench/bench_gate.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .arch import ArchSpec
from .hooks import Trace
from .loading import LoadedModel


@dataclass(frozen=True, eq=False)
class CosineGate:
    """A gated factor's second condition (module docstring): per column, the edit key it is
    compared with and the scale diag(C)^-1/2 of the model it was computed on."""

    scale: torch.Tensor  # (in,) float32, positive
    keys: torch.Tensor  # (in, r) float32, column j: k_j
    min_cosine: float  # in (-1, 1)

    def __post_init__(self) -> None:
        if self.scale.dim() != 1 or self.keys.dim() != 2 or self.keys.shape[0] != self.scale.shape[0]:
            raise ValueError(f"a cosine gate needs scale (in,) and keys (in, r), got {tuple(self.scale.shape)} "
                             f"and {tuple(self.keys.shape)}")  # fmt: skip
        if not -1.0 < self.min_cosine < 1.0:  # NaN too
            raise ValueError(f"min_cosine must be in (-1, 1), got {self.min_cosine}")

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, S2), both (in, r) float32, with cos_j(x) = (x @ W)_j / sqrt((x * x) @ S2)_j:
        W_j = scale^2 * k_j / ||k_j * scale||, S2_j = scale^2."""
        s2 = self.scale.float().square().unsqueeze(1)  # (in, 1)
        k = self.keys.float()
        norm = (k * self.scale.float().unsqueeze(1)).norm(dim=0).clamp_min(1e-30)  # (r,)
        return s2 * k / norm, s2.expand_as(k).contiguous()

    def to(self, device: torch.device) -> CosineGate:
        return CosineGate(self.scale.float().to(device), self.keys.float().to(device), self.min_cosine)

    def cpu(self) -> CosineGate:
        return CosineGate(self.scale.detach().float().cpu(), self.keys.detach().float().cpu(), self.min_cosine)


def cosine(x: torch.Tensor, w: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """cos_j(x) (..., r) from ``CosineGate.weights``; 0 where x is 0."""
    return (x @ w) / ((x * x) @ s2).clamp_min(1e-30).sqrt()


@dataclass(frozen=True, eq=False)
class LowRankFactor:
    """One matrix's update in (out, in) layout: delta W = u @ v.T (see the module docstring)."""

    param: str  # the weight's parameter name, e.g. "model.layers.4.mlp.down_proj.weight"
    u: torch.Tensor  # (out, r) float32, the value side
    v: torch.Tensor  # (in, r) float32, the key side
    threshold: float | None = None  # gated: column j acts only where v_j . x > threshold (module docstring)
    cosine_gate: CosineGate | None = None  # gated: ... and where cos_j(x) > min_cosine (optional)

    def __post_init__(self) -> None:
        if self.u.dim() != 2 or self.v.dim() != 2 or self.u.shape[1] != self.v.shape[1]:
            raise ValueError(f"the factors of {self.param} must be (out, r) and (in, r), got "
                             f"{tuple(self.u.shape)} and {tuple(self.v.shape)}")  # fmt: skip
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"the gate threshold of {self.param} must be in (0, 1), got {self.threshold}")
        if self.cosine_gate is not None and (self.threshold is None or self.cosine_gate.keys.shape != self.v.shape):
            raise ValueError(f"the cosine gate of {self.param} needs a gated factor and one (in,) key per column")

    @classmethod
    def rank_one(cls, param: str, u: torch.Tensor, v: torch.Tensor) -> LowRankFactor:
        """From vectors u (out,) and v (in,): delta W = outer(u, v)."""
        return cls(param, u.reshape(-1, 1), v.reshape(-1, 1))

    @property
    def gated(self) -> bool:
        return self.threshold is not None

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the matrix it updates."""
        return int(self.u.shape[0]), int(self.v.shape[0])

    @property
    def norm(self) -> float:
        # ||u v^T||_F^2 = tr(v u^T u v^T) = sum((u^T u) * (v^T v))
        gram = (self.u.double().T @ self.u.double()) * (self.v.double().T @ self.v.double())
        return math.sqrt(max(float(gram.sum()), 0.0))

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.u).all()) and bool(torch.isfinite(self.v).all())

    def delta(self) -> torch.Tensor:
        """u @ v.T: (out, in) float32 (a plain factor's weight change; refused for a gated one)."""
        if self.gated:
            raise ValueError(f"the gated factor of {self.param} is not a weight change")
        return self.u.float() @ self.v.float().T

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """What the factor adds to the projection's output for inputs x (..., in): (..., out) float32.

        Plain: (x @ v) @ u.T. Gated: as ``GatedSlots`` serves it (the one place the gate is applied)."""
        if self.gated:
            return GatedSlots.of([self], x.device).apply(x)
        return (x.float() @ self.v.to(x.device)) @ self.u.to(x.device).T

    def cpu(self) -> LowRankFactor:
        """The same factor as float32 tensors on the CPU (how layers store it)."""
        cos = self.cosine_gate.cpu() if self.cosine_gate is not None else None
        return LowRankFactor(
            self.param, self.u.detach().float().cpu(), self.v.detach().float().cpu(), self.threshold, cos
        )

    def to(self, device: torch.device) -> LowRankFactor:
        """The same factor, float32, on ``device``."""
        cos = self.cosine_gate.to(device) if self.cosine_gate is not None else None
        return LowRankFactor(self.param, self.u.float().to(device), self.v.float().to(device), self.threshold, cos)


def gate(s: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """phi(s) = s where s > threshold, else 0 (exactly): a gated column's response to its key."""
    return torch.where(s > threshold, s, torch.zeros((), dtype=s.dtype, device=s.device))


@dataclass(frozen=True, eq=False)
class GatedSlots:
    """Every gated column on one projection, oldest first: x -> phi(x @ v) @ u.T, phi per column
    with its own threshold (``thresholds`` (r,)) and, where any column has one, its cosine
    condition (``cos_w``, ``cos_s2`` (in, r), ``min_cos`` (r,); a column without one passes it:
    W 0, S2 1, min -inf). The same factors in the same order give the same tensors, so a
    version's side path is rebuilt bit for bit."""

    u: torch.Tensor  # (out, r) float32
    v: torch.Tensor  # (in, r) float32
    thresholds: torch.Tensor  # (r,) float32
    cos_w: torch.Tensor | None = None  # (in, r) float32
    cos_s2: torch.Tensor | None = None  # (in, r) float32
    min_cos: torch.Tensor | None = None  # (r,) float32

    @classmethod
    def of(cls, factors: Sequence[LowRankFactor], device: torch.device) -> GatedSlots:
        if not factors or not all(f.gated for f in factors):
            raise ValueError("GatedSlots are built from one or more gated factors")
        u = torch.cat([f.u.float() for f in factors], dim=1).to(device)
        v = torch.cat([f.v.float() for f in factors], dim=1).to(device)
        t = torch.tensor([f.threshold for f in factors for _ in range(f.rank)], dtype=torch.float32, device=device)
        if all(f.cosine_gate is None for f in factors):
            return cls(u, v, t)
        ws, s2s, mins = [], [], []
        for f in factors:
            if f.cosine_gate is None:
                ws.append(torch.zeros_like(f.v, dtype=torch.float32))
                s2s.append(torch.ones_like(f.v, dtype=torch.float32))
                mins += [-math.inf] * f.rank
            else:
                w, s2 = f.cosine_gate.weights()
                ws.append(w)
                s2s.append(s2)
                mins += [f.cosine_gate.min_cosine] * f.rank
        cat = [torch.cat([x.float().cpu() for x in xs], dim=1).to(device) for xs in (ws, s2s)]
        return cls(u, v, t, cat[0], cat[1], torch.tensor(mins, dtype=torch.float32, device=device))

    @property
    def columns(self) -> int:
        return int(self.u.shape[1])

    @property
    def nbytes(self) -> int:
        parts = (self.u, self.v, self.thresholds, self.cos_w, self.cos_s2, self.min_cos)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out) float32."""
        x = x.float()
        s = gate(x @ self.v, self.thresholds)
        if self.cos_w is not None and self.cos_s2 is not None and self.min_cos is not None:
            keep = cosine(x, self.cos_w, self.cos_s2) > self.min_cos
            s = torch.where(keep, s, torch.zeros((), dtype=s.dtype, device=s.device))
        return s @ self.u.T


def gated_slots(factors: Sequence[LowRankFactor], device: torch.device) -> dict[str, GatedSlots]:
    """Module name -> the gated columns of ``factors`` on it (oldest first); plain factors are skipped."""
    by_module: dict[str, list[LowRankFactor]] = {}
    for f in factors:
        if f.gated:
            by_module.setdefault(f.param.removesuffix(".weight"), []).append(f)
    return {name: GatedSlots.of(fs, device) for name, fs in by_module.items()}


def storage_delta(spec: ArchSpec, factor: LowRankFactor) -> torch.Tensor:
    """u @ v.T in the weight's storage layout ((in, out) for Conv1D), float32."""
    return spec.from_out_in(factor.delta())


@torch.no_grad()
def rebuilt(spec: ArchSpec, base: torch.Tensor, factors: Sequence[LowRankFactor]) -> torch.Tensor:
    """W = base + sum_i u_i @ v_i.T, summed in float32 in order, cast to the base's dtype.

    The same base and factors always give the same bits; no factors gives the base itself.
    """
    if not factors:
        return base
    return accumulated(spec, base.float(), factors).to(base.dtype)


@torch.no_grad()
def accumulated(spec: ArchSpec, start: torch.Tensor, factors: Sequence[LowRankFactor]) -> torch.Tensor:
    """start + sum_i u_i @ v_i.T in float32, added one factor after the other in order (``start``, a
    float32 sum of earlier factors or the base, is never written). Continuing the sum of a prefix
    of ``factors`` gives the same bits as summing them all from the base."""
    acc = start.clone()
    for f in factors:
        if not f.gated:  # a gated factor is served beside the weights (GatedSlots), never summed in
            acc += storage_delta(spec, f).to(acc.device)
    return acc


class as_if_applied:  # used like a function in a with statement
    """Evaluate the model *as if* ``factors`` were applied, without touching its weights.

    A hook on each touched projection adds (x @ v) @ u.T to its output:
    W' x = W x + u (v^T x). It is a ``hooks.Trace``, so only forward passes of
    the installing thread see it: streams served meanwhile keep the live weights.
    """

    def __init__(self, loaded: LoadedModel, factors: Sequence[LowRankFactor]) -> None:
        by_module: dict[str, list[LowRankFactor]] = {}
        for f in factors:  # the factors live where the model runs
            moved = f.to(loaded.device)
            by_module.setdefault(f.param.removesuffix(".weight"), []).append(moved)

        def add(name: str, out: torch.Tensor) -> torch.Tensor:
            x = self._trace[name].input  # (..., in), as the projection read it
            return out + sum(f.apply(x) for f in by_module[name]).to(out.dtype)

        self._trace = Trace(loaded.model, list(by_module), capture_input=True, capture_output=False,
                            edit_output=add)  # fmt: skip

    def __enter__(self) -> as_if_applied:
        return self

    def __exit__(self, *exc: object) -> None:
        self._trace.close()
