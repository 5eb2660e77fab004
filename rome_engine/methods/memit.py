"""MEMIT (Meng et al. 2022b, arXiv 2210.07229) and the null-space projected mode on its layers.

For a batch of r facts and the layers l_1 < ... < l_L (MLP output projections):

1. z_j = h_j + delta_j: the residual at the last layer l_L, at fact j's last
   subject token, that makes the model say the target. delta_j is ROME's v*
   optimisation (``compute_v.compute_delta``) at l_L: adding delta to that
   layer's MLP output adds it to the block's output, the residual.
2. For each layer l_i, lowest first, *as if the lower layers' updates were
   applied* (``delta.as_if_applied``, a hook on this thread):
   K = the layer's keys of the r facts (in, r), averaged over the context prompts;
   R = (z - h(l_L)) / (L - i + 1): the residual still missing, spread over the remaining layers;
   Delta_i = R K^T (lambda C + K K^T)^-1                       (memit)
   Delta_i^T = (P (K K^T [+ K_p K_p^T]) + alpha I)^-1 P K R^T  (projected, see ``projection.py``)

The weights are never written: the result holds the factors (u = R, v) and
the keys, and the caller stores them.

    result = compute_memit(loaded, [req1, req2, req3], cache)                # rank-3 factors
    result = compute_projected(loaded, [req], cache, prior_keys=earlier)     # earlier: param -> (in, n)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from ..delta import CosineGate, LowRankFactor, as_if_applied
from ..errors import FailedPrecondition, InvalidRequest
from ..hooks import Trace, run_until_stopped, stop_after
from ..layer_selection import select_edit_layer
from ..loading import LoadedModel
from ..rome.cache import ProgressFn, RomeCache
from ..rome.compute_u import compute_keys, mean_key, prompt_rows
from ..rome.compute_v import compute_delta
from ..rome.context import context_templates
from ..rome.covariance import layer_covariance
from ..rome.hparams import hparams_for
from ..rome.request import SLOT, EditRequest
from .hparams import MemitHParams, method_hparams_for
from .projection import (
    BasisChain,
    Eigenbasis,
    PriorKeys,
    layer_eigenbasis,
    preserved_basis,
    prior_matrix,
    prior_width,
    projector,
)
from .result import LayerInfo, MethodResult, RequestInfo
from .solve import CovRidge, cov_solver, gated_column, memit_factor, projected_factor, written_share

log = logging.getLogger(__name__)

# (R (out, r), K (in, r), each fact's keys at every prompt (m, in)) -> (u, v)
Factor = tuple[torch.Tensor, torch.Tensor]  # (u (out, r), v (in, r))
Solver = Callable[[torch.Tensor, torch.Tensor, Sequence[torch.Tensor]], Factor]


def compute_memit(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    cache: RomeCache,
    *,
    overrides: Mapping[str, float] | None = None,
    progress: ProgressFn | None = None,
) -> MethodResult:
    """MEMIT's update of ``requests`` (one factor of rank len(requests) per layer). Weights unchanged."""
    return _compute(loaded, requests, cache, "memit", None, overrides, progress)


def compute_projected(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    cache: RomeCache,
    *,
    prior_keys: Mapping[str, PriorKeys] | None = None,
    overrides: Mapping[str, float] | None = None,
    progress: ProgressFn | None = None,
) -> MethodResult:
    """The null-space projected update on MEMIT's layers. ``prior_keys[param]``: the keys of the
    earlier edits still active on that matrix (derived from the active layers by the caller), as
    one (in, n) matrix or as (edit id, keys) blocks, oldest first; blocks let the basis of the
    earlier keys be extended from the last edit's (``projection.BasisChain``)."""
    return _compute(loaded, requests, cache, "projected", prior_keys or {}, overrides, progress)


def compute_gated(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    cache: RomeCache,
    *,
    prior_keys: Mapping[str, PriorKeys] | None = None,
    overrides: Mapping[str, float] | None = None,
    progress: ProgressFn | None = None,
) -> MethodResult:
    """The gated update of ``requests`` at one layer (the model's ROME layer): per fact j, ROME's
    rank-one column u_j = z_j - h_j with v_j the least-C-norm vector answering 1 at the key of every
    prompt z_j was trained on (``gate_fit_prompts``; 0: ROME's v_j = C^-1 k_j / (k_j^T C^-1 k_j)),
    served as a gated factor (``delta``): it adds u_j s only where s = v_j . x > ``gate_threshold``,
    so inputs the edit was not written for get exactly nothing. With ``gate_spare`` (the default)
    v_j is also silent on the ``prior_keys`` (the active edits' keys, as for the projected mode) it
    would respond to: a twin subject's edit does not overwrite an earlier one. ``gate_min_cosine``
    adds ``delta.CosineGate``. Weights unchanged."""
    return _compute(loaded, requests, cache, "gated", prior_keys or {}, overrides, progress)


def resolve_hparams(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    cache: RomeCache,
    overrides: Mapping[str, float] | None = None,
    method: str = "memit",
) -> MemitHParams:
    """The model's defaults, the requests' own hparams and layer (the same for every request of a
    batch), then ``overrides``; ``layer`` resolved to the model's ROME layer when nothing names it."""
    if not requests:
        raise InvalidRequest("no facts to edit")
    first = requests[0]
    for r in requests[1:]:
        if dict(r.hparams) != dict(first.hparams) or r.layer != first.layer:
            raise InvalidRequest("the facts of one batch must share their hparams and layer")
    merged: dict[str, float] = dict(first.hparams)
    if first.layer is not None:
        merged["layer"] = first.layer
    merged.update(overrides or {})
    hp = method_hparams_for(method, loaded).with_overrides(merged)
    if hp.layer is None:
        rome_layer = hparams_for(loaded).layer
        if rome_layer is None:
            rome_layer = select_edit_layer(loaded, cache_dir=cache.cache_dir)
        hp = dataclasses.replace(hp, layer=min(rome_layer + hp.layer_offset, loaded.num_layers - 1))
        hp = dataclasses.replace(hp, layer=max(hp.layer, hp.n_layers - 1))
    hp.check_layers(loaded.num_layers)
    return hp


@torch.no_grad()
def residuals_at_subject(loaded: LoadedModel, layer: int, requests: Sequence[EditRequest]) -> torch.Tensor:
    """h: the output of block ``layer`` at each request's last subject token, unprefixed prompt: (r, D) float32."""
    rows = [prompt_rows(loaded.tokenizer, (SLOT,), req)[0] for req in requests]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), loaded.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (r, _) in enumerate(rows):  # right padding: positions stay 0..len-1
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    name = loaded.spec.block_name(layer)
    with Trace(loaded.model, [name]) as tr, stop_after(loaded.model, name):
        run_until_stopped(loaded.model, input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device))
    out = tr[name].output  # (r, T, D)
    at = torch.tensor([j for _, j in rows], device=out.device)
    return out[torch.arange(len(rows), device=out.device), at].float()  # (r, D)


def _compute(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    cache: RomeCache,
    method: str,
    prior_keys: Mapping[str, PriorKeys] | None,
    overrides: Mapping[str, float] | None,
    progress: ProgressFn | None,
) -> MethodResult:
    t0 = time.perf_counter()
    hp = resolve_hparams(loaded, requests, cache, overrides, method)
    layers = hp.layer_range()
    last = layers[-1]
    zhp = hp.z_hparams(last)
    spec = loaded.spec

    def report(stage: str, done: int = 0, total: int = 1) -> None:
        if progress is not None:
            progress(stage, done, total)

    report("prefixes")
    templates = context_templates(loaded, zhp, cache, progress=progress)

    # per layer: C (memit) or P (projected); all cached per model
    from_cache = True
    solvers: list[tuple[Solver, int | None]] = []
    gate_scales: list[torch.Tensor | None] = []  # the gated method's diag(C)^-1/2, with gate_min_cosine
    for layer in layers:
        param = spec.mlp_out_weight_name(layer)
        if method in ("memit", "gated"):
            cov, cached = layer_covariance(loaded, layer, zhp, cache, progress=progress)
            gate_scales.append(cosine_scale(cov) if method == "gated" and hp.gate_min_cosine > 0 else None)
            prior = prior_keys.get(param) if prior_keys else None
            solvers.append(_memit_solver(cov, hp) if method == "memit" else _gated_solver(cov, hp, prior))
        else:
            eig, cached = layer_eigenbasis(loaded, layer, zhp, cache, progress=progress)
            prior = prior_keys.get(param) if prior_keys else None
            chain, _ = cache.get_or_compute(
                f"key-basis:{cache.model_key(loaded)}:{param}:{hp.nullspace_threshold}:{hp.nullspace_relative}",
                BasisChain,
            )
            cov = layer_covariance(loaded, layer, zhp, cache, progress=progress)[0] if hp.null_cov_weight > 0 else None
            solvers.append(_projected_solver(eig, hp, prior, param, chain, cov))
            log.debug("layer %d: %d free dimensions", layer, solvers[-1][1])
        from_cache = from_cache and cached

    # 1. z at the last layer, one optimisation per fact (ROME's v* with the residual's norm as the scale)
    h0 = residuals_at_subject(loaded, last, requests)  # (r, D)
    n_steps = zhp.v_num_grad_steps + 1
    infos, deltas = [], []
    for j, req in enumerate(requests):

        def z_progress(_stage: str, step: int, _total: int, j: int = j) -> None:
            report("optimize_z", j * n_steps + step, len(requests) * n_steps)

        d = compute_delta(loaded, last, zhp, templates, req, h0[j], None, progress=z_progress)
        deltas.append(d.delta.float().to(h0.device))
        infos.append(RequestInfo(req, d.target_prob, d.steps, float(d.delta.norm()), d.base_norm))
    z = h0 + torch.stack(deltas)  # (r, D)

    # 2. layer by layer, lowest first, each seeing the updates below it
    factors: list[LowRankFactor] = []
    keys: dict[str, torch.Tensor] = {}
    layer_info: list[LayerInfo] = []
    for i, layer in enumerate(layers):
        report("solve", i, len(layers))
        param = spec.mlp_out_weight_name(layer)
        with as_if_applied(loaded, factors):
            per_prompt = [compute_keys(loaded, layer, templates, r) for r in requests]  # (m, in) each
            k = torch.stack([mean_key(p, hp.k_identity_weight) for p in per_prompt])
            h = residuals_at_subject(loaded, last, requests)
        k = k.T.contiguous()  # (in, r)
        missing = (z - h).T  # (D, r): what the last layer's residual still lacks
        resid = missing / (len(layers) - i)  # spread over this and the remaining layers
        solve, free = solvers[i]
        u, v = solve(resid, k, per_prompt)
        scale = gate_scales[i] if gate_scales else None
        cosine_gate = CosineGate(scale, k.float().cpu(), hp.gate_min_cosine) if scale is not None else None
        factor = LowRankFactor(param, u, v, hp.gate_threshold if method == "gated" else None, cosine_gate)
        factors.append(factor)
        keys[param] = k.float().cpu()
        layer_info.append(
            LayerInfo(layer, param, float(missing.norm(dim=0).mean()), factor.norm, written_share(v, k), free)
        )
    report("solve", len(layers), len(layers))

    seconds = time.perf_counter() - t0
    log.info(
        "%s: %d fact(s) into layers %d..%d in %.1f s; z P(target) %s; residual share written %s",
        method, len(requests), layers[0], layers[-1], seconds,
        ", ".join(f"{x.target_prob:.2f}" for x in infos), ", ".join(f"{x.written:.2f}" for x in layer_info),
    )  # fmt: skip
    return MethodResult(
        method=method,
        factors=tuple(factors),
        keys=keys,
        layers=layers,
        hparams=hp,
        cov_from_cache=from_cache,
        requests=tuple(infos),
        layer_info=tuple(layer_info),
        compute_seconds=seconds,
    )


def cosine_scale(cov: torch.Tensor) -> torch.Tensor:
    """diag(C)^-1/2 (in,) float32 on the CPU: the per-dimension scale of a cosine gate (``delta.CosineGate``)."""
    return torch.diagonal(cov).double().clamp_min(1e-30).rsqrt().float().cpu()


def _memit_solver(cov: torch.Tensor, hp: MemitHParams) -> tuple[Solver, None]:
    def solve(resid: torch.Tensor, k: torch.Tensor, _prompts: Sequence[torch.Tensor]) -> Factor:
        return memit_factor(resid, k, cov, hp.mom2_update_weight, hp.cov_shrinkage)

    return solve, None


@torch.no_grad()
def _gated_solver(cov: torch.Tensor, hp: MemitHParams, prior: PriorKeys | None) -> tuple[Solver, None]:
    earlier = prior_matrix(prior) if hp.gate_spare else None
    cov_solve = cov_solver(cov, hp.cov_shrinkage)  # C factored once for all the batch's columns

    def solve(resid: torch.Tensor, k: torch.Tensor, prompts: Sequence[torch.Tensor]) -> Factor:
        # each fact its own column: v_j . k = 1 at its mean key k_j, or (gate_fit_prompts) at the key of
        # every prompt z was trained on, so that the column answers in full on each of them; it writes
        # all of its residual u_j = R_j there (the gate keeps other inputs out). With gate_spare it is
        # also silent on the earlier edits' keys and the batch's other keys it would respond to above
        # half the threshold (solve.gated_column)
        cols = []
        for j in range(k.shape[1]):
            others = [x for x in (earlier, k[:, :j], k[:, j + 1 :]) if x is not None and x.shape[1]]
            cand = torch.cat([x.to(k.device).float() for x in others], dim=1) if hp.gate_spare and others else None
            fit = prompts[j].T.to(k.device) if hp.gate_fit_prompts else None
            v, spared = gated_column(cov_solve, k[:, j], cand, hp.gate_threshold / 2, prompts=fit)
            if spared:
                log.info("gated column %d spares %d other key(s)", j, spared)
            cols.append(v)
        return resid.float(), torch.stack(cols, dim=1).to(resid.device)

    return solve, None


def _projected_solver(
    eig: Eigenbasis,
    hp: MemitHParams,
    prior: PriorKeys | None,
    param: str,
    chain: BasisChain | None = None,
    cov: torch.Tensor | None = None,
) -> tuple[Solver, int]:
    keep = preserved_basis(eig, hp.nullspace_threshold, bool(hp.nullspace_relative))
    proj = projector(keep, prior, hard=bool(hp.hard_prior), chain=chain)
    free = proj.free
    alpha = hp.l2 * float(eig.values.sum())  # l2 * tr(C) = l2 * E||k||^2
    prior_gram = None
    prior_k = None if hp.hard_prior else prior_matrix(prior)
    if prior_k is not None:
        prior_gram = prior_k.double() @ prior_k.double().T  # K_p K_p^T: (in, in)

    if free <= 0:  # refused before any optimisation runs
        raise FailedPrecondition(
            f"{param} has no free direction left: its {proj.dim} input dimensions are all preserved "
            f"({keep.shape[1]} eigenvectors of C and {prior_width(prior)} earlier edit keys)"
        )

    cov_ridge = None
    if cov is not None and hp.null_cov_weight > 0:
        # gamma = w alpha / (tr C / d): a direction at the mean eigenvalue costs (1 + w) alpha
        cov_ridge = CovRidge(cov, hp.null_cov_weight * alpha / max(eig.mean, 1e-30))

    def solve(resid: torch.Tensor, k: torch.Tensor, _prompts: Sequence[torch.Tensor]) -> Factor:
        return projected_factor(resid, k, proj, alpha, prior_gram, cov_ridge)

    return solve, free
