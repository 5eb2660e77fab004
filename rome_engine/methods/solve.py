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
"""

from __future__ import annotations

import torch

from .projection import Projector


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u (out, r), v (in, r)) float32 of Delta^T = (P M + alpha I)^-1 P K R^T, M = K K^T (+ ``prior_gram``).

    Without ``prior_gram`` (the hard mode) M = K K^T has rank r, and the push-through identity
    (alpha I + A B)^-1 A = A (alpha I + B A)^-1 with A = P K, B = K^T gives

        v = P K (alpha I_r + K^T P K)^-1,

    an r x r solve instead of a d x d one (and no dense P). With ``prior_gram`` (the soft mode)
    the d x d system is solved as written.
    """
    pk = proj.apply(keys)  # (in, r) P K
    k = keys.double().to(pk.device)
    if prior_gram is None:
        r = k.shape[1]
        small = alpha * torch.eye(r, dtype=pk.dtype, device=pk.device) + k.T @ pk  # (r, r), symmetric
        v = torch.linalg.solve(small, pk.T).T  # (in, r)
        return resid.float().cpu(), v.float().cpu()
    p = proj.dense()
    m = k @ k.T + prior_gram.double().to(p.device)  # (in, in)
    eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    v = torch.linalg.solve(p @ m + alpha * eye, pk)  # (in, r)
    return resid.float().cpu(), v.float().cpu()


def written_share(v: torch.Tensor, keys: torch.Tensor) -> float:
    """Mean of diag(v^T K): the share of each fact's residual the layer writes at its own key (1 = all)."""
    return float(torch.diagonal(v.double().T @ keys.double().to(v.device)).mean())
