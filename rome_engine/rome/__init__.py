"""ROME: rank-one model editing (Meng et al. 2022, arXiv 2202.05262), with the r-ROME key fix.

Public names:
    EditRequest                      - the fact to rewrite (validated, normalised)
    RomeHParams, hparams_for         - typed hyperparameters, defaults per family / tuned per model
    RomeCache                        - the cache folder + in-memory caches (prefixes, text sample, C)
    compute_edit(loaded, request, cache, *, progress=None) -> EditResult
    EditResult                       - the factor (u, v: see rome_engine.delta), k*, v*, timings
    layer_covariance, context_templates, compute_key, right_vector, compute_delta - the steps

    cache = RomeCache(default_cache_dir())
    result = compute_edit(loaded, EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome"), cache)
    LayerWeights(loaded).materialize_factors(result.factors)   # applying is rome_engine.layers'
"""

from .cache import ProgressFn, RomeCache
from .compute import EditResult, compute_edit, resolve_layer
from .compute_u import compute_key, right_vector
from .compute_v import DeltaResult, compute_delta
from .context import context_templates
from .covariance import layer_covariance
from .hparams import RomeHParams, hparams_for
from .request import EditRequest

__all__ = [
    "DeltaResult",
    "EditRequest",
    "EditResult",
    "ProgressFn",
    "RomeCache",
    "RomeHParams",
    "compute_delta",
    "compute_edit",
    "compute_key",
    "context_templates",
    "hparams_for",
    "layer_covariance",
    "resolve_layer",
    "right_vector",
]
