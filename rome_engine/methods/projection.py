"""The projected mode's P: which input directions a new edit may write from.

C = E[k k^T] of a layer's keys has a few large eigenvalues (the directions
ordinary text uses) and many small ones. AlphaEdit (Fang et al. 2025) keeps
the eigenvectors whose eigenvalue is below a threshold (2e-2 in its code, on
E[k k^T] over 100k Wikipedia samples) and projects the update onto their span,
so that the keys of ordinary text, which lie in the other eigenvectors'
span, see (almost) no change. Ours takes the threshold relative to the mean
eigenvalue tr(C)/d by default, so that one number serves models whose keys
have different scales (``nullspace_relative=0``: absolute, as AlphaEdit).

    eig, cached = layer_eigenbasis(loaded, layer, hp, cache)    # C's eigh, cached beside C
    keep = preserved_basis(eig, threshold=2e-2, relative=True)  # (d, m) the directions to leave alone
    proj = projector(keep, prior_keys, hard=True)               # P = I - Q Q^T, Q spans keep + K_p
    proj.free                                                   # input dimensions left to write from

With ``hard=True`` the earlier edits' keys K_p join the preserved span: P
k_p = 0, so the new update leaves W k_p exactly as it was (see ``solve.py``),
at the price of one dimension per earlier key, for good: after d - m keys a
layer has no direction left to write from. With ``hard=False`` (AlphaEdit)
K_p only enters the solve as a penalty K_p K_p^T, which never runs out but
lets each new edit disturb the earlier ones a little.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from ..fileio import atomic_write_with
from ..loading import LoadedModel
from ..rome.cache import ProgressFn, RomeCache
from ..rome.covariance import covariance_path, layer_covariance
from ..rome.hparams import RomeHParams

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Eigenbasis:
    """C = vectors diag(values) vectors^T, eigenvalues ascending; float64 on the CPU."""

    values: torch.Tensor  # (d,)
    vectors: torch.Tensor  # (d, d), column i belongs to values[i]

    @property
    def mean(self) -> float:
        # tr(C) / d = E||k||^2 / d
        return float(self.values.mean())


def eigenbasis_of(cov: torch.Tensor) -> Eigenbasis:
    values, vectors = torch.linalg.eigh(cov.double().cpu())
    return Eigenbasis(values.clamp(min=0.0), vectors)


def layer_eigenbasis(
    loaded: LoadedModel, layer: int, hp: RomeHParams, cache: RomeCache, *, progress: ProgressFn | None = None
) -> tuple[Eigenbasis, bool]:
    """C's eigenbasis at ``layer`` (memory, then ``eig-<C's file name>`` beside C, then computed),
    and whether it came from a cache."""
    cov_path = covariance_path(loaded, layer, hp, cache)
    path = cov_path.with_name("eig-" + cov_path.name)
    from_disk = True

    def load_or_compute() -> Eigenbasis:
        nonlocal from_disk
        if path.exists():
            try:
                t = load_file(str(path))
                log.info("eigenbasis of C at layer %d read from %s", layer, path)
                return Eigenbasis(t["values"], t["vectors"])
            except Exception as e:  # a corrupt file: compute it again
                log.warning("ignoring the unreadable eigenbasis file %s: %s", path, e)
        cov, from_disk = layer_covariance(loaded, layer, hp, cache, progress=progress)
        t0 = time.perf_counter()
        eig = eigenbasis_of(cov)
        tensors = {"values": eig.values.contiguous(), "vectors": eig.vectors.contiguous()}
        atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata={"layer": str(layer)}))
        log.info("eigenbasis of C at layer %d computed in %.1f s -> %s", layer, time.perf_counter() - t0, path)
        return eig

    eig, in_memory = cache.get_or_compute(f"eig:{path}", load_or_compute)
    return eig, in_memory or from_disk


def preserved_basis(eig: Eigenbasis, threshold: float, relative: bool = True) -> torch.Tensor:
    """The eigenvectors of C whose eigenvalue is at least ``threshold`` (times tr(C)/d when
    ``relative``): (d, m) float64, orthonormal columns. The update may not write from their span."""
    cut = threshold * eig.mean if relative else threshold
    return eig.vectors[:, eig.values >= cut]


@dataclass(frozen=True, eq=False)
class Projector:
    """P = I - Q Q^T, kept as Q: (d, q) float64 with orthonormal columns, the directions the update
    may not write from. Applying it costs O(d q r) for r vectors; the dense (d, d) P is never needed
    by the hard mode's solve (see ``solve.projected_factor``)."""

    basis: torch.Tensor  # Q (d, q)

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    @property
    def free(self) -> int:
        """Input dimensions left to write from: d - q."""
        return self.dim - int(self.basis.shape[1])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """P x = x - Q (Q^T x), float64, for x (d, r)."""
        q = self.basis
        x = x.double().to(q.device)
        return x - q @ (q.T @ x)

    def dense(self) -> torch.Tensor:
        """P (d, d) float64."""
        q = self.basis
        return torch.eye(self.dim, dtype=q.dtype, device=q.device) - q @ q.T


def projector(
    preserved: torch.Tensor, prior_keys: torch.Tensor | None = None, *, hard: bool = True, tol: float = 1e-9
) -> Projector:
    """P = I - Q Q^T with Q an orthonormal basis of the preserved span, and with ``hard`` also of
    the earlier edits' keys ``prior_keys`` (d, n).

    Key directions within ``tol`` (relative to the longest key) of the span already preserved add nothing.
    """
    q = preserved.double()
    if hard and prior_keys is not None and prior_keys.numel():
        k = prior_keys.double().to(q.device)
        rest = k - q @ (q.T @ k)  # (d, n): what the preserved span leaves of each key
        left, s, _ = torch.linalg.svd(rest, full_matrices=False)
        scale = float(k.norm(dim=0).max())
        q = torch.cat([q, left[:, s > tol * max(scale, 1e-30)]], dim=1)
    return Projector(q)
