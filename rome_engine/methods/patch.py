"""Run the model as if low-rank factors were applied, without writing its weights.

A hook on each touched projection adds Delta W x = (x @ v) @ u.T to its
output. It is a ``hooks.Trace``, so it acts only on forward passes of the
thread that installed it: generation streams served from other threads
meanwhile keep the live weights. MEMIT uses it to see its lower layers'
updates while it computes the higher layers' keys and residuals, and the
benchmarks measure P(target) through it.

    with low_rank_patch(loaded, result.factors):
        score_continuations(loaded, prompt, [target])

(``layers.rank_one_patch`` does the same for rank-one factors; when the
refactor's ``delta.py`` owns one hook for both, this module becomes a call to it.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..hooks import Trace
from ..loading import LoadedModel
from .result import LowRankFactor


def module_of(param: str) -> str:
    """``model.layers.4.mlp.down_proj.weight`` -> ``model.layers.4.mlp.down_proj``."""
    return param.removesuffix(".weight")


class low_rank_patch:  # used like a function in a with statement
    """W' x = W x + (x @ v) @ u.T on each factor's projection, on this thread only."""

    def __init__(self, loaded: LoadedModel, factors: Sequence[LowRankFactor]) -> None:
        by_module: dict[str, list[LowRankFactor]] = {}
        for f in factors:
            by_module.setdefault(module_of(f.param), []).append(f)
        device = loaded.device

        def add(name: str, out: torch.Tensor) -> torch.Tensor:
            x = self._trace[name].input  # (B, T, in), as the projection read it
            extra = sum(f.apply(x) for f in by_module[name])  # (B, T, out) float32
            return out + extra.to(out.dtype)

        for fs in by_module.values():  # the factors live where the model runs
            for i, f in enumerate(fs):
                fs[i] = LowRankFactor(f.param, f.u.float().to(device), f.v.float().to(device))
        self._trace = Trace(loaded.model, list(by_module), capture_input=True, capture_output=False,
                            edit_output=add)  # fmt: skip

    def __enter__(self) -> low_rank_patch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._trace.close()
