"""ROME as one of the methods: its rank-one edit as a ``MethodResult``.

This is the one place that reads ROME's ``EditResult`` (``rome/apply.py``):
``rome_result`` is the adapter, so a change of that record touches one function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from ..errors import InvalidRequest
from ..loading import LoadedModel
from ..rome.apply import EditResult, compute_edit
from ..rome.cache import ProgressFn, RomeCache
from ..rome.request import EditRequest
from .result import LayerInfo, LowRankFactor, MethodResult, RequestInfo


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
    """The adapter: Delta W = left right^T as factors u = left (out, 1), v = right (in, 1); keys = k* (in, 1)."""
    factor = LowRankFactor(edit.param_name, edit.left.float().unsqueeze(1), edit.right.float().unsqueeze(1))
    info = RequestInfo(edit.request, edit.v_target_prob, edit.v_steps, float(edit.left.norm()),
                       float((edit.value - edit.left).norm()))  # fmt: skip
    layer = LayerInfo(edit.layer, edit.param_name, float(edit.left.norm()), edit.update_norm, 1.0)
    return MethodResult(
        method="rome",
        factors=(factor,),
        keys={edit.param_name: edit.key.float().unsqueeze(1)},
        layers=(edit.layer,),
        hparams=edit.hparams,
        cov_from_cache=edit.cov_from_cache,
        requests=(info,),
        layer_info=(layer,),
        compute_seconds=edit.compute_seconds,
    )
