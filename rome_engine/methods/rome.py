"""ROME as one of the methods: its rank-one edit as a ``MethodResult``.

This is the one place that reads ROME's ``EditResult`` (``rome/compute.py``):
``rome_result`` is the adapter, so a change of that record touches one function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from ..errors import InvalidRequest
from ..loading import LoadedModel
from ..rome.cache import ProgressFn, RomeCache
from ..rome.compute import EditResult, compute_edit
from ..rome.request import EditRequest
from .result import LayerInfo, MethodResult, RequestInfo


def compute_rome(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    cache: RomeCache,
    *,
    overrides: Mapping[str, float] | None = None,
    progress: ProgressFn | None = None,
) -> MethodResult:
    """ROME's edit of one fact (``overrides`` join the request's own hparams)."""
    if len(requests) != 1:
        raise InvalidRequest(f"rome edits one fact at a time, got {len(requests)}: use memit for a batch")
    request = requests[0]
    if overrides:
        request = dataclasses.replace(request, hparams={**request.hparams, **overrides})
    return rome_result(compute_edit(loaded, request, cache, progress=progress))


def rome_result(edit: EditResult) -> MethodResult:
    """The adapter: ROME's one rank-one factor, its key k* (in, 1) as the edit key."""
    (factor,) = edit.factors
    u = factor.u[:, 0]  # v* - W k*
    info = RequestInfo(edit.request, edit.v_target_prob, edit.v_steps, float(u.norm()), float((edit.value - u).norm()))
    layer = LayerInfo(edit.layer, factor.param, float(u.norm()), factor.norm, 1.0)
    return MethodResult(
        method="rome",
        factors=(factor,),
        keys={factor.param: edit.key.float().unsqueeze(1)},
        layers=(edit.layer,),
        hparams=edit.hparams,
        cov_from_cache=edit.cov_from_cache,
        requests=(info,),
        layer_info=(layer,),
        compute_seconds=edit.compute_seconds,
    )
