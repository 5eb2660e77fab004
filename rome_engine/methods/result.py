"""What an editing method returns: low-rank factors per touched matrix, the edit keys, and how it went.

Every method's update of a matrix W (taken as (out, in), whatever its
storage) is a sum of outer products

    Delta W = u @ v.T,    u: (out, r) float32 (the output side),  v: (in, r) float32 (the input side)

so one stored layer can hold ROME's rank one, MEMIT's rank r for a batch of
r facts, and a truncated SVD of a fine-tuning change alike. ``keys[param]``
holds the edit keys k* (in, r) the update was written at; a later projected
edit protects them (see ``projection.py``).

    result = compute_memit(loaded, requests, cache)
    for f in result.factors:
        w = loaded.spec.as_out_in(loaded.model.get_parameter(f.param))   # (out, in)
        w_new = w + f.delta()
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..delta import LowRankFactor
from ..rome.hparams import RomeHParams
from ..rome.request import EditRequest
from .hparams import FtHParams, MemitHParams

MethodHParams = MemitHParams | FtHParams | RomeHParams


@dataclass(frozen=True)
class RequestInfo:
    """How one fact of the batch went inside the method (the caller measures probabilities itself)."""

    request: EditRequest
    target_prob: float  # mean P(target) over the context prompts at the end of the optimisation
    steps: int  # optimiser steps taken
    delta_norm: float  # ||z - h|| (MEMIT: the residual's change at the last layer); ||Delta W||_F for FT
    base_norm: float  # ||h||: the residual (MEMIT) or ||W||_F (FT) the change is measured against


@dataclass(frozen=True)
class LayerInfo:
    """One touched matrix."""

    layer: int
    param: str
    residual_norm: float  # mean over the batch of ||z - h|| at the last layer before this layer's update
    update_norm: float  # ||u v^T||_F
    written: float  # mean over the batch of the share of the residual written here: (v^T k) diagonal
    free_dims: int | None = None  # projected mode: dimensions the update may still write along
    truncation_error: float = 0.0  # FT: ||Delta - u v^T||_F / ||Delta||_F of the stored rank


@dataclass(frozen=True, eq=False)
class MethodResult:
    """An edit computed by one method; nothing of it has been applied."""

    method: str  # "rome", "memit", "projected", "ft", "gated"
    factors: tuple[LowRankFactor, ...]  # one per touched matrix, lowest layer first
    keys: Mapping[str, torch.Tensor]  # param -> (in, r) float32: the keys the update was written at
    layers: tuple[int, ...]
    hparams: MethodHParams  # as used (layers resolved)
    cov_from_cache: bool  # every C (and eigenbasis) came from memory or disk
    requests: tuple[RequestInfo, ...]
    layer_info: tuple[LayerInfo, ...]
    compute_seconds: float

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(f.param for f in self.factors)

    def factor(self, param: str) -> LowRankFactor:
        for f in self.factors:
            if f.param == param:
                return f
        raise LookupError(param)
