"""Editing methods whose updates accumulate: MEMIT, the null-space projected mode, gated, FT-L, and ROME.

Every method computes (never applies) low-rank factors per touched matrix,
Delta W = u @ v.T in (out, in) layout, plus the keys it wrote at.

Public names:
    METHODS                                  - ("rome", "memit", "projected", "ft", "gated")
    compute_method(method, loaded, requests, cache, *, prior_keys=None, overrides=None, progress=None)
                                             -> MethodResult: the dispatcher
    compute_memit(loaded, requests, cache, *, overrides=None, progress=None) -> MethodResult
    compute_projected(loaded, requests, cache, *, prior_keys=None, overrides=None, progress=None) -> MethodResult
    compute_gated(loaded, requests, cache, *, prior_keys=None, overrides=None, progress=None) -> MethodResult
    compute_ft(loaded, requests, cache, *, overrides=None, progress=None) -> MethodResult
    rome_result(edit) -> MethodResult        - a ROME ``EditResult`` as a rank-one MethodResult
    LowRankFactor, MethodResult, RequestInfo, LayerInfo - the result types
    MemitHParams, FtHParams, memit_hparams_for, ft_hparams_for - typed hyperparameters
    default_method(loaded)                   - "gated" (embedded model), "projected" (paper ranges), else "rome"
    layer_eigenbasis, preserved_basis, projector - the projected mode's P

    result = compute_method("memit", loaded, [req1, req2, req3], cache)
    result.factors[0].u.shape      # (out, 3)
    result.keys[result.factors[0].param].shape   # (in, 3)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..delta import LowRankFactor
from ..errors import InvalidRequest
from ..loading import LoadedModel
from ..records import METHODS
from ..rome.cache import ProgressFn, RomeCache
from ..rome.hparams import RomeHParams, hparams_for
from ..rome.request import EditRequest
from .ft import compute_ft
from .hparams import (
    FtHParams,
    MemitHParams,
    default_method,
    ft_hparams_for,
    gated_hparams_for,
    memit_hparams_for,
    method_hparams_for,
)
from .memit import compute_gated, compute_memit, compute_projected
from .projection import PriorKeys, layer_eigenbasis, preserved_basis, projector
from .result import LayerInfo, MethodResult, RequestInfo
from .rome import compute_rome, rome_result


def compute_method(
    method: str,
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    cache: RomeCache,
    *,
    prior_keys: Mapping[str, PriorKeys] | None = None,
    overrides: Mapping[str, float] | None = None,
    progress: ProgressFn | None = None,
) -> MethodResult:
    """The edit of ``requests`` by ``method``; ``prior_keys`` only matter to "projected" and "gated"."""
    if method == "memit":
        return compute_memit(loaded, requests, cache, overrides=overrides, progress=progress)
    if method == "projected":
        return compute_projected(loaded, requests, cache, prior_keys=prior_keys, overrides=overrides, progress=progress)
    if method == "ft":
        return compute_ft(loaded, requests, cache, overrides=overrides, progress=progress)
    if method == "gated":
        return compute_gated(loaded, requests, cache, prior_keys=prior_keys, overrides=overrides, progress=progress)
    if method == "rome":
        return compute_rome(loaded, requests, cache, overrides=overrides, progress=progress)
    raise InvalidRequest(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")


def work_hparams(method: str, loaded: LoadedModel, overrides: Mapping[str, float]) -> RomeHParams:
    """``overrides`` checked by ``method``'s own hyperparameters (InvalidRequest naming an unknown
    name or a value out of range), as the ROME hyperparameters that size its work: the prefixes,
    C's sample and the value optimisation (admission's memory estimate reads these)."""
    if method in ("memit", "projected", "gated"):
        return method_hparams_for(method, loaded).with_overrides(overrides).z_hparams(0)
    if method == "ft":
        ft_hparams_for(loaded).with_overrides(overrides)
        return hparams_for(loaded)
    if method == "rome":
        return hparams_for(loaded).with_overrides(overrides)
    raise InvalidRequest(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")


__all__ = [
    "METHODS",
    "FtHParams",
    "LayerInfo",
    "LowRankFactor",
    "MemitHParams",
    "MethodResult",
    "PriorKeys",
    "RequestInfo",
    "compute_ft",
    "compute_gated",
    "compute_memit",
    "compute_method",
    "compute_projected",
    "compute_rome",
    "default_method",
    "ft_hparams_for",
    "gated_hparams_for",
    "layer_eigenbasis",
    "memit_hparams_for",
    "preserved_basis",
    "projector",
    "rome_result",
    "work_hparams",
]
