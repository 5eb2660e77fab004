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
import threading
import time
from collections.abc import Sequence
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


KeyBlock = tuple[str, torch.Tensor]  # (edit id, the keys that edit stored for one matrix (in, r))
PriorKeys = torch.Tensor | Sequence[KeyBlock]  # one matrix's earlier keys: (in, n), or per edit, oldest first


def new_directions(qt: torch.Tensor, keys: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """The directions of ``keys`` (d, r) that Q (given as Q^T, (m, d), orthonormal rows) does not
    span yet: (j, d) orthonormal rows, j <= r, orthogonal to Q's.

    rest = (I - Q Q^T) k, taken twice (classical Gram-Schmidt with reorthogonalisation keeps the
    rows orthogonal to rounding after thousands of extensions); the left singular vectors of rest
    whose singular value exceeds ``tol`` times the longest key are the new directions.
    """
    k = keys.double().to(qt.device)
    rest = k - qt.T @ (qt @ k)
    rest = rest - qt.T @ (qt @ rest)
    left, s, _ = torch.linalg.svd(rest, full_matrices=False)
    scale = float(k.norm(dim=0).max()) if k.numel() else 0.0
    return left[:, s > tol * max(scale, 1e-30)].T


def extend_basis(q: torch.Tensor, keys: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """Q (d, m), orthonormal, extended by the directions of ``keys`` (d, r) it does not span yet."""
    q = q.double()
    return torch.cat([q, new_directions(q.T.contiguous(), keys, tol).T], dim=1)


class KeyBasis:
    """An orthonormal basis grown block by block: Q^T's rows in a buffer that doubles when full,
    so that an extension costs O(d q r), not a copy of Q. The rows in use are always one
    contiguous (q, d) block whatever the buffer's size, so the arithmetic, and the bits, of a
    fold do not depend on how it was grown."""

    def __init__(self, preserved: torch.Tensor, spare: int = 64) -> None:
        m, d = int(preserved.shape[1]), int(preserved.shape[0])
        self._rows = torch.empty(m + spare, d, dtype=torch.float64, device=preserved.device)
        self._rows[:m] = preserved.double().T
        self.size = m

    @property
    def q(self) -> torch.Tensor:
        """Q (d, q): a view of the rows in use."""
        return self._rows[: self.size].T

    def extend(self, keys: torch.Tensor, tol: float = 1e-9) -> None:
        new = new_directions(self._rows[: self.size], keys, tol)
        j = int(new.shape[0])
        if self.size + j > self._rows.shape[0]:
            old = self._rows
            rows = torch.empty(2 * (self.size + j), old.shape[1], dtype=old.dtype, device=old.device)
            rows[: self.size] = self._rows[: self.size]
            self._rows = rows
        self._rows[self.size : self.size + j] = new
        self.size += j


def fold_keys(preserved: torch.Tensor, blocks: Sequence[KeyBlock], tol: float = 1e-9) -> KeyBasis:
    """The preserved basis extended by every block's keys, in order."""
    basis = KeyBasis(preserved)
    for _, k in blocks:
        basis.extend(k, tol)
    return basis


class BasisChain:
    """The last basis folded from edits' key blocks, oldest first, onto a preserved basis.

    The next projected edit on a matrix sees the same blocks plus one, so it extends the memo by
    one block (O(d q r)) instead of folding every earlier edit again. Folding is one
    deterministic sequence of steps either way, so a memo hit and a fresh fold give the same
    bits; a history that is not an extension of the memo's (a revert) is folded from scratch.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._preserved: torch.Tensor | None = None
        self._ids: tuple[str, ...] = ()
        self._basis: KeyBasis | None = None

    def basis(self, preserved: torch.Tensor, blocks: Sequence[KeyBlock], tol: float = 1e-9) -> torch.Tensor:
        """Q (d, q) of ``fold_keys(preserved, blocks, tol)``."""
        ids = tuple(edit_id for edit_id, _ in blocks)
        preserved = preserved.double()
        with self._lock:
            memo = self._basis
            if (
                memo is None
                or self._preserved is None
                or ids[: len(self._ids)] != self._ids
                or self._preserved.shape != preserved.shape
                or not torch.equal(self._preserved, preserved)
            ):
                memo, start = KeyBasis(preserved), 0
            else:
                start = len(self._ids)
            for _, k in blocks[start:]:
                memo.extend(k, tol)
            self._preserved, self._ids, self._basis = preserved, ids, memo
            return memo.q


def prior_width(prior: PriorKeys | None) -> int:
    """How many earlier keys ``prior`` holds."""
    if prior is None:
        return 0
    if isinstance(prior, torch.Tensor):
        return int(prior.shape[1]) if prior.numel() else 0
    return sum(int(k.shape[1]) for _, k in prior)


def prior_matrix(prior: PriorKeys | None) -> torch.Tensor | None:
    """``prior`` as one (in, n) matrix, oldest first (None when empty)."""
    if prior is None or prior_width(prior) == 0:
        return None
    if isinstance(prior, torch.Tensor):
        return prior
    return torch.cat([k for _, k in prior], dim=1)


def projector(
    preserved: torch.Tensor,
    prior_keys: PriorKeys | None = None,
    *,
    hard: bool = True,
    tol: float = 1e-9,
    chain: BasisChain | None = None,
) -> Projector:
    """P = I - Q Q^T with Q an orthonormal basis of the preserved span, and with ``hard`` also of
    the earlier edits' keys ``prior_keys``: one (d, n) block, or one block per edit, folded in
    order (``extend_basis``; ``chain`` remembers the last fold, see ``BasisChain``).

    Key directions within ``tol`` (relative to the block's longest key) of the span already
    preserved add nothing.
    """
    q = preserved.double()
    if not hard or prior_width(prior_keys) == 0:
        return Projector(q)
    if isinstance(prior_keys, torch.Tensor):
        return Projector(extend_basis(q, prior_keys, tol))
    if chain is not None:
        return Projector(chain.basis(q, prior_keys, tol))
    return Projector(fold_keys(q, prior_keys, tol).q)
