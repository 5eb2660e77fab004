"""FT-L: constrained fine-tuning of one MLP output projection (Meng et al. 2022, the FT-L baseline).

Delta W (out, in) minimises the target's NLL on the edit prompts alone,

    loss = mean_facts( -mean_j log P(target_j | prompt + target_<j) ),

by Adam, and after every step each entry is clipped to
|Delta W_ij| <= norm_constraint (the paper's L-inf constraint). Delta W acts
at every position of the prompt through a hook (W' x = W x + Delta W x), so
the weights are never written.

The store holds factors only: Delta W's singular values are read, and
Delta W is returned whole when its rank is at most ``ft_max_rank``, else as
the truncated SVD of that rank, with the relative Frobenius error of the
truncation in ``LayerInfo.truncation_error``. (Adam's per-entry step sizes
and the clipping make Delta W full-rank in general, though its gradient is
a sum of T outer products g_t x_t^T, so most of it sits in a few directions.)

    result = compute_ft(loaded, [request], cache)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence

import torch

from ..delta import LowRankFactor
from ..errors import InvalidRequest
from ..hooks import Trace, replay, run_until_stopped, stop_after
from ..layer_selection import select_edit_layer
from ..loading import LoadedModel
from ..rome.cache import ProgressFn, RomeCache
from ..rome.compute_u import compute_key
from ..rome.request import SLOT, EditRequest
from ..scoring import split_continuation
from .hparams import FtHParams, ft_hparams_for
from .result import LayerInfo, MethodResult, RequestInfo

log = logging.getLogger(__name__)


def compute_ft(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    cache: RomeCache,
    *,
    overrides: Mapping[str, float] | None = None,
    progress: ProgressFn | None = None,
) -> MethodResult:
    """FT-L's update of ``requests`` at one layer, as a factor of rank <= ft_max_rank. Weights unchanged."""
    t0 = time.perf_counter()
    hp = resolve_ft_hparams(loaded, requests, cache, overrides)
    assert hp.layer is not None
    delta, nll = finetune_delta(loaded, hp, requests, progress=progress)
    u, v, err = truncated_factor(delta, hp.ft_max_rank, hp.ft_rank_tol)
    param = loaded.spec.mlp_out_weight_name(hp.layer)
    factor = LowRankFactor(param, u, v)
    keys = torch.stack([compute_key(loaded, hp.layer, (SLOT,), r) for r in requests]).T.contiguous()  # (in, r)
    w_norm = float(loaded.model.get_parameter(param).float().norm())
    d_norm = float(delta.norm())
    infos = tuple(
        RequestInfo(r, math.exp(-n), nll.steps, d_norm, w_norm) for r, n in zip(requests, nll.per_fact, strict=True)
    )
    seconds = time.perf_counter() - t0
    log.info(
        "ft: %d fact(s) at layer %d in %.1f s, %d steps, P(target) %s, |Delta|_inf %.2e, rank %d (error %.3f)",
        len(requests), hp.layer, seconds, nll.steps, ", ".join(f"{x.target_prob:.2f}" for x in infos),
        float(delta.abs().max()), factor.rank, err,
    )  # fmt: skip
    info = LayerInfo(hp.layer, param, float("nan"), factor.norm, float("nan"), None, err)
    return MethodResult("ft", (factor,), {param: keys.float().cpu()}, (hp.layer,), hp, True, infos, (info,), seconds)


def resolve_ft_hparams(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    cache: RomeCache,
    overrides: Mapping[str, float] | None = None,
) -> FtHParams:
    """The model's FT-L defaults, the batch's layer, then ``overrides``; layer: the ROME layer if unset.

    The requests' ROME hparams do not apply to fine-tuning and are ignored; give FT's own as ``overrides``.
    """
    if not requests:
        raise InvalidRequest("no facts to edit")
    if len({r.layer for r in requests}) > 1:
        raise InvalidRequest("the facts of one batch must share their layer")
    merged: dict[str, float] = {} if requests[0].layer is None else {"layer": requests[0].layer}
    merged.update(overrides or {})
    hp = ft_hparams_for(loaded).with_overrides(merged)
    if hp.layer is None:
        hp = dataclasses.replace(hp, layer=select_edit_layer(loaded, cache_dir=cache.cache_dir))
    hp.check_layers(loaded.num_layers)
    return hp


@dataclasses.dataclass(frozen=True)
class FinetuneLoss:
    per_fact: tuple[float, ...]  # the final mean target NLL of each fact
    steps: int


def finetune_delta(
    loaded: LoadedModel, hp: FtHParams, requests: Sequence[EditRequest], *, progress: ProgressFn | None = None
) -> tuple[torch.Tensor, FinetuneLoss]:
    """Delta W (out, in) float32 after FT-L's constrained Adam steps, and the final losses."""
    assert hp.layer is not None
    spec, model, tok = loaded.spec, loaded.model, loaded.tokenizer
    name = spec.mlp_out_name(hp.layer)
    w = spec.as_out_in(model.get_parameter(spec.mlp_out_weight_name(hp.layer)))  # (out, in)

    # one right-padded row per fact: prompt + target minus its last token
    pairs = [split_continuation(tok, r.filled(), r.target) for r in requests]
    rows = [p + t[:-1] for p, t in pairs]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    t_rows, t_cols, t_ids = [], [], []
    for i, ((p, t), r) in enumerate(zip(pairs, rows, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        for j, tid in enumerate(t):  # target token j is predicted at position len(p) - 1 + j
            t_rows.append(i)
            t_cols.append(len(p) - 1 + j)
            t_ids.append(tid)
    dev = loaded.device
    inputs = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}
    rows_t, cols_t, ids_t = (torch.tensor(x, device=dev) for x in (t_rows, t_cols, t_ids))
    n_tok = torch.bincount(rows_t, minlength=len(rows)).float()  # (F,)

    lower: dict[str, object] = {}
    if hp.v_skip_lower and hp.layer > 0:  # the blocks below the layer do not depend on Delta W: run them once
        below = spec.block_name(hp.layer - 1)
        with torch.no_grad(), Trace(model, [below]) as tr, stop_after(model, below):
            run_until_stopped(model, **inputs)
        lower = {spec.block_name(i): tr[below].raw_output for i in range(hp.layer)}

    delta = torch.zeros(w.shape, dtype=torch.float32, device=dev, requires_grad=True)  # (out, in)
    opt = torch.optim.Adam([delta], lr=hp.ft_lr)

    def add_delta(_name: str, out: torch.Tensor) -> torch.Tensor:
        x = edit[name].input  # (B, T, in)
        return out + (x.float() @ delta.T).to(out.dtype)  # W' x = W x + Delta W x

    per_fact = torch.zeros(len(rows))
    steps = 0
    for step in range(hp.ft_num_steps + 1):
        with replay(model, lower), Trace(model, [name], capture_input=True, capture_output=False,
                                         edit_output=add_delta) as edit:  # fmt: skip
            logits = model(**inputs).logits  # (F, T, V)
        logp = torch.log_softmax(logits[rows_t, cols_t].float(), dim=-1)  # (M, V)
        tok_nll = -logp.gather(1, ids_t.unsqueeze(1)).squeeze(1)  # (M,)
        per_fact = torch.zeros(len(rows), device=dev).index_add(0, rows_t, tok_nll) / n_tok  # (F,)
        loss = per_fact.mean()
        log.debug("ft step %d: loss %.4f, |Delta|_inf %.2e", step, loss.item(), delta.detach().abs().max().item())
        if progress is not None:
            progress("finetune", step, hp.ft_num_steps)
        if loss.item() < hp.ft_stop_loss or step == hp.ft_num_steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        with torch.no_grad():  # |Delta W_ij| <= norm_constraint
            delta.clamp_(-hp.norm_constraint, hp.norm_constraint)
    return delta.detach().cpu(), FinetuneLoss(tuple(per_fact.detach().cpu().tolist()), steps)


def truncated_factor(delta: torch.Tensor, max_rank: int, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(u (out, r), v (in, r), relative error) with u v^T the best rank-r approximation of ``delta``
    (Eckart-Young: the r largest singular triplets, u = U_r S_r, v = V_r); r = the numerical rank
    (singular values above tol * sigma_1) capped at ``max_rank``; error = ||delta - u v^T||_F / ||delta||_F."""
    left, s, right_t = torch.linalg.svd(delta.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return torch.zeros(delta.shape[0], 1), torch.zeros(delta.shape[1], 1), 0.0
    rank = int((s > tol * s[0]).sum())
    r = max(1, min(rank, max_rank))
    # ||delta - D_r||_F^2 = sum of the dropped singular values squared
    err = math.sqrt(float((s[r:] ** 2).sum()) / float((s**2).sum()))
    return (left[:, :r] * s[:r]).float(), right_t[:r].T.float(), err
