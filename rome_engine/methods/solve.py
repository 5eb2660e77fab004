"""The closed-form per-layer updates, in float64, as factors Delta = u @ v.T.

MEMIT (Meng et al. 2022b, eq. 14): with the layer's edit keys K (in, r), the
share of the residual this layer writes R (out, r) and C = E[k k^T],

    Delta = R K^T (lambda C + K K^T)^-1   =>   u = R,  v = (lambda C + K K^T)^-1 K

(the matrix is symmetric). Projected (AlphaEdit, Fang et al. 2025, eq. 8, with
its code's ridge): with P a projector onto the directions the update may
write from, and M = K K^T (+ K_p K_p^T, the earlier edits' keys, in the soft mode),

    Delta^T = (P M + alpha I)^-1 P K R^T   =>   u = R,  v = (P M + alpha I)^-1 P K.

Any key k with P k = 0 is left alone exactly: (P M + alpha I)^T k = M P k + alpha k = alpha k,
so v^T k = K^T P (M P + alpha I)^-1 k = K^T P k / alpha = 0.

With a C-weighted ridge (``null_cov_weight`` w > 0) the flat ridge alpha I becomes
alpha I + gamma P C P, gamma = w alpha / (tr C / d): among the directions P lets the update write
from, those ordinary text uses more cost more, as in MEMIT's lambda C. The hard mode's solve is then

    v = G^-1 P K (I_r + K^T P G^-1 P K)^-1,   G = gamma P C P + alpha I

(Woodbury on M = K K^T), with G^-1 applied by conjugate gradients: on P's range G's eigenvalues
lie in [alpha, alpha (1 + w lambda_max / mean)], so a few dozen steps reach rounding.

Gated (the ``gated`` method's key side, ``gated_column``): ROME's v = C^-1 k / (k^T C^-1 k) is the
v of least C-norm v^T C v with v . k = 1. Fitting the keys of every prompt the edit trained on,
K_o = [k_1 .. k_m] (the unprefixed prompt and each context prefix; k is their mean), asks v . K_o = 1;
sparing other keys K_s (earlier edits' keys it would respond to) adds v . K_s = 0. With
M = [K_o, K_s] and t = (1 .. 1, 0 .. 0) the least-C-norm solution is

    v = C^-1 M (M^T C^-1 M)^-1 t,   v^T C v = t^T (M^T C^-1 M)^-1 t
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import FailedPrecondition
from .projection import Projector

CG_TOLERANCE = 1e-6  # the largest relative residual of G^-1 P K the hard mode accepts
MAX_SPARED = 64  # other keys one gated column is kept silent on, at most
SPARE_ROUNDS = 4  # rounds of adding the keys the last solve still responds to
SAME_SUBJECT_COSINE = 0.95  # a key this close to the new one is the same subject: it cannot be spared
MAX_SPARE_GROWTH = 4.0  # sparing may make v's C-norm (v^T C v) at most this many times ROME's
MAX_FIT_GROWTH = 3.0  # fitting every prompt's key may make v's C-norm at most this many times the mean key's


CovSolve = Callable[[torch.Tensor], torch.Tensor]  # M (in, n) float64 -> C'^-1 M


def cov_solver(cov: torch.Tensor, shrinkage: float = 0.0) -> CovSolve:
    """M -> C'^-1 M with C' = ``shrunk_cov(cov, shrinkage)`` (as ``solve_cov`` solves it), C'
    factored once (Cholesky; a plain solve where C' is not positive definite in floating point)."""
    from ..rome.compute_u import shrunk_cov

    c = shrunk_cov(cov, shrinkage)
    chol, info = torch.linalg.cholesky_ex(c)
    if int(info) == 0:
        return lambda m: torch.cholesky_solve(m.to(c.device), chol)
    return lambda m: torch.linalg.solve(c, m.to(c.device))


@torch.no_grad()
def gated_column(
    cov: torch.Tensor | CovSolve,
    key: torch.Tensor,
    others: torch.Tensor | None,
    respond_below: float,
    shrinkage: float = 0.0,
    prompts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """v (in,) float32 with v . key = 1 and, where it can, v . k = 0 for the columns k of ``others``
    (in, n) at which it would respond above ``respond_below``; and how many keys it spares.

    ``prompts`` (in, m), the keys ``key`` is the mean of (column 0 the unprefixed prompt's): v . k = 1
    at each of them, so that the column answers in full on every prompt the edit trained on, not
    only on average. Where that grows v's C-norm past MAX_FIT_GROWTH times the mean key's (prefix
    keys that differ in directions ordinary text barely uses: the column would answer everything),
    v . k = 1 is asked at ``key`` and the unprefixed prompt's key only, and failing that at ``key``.

    Keys are added in up to SPARE_ROUNDS rounds (at most MAX_SPARED), the strongest responses first.
    Not spared: a key within cosine SAME_SUBJECT_COSINE of the own keys' mean (the same subject: an
    edit of it answers there too, as ROME's does), and keys whose constraint would grow v's C-norm
    (v^T C v, the response to ordinary text) past MAX_SPARE_GROWTH times the unspared v's.
    One own key and ``others`` None: ROME's v. ``cov``: C, or a ``cov_solver`` of it (``shrinkage``
    then unused) for a caller that solves several columns with one C."""
    k = key.double().reshape(-1, 1)
    cand = others.double().to(k.device) if others is not None and others.shape[1] else None
    if cand is not None:  # a key stored twice (two edits of one subject) is one constraint
        cand = torch.unique(cand, dim=1)
    cov_solve = cov_solver(cov.to(k.device), shrinkage) if isinstance(cov, torch.Tensor) else cov

    def least_norm(mat: torch.Tensor, m: int) -> tuple[torch.Tensor, float]:
        # v = C^-1 M (M^T C^-1 M)^-1 t, t = 1 on the first m columns (own keys), 0 on the rest
        cinv_m = cov_solve(mat).to(mat.device)  # (in, m + s)
        gram = mat.T @ cinv_m  # M^T C^-1 M, symmetric positive definite for independent keys
        t = torch.zeros(mat.shape[1], 1, dtype=torch.float64, device=mat.device)
        t[:m] = 1.0
        a = torch.linalg.solve(gram, t)
        return cinv_m @ a, float(t.T @ a)

    v, norm = least_norm(k, 1)
    own = k
    if prompts is not None and prompts.shape[1] > 1:
        p = prompts.double().to(k.device)
        for fit in (p, torch.cat([k, p[:, :1]], dim=1)):
            try:
                v_fit, fit_norm = least_norm(fit, fit.shape[1])
            except RuntimeError:  # singular: two identical prompt keys
                continue
            if fit_norm <= MAX_FIT_GROWTH * norm:  # (NaN fails too)
                v, norm, own = v_fit, fit_norm, fit
                break
    if cand is None:
        return v[:, 0].float(), 0
    base_norm = norm
    blocked = (cand.T @ k)[:, 0] / (cand.norm(dim=0) * k.norm()).clamp_min(1e-30) > SAME_SUBJECT_COSINE
    spared = torch.zeros(0, dtype=torch.long, device=cand.device)
    for _ in range(SPARE_ROUNDS):
        resp = (cand.T @ v)[:, 0]
        resp[blocked] = 0.0
        resp[spared] = 0.0
        hits = torch.nonzero(resp > respond_below).flatten()
        room = MAX_SPARED - len(spared)
        if not len(hits) or room <= 0:
            break
        hits = hits[torch.argsort(resp[hits], descending=True)][:room]
        trial = torch.cat([spared, hits])
        try:
            v_new, norm = least_norm(torch.cat([own, cand[:, trial]], dim=1), own.shape[1])
        except RuntimeError:  # singular: a key twice (two edits of one subject) or in the own keys' span
            break
        if not norm <= MAX_SPARE_GROWTH * base_norm:  # (NaN too) the keys are too close to k to spare
            break
        v, spared = v_new, trial
    return v[:, 0].float(), len(spared)


@dataclass(frozen=True, eq=False)
class CovRidge:
    """gamma C: the part of the projected mode's ridge that grows with ordinary text's use of a direction."""

    cov: torch.Tensor  # C (in, in)
    gamma: float


def memit_factor(
    resid: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor, lam: float, shrinkage: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u (out, r), v (in, r)) float32 of Delta = R K^T (lambda C' + K K^T)^-1.

    C' = (1 - a) C + a (tr C / d) I is C shrunk towards its mean eigenvalue (a = ``shrinkage``),
    with a relative ridge of 1e-8 so that a rank-deficient C (a few tokens in a test) still solves.
    """
    c = cov.double()
    d = c.shape[0]
    k = keys.double().to(c.device)  # (in, r)
    a = max(float(shrinkage), 0.0)
    eye = torch.eye(d, dtype=c.dtype, device=c.device)
    c = (1.0 - a) * c + (a + 1e-8) * (torch.trace(c) / d) * eye
    v = torch.linalg.solve(lam * c + k @ k.T, k)  # (in, r)
    return resid.float().cpu(), v.float().cpu()


def projected_factor(
    resid: torch.Tensor,
    keys: torch.Tensor,
    proj: Projector,
    alpha: float,
    prior_gram: torch.Tensor | None = None,
    cov_ridge: CovRidge | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u (out, r), v (in, r)) float32 of Delta^T = (P M + alpha I)^-1 P K R^T, M = K K^T (+ ``prior_gram``).

    Without ``prior_gram`` (the hard mode) M = K K^T has rank r, and the push-through identity
    (alpha I + A B)^-1 A = A (alpha I + B A)^-1 with A = P K, B = K^T gives

        v = P K (alpha I_r + K^T P K)^-1,

    an r x r solve instead of a d x d one (and no dense P). With ``prior_gram`` (the soft mode)
    the d x d system is solved as written. ``cov_ridge`` adds gamma P C to P M (module docstring).
    """
    pk = proj.apply(keys)  # (in, r) P K
    k = keys.double().to(pk.device)
    if prior_gram is None and cov_ridge is not None and cov_ridge.gamma > 0:
        c = cov_ridge.cov.double().to(pk.device)
        gamma = float(cov_ridge.gamma)

        def g(x: torch.Tensor) -> torch.Tensor:  # G x = gamma P C P x + alpha x
            return gamma * proj.apply(c @ proj.apply(x)) + alpha * x

        y, residual = conjugate_gradient(g, pk)
        if residual > CG_TOLERANCE:
            raise FailedPrecondition(
                f"the C-weighted solve did not converge (relative residual {residual:.1e} after 1000 conjugate-"
                f"gradient steps): null_cov_weight (gamma {gamma:.3g} against alpha {alpha:.3g}) makes it too "
                "ill-conditioned; use a smaller null_cov_weight (10 is MEMIT's weight) or nullspace_threshold"
            )
        y = proj.apply(y)  # G^-1 P K, kept exactly in P's range
        small = torch.eye(k.shape[1], dtype=pk.dtype, device=pk.device) + pk.T @ y  # (r, r), symmetric
        v = torch.linalg.solve(small, y.T).T
        return resid.float().cpu(), v.float().cpu()
    if prior_gram is None:
        r = k.shape[1]
        small = alpha * torch.eye(r, dtype=pk.dtype, device=pk.device) + k.T @ pk  # (r, r), symmetric
        v = torch.linalg.solve(small, pk.T).T  # (in, r)
        return resid.float().cpu(), v.float().cpu()
    p = proj.dense()
    m = k @ k.T + prior_gram.double().to(p.device)  # (in, in)
    if cov_ridge is not None and cov_ridge.gamma > 0:
        m = m + float(cov_ridge.gamma) * cov_ridge.cov.double().to(p.device)
    eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    v = torch.linalg.solve(p @ m + alpha * eye, pk)  # (in, r)
    return resid.float().cpu(), v.float().cpu()


def conjugate_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, tol: float = 1e-12, max_steps: int = 1000
) -> tuple[torch.Tensor, float]:
    """x with A x = b for a symmetric positive definite A given as ``apply``, column by column of b
    (d, r) at once, and the largest ||A x - b|| / ||b|| over the columns; stops when that is below
    ``tol``, or after ``max_steps`` (an ill-conditioned A: the caller decides)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(dim=0)  # (r,)
    stop = (tol**2) * rs
    for _ in range(max_steps):
        if bool((rs <= stop).all()):
            break
        ap = apply(p)
        step = rs / (p * ap).sum(dim=0).clamp(min=1e-300)
        x = x + step * p
        r = r - step * ap
        rs_new = (r * r).sum(dim=0)
        p = r + (rs_new / rs.clamp(min=1e-300)) * p
        rs = rs_new
    b2 = (b * b).sum(dim=0).clamp(min=1e-300)
    return x, float((rs / b2).max().sqrt())


def written_share(v: torch.Tensor, keys: torch.Tensor) -> float:
    """Mean of diag(v^T K): the share of each fact's residual the layer writes at its own key (1 = all)."""
    return float(torch.diagonal(v.double().T @ keys.double().to(v.device)).mean())
