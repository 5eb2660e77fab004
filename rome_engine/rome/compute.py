"""Computing one ROME edit: the rank-one factor of the edited projection.

The update of the edited projection W (as (out, in)) is rank one
(Meng et al. 2022, eq. 2, with the r-ROME key fix):

    W' = W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*)
       = W + outer(u, v),  u = v* - W k*,  v = C^-1 k* / (k*^T C^-1 k*)

so W' k* = v* exactly and W' k = W k for every k with (C^-1 k*)^T k = 0
(u, v as ``rome_engine.delta`` states the convention).

    result = compute_edit(loaded, EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome"), cache)
    result.factors      # (LowRankFactor(param, u (out, 1), v (in, 1)),)

``compute_edit`` only computes: the model ends as it began. Applying the
result is ``layers.LayerWeights``'s (serving and evaluation alike); measuring
it before it is stored is ``editing.fact_probabilities``'s, through
``delta.as_if_applied``. ``methods.compute_method`` runs it as one of the
editing methods (``methods/rome.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from ..bounds import clip
from ..delta import LowRankFactor
from ..errors import InvalidRequest
from ..generation import SamplingParams, generate_tokens
from ..layer_selection import select_edit_layer
from ..loading import LoadedModel
from ..scoring import encode_prompt, split_continuation
from .cache import ProgressFn, RomeCache
from .compute_u import compute_key, right_vector
from .compute_v import compute_delta
from .context import context_templates
from .covariance import layer_covariance
from .hparams import RomeHParams, hparams_for
from .request import EditRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditResult:
    """One computed edit: its factors (one per touched matrix) and how they were found."""

    factors: tuple[LowRankFactor, ...]  # ROME: one, on the MLP output projection of ``layer``
    layer: int
    request: EditRequest  # normalised: template prompt, target with its leading space
    hparams: RomeHParams  # as used, layer filled in
    cov_from_cache: bool  # C was read from memory or disk, not computed
    key: torch.Tensor  # (D_in,) float32, k*
    value: torch.Tensor  # (D_out,) float32, v* = W k* + u
    compute_seconds: float = 0.0
    v_steps: int = 0  # Adam steps taken for v*
    v_target_prob: float = 0.0  # mean P(target) over the context prompts at the end of the optimisation

    @property
    def update_norm(self) -> float:
        return sum(f.norm for f in self.factors)


def resolve_layer(loaded: LoadedModel, request: EditRequest, hp: RomeHParams, cache: RomeCache) -> int:
    """request.layer, else the hparams' layer (an override, the paper's or the tuned one),
    else the traced layer of ``layer_selection``."""
    if request.layer is not None:
        return request.layer
    if hp.layer is not None:
        return hp.layer
    return select_edit_layer(loaded, cache_dir=cache.cache_dir)


def greedy_text(loaded: LoadedModel, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation of ``prompt`` (``max_new_tokens`` tokens at most)."""
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return "".join(c.text for c in generate_tokens(loaded, encode_prompt(loaded.tokenizer, prompt), params))


def target_is_answer(loaded: LoadedModel, request: EditRequest) -> bool:
    """Whether the greedy continuation of the filled prompt already starts with the target's tokens
    (then the edit would change nothing the model says)."""
    prompt_ids, target_ids = split_continuation(loaded.tokenizer, request.filled(), request.target)
    params = SamplingParams(max_new_tokens=len(target_ids))
    greedy = [t for c in generate_tokens(loaded, prompt_ids, params) for t in c.token_ids]
    return greedy == target_ids


def first_answer(text: str) -> str:
    """The answer part of a greedy continuation: up to the first line break or sentence mark."""
    for stop in ("\n", ".", ",", ";", "!", "?"):
        text = text.split(stop, 1)[0]
    return text.rstrip()


def compute_edit(
    loaded: LoadedModel,
    request: EditRequest,
    cache: RomeCache,
    *,
    progress: ProgressFn | None = None,
) -> EditResult:
    """Compute (not apply) the ROME edit of ``request``. Model at beginning == model at end."""
    t0 = time.perf_counter()
    hp = hparams_for(loaded).with_overrides(request.hparams)
    if request.layer is not None and not 0 <= request.layer < loaded.num_layers:
        raise InvalidRequest(
            f"layer {request.layer} is out of range: the model has {loaded.num_layers} layers "
            f"(0..{loaded.num_layers - 1})"
        )
    hp.check_layers(loaded.num_layers)
    layer = resolve_layer(loaded, request, hp, cache)
    hp = dataclasses.replace(hp, layer=layer)
    hp.check_layers(loaded.num_layers)
    spec, model = loaded.spec, loaded.model

    def report(stage: str) -> None:
        if progress is not None:
            progress(stage, 0, 1)

    report("prefixes")
    templates = context_templates(loaded, hp, cache, progress=progress)
    cov, cov_from_cache = layer_covariance(loaded, layer, hp, cache, progress=progress)

    report("key")
    k_star = compute_key(loaded, layer, templates, request, hp.k_identity_weight)  # (D_in,)
    # r-ROME: the SAME averaged k* is used for the u side (C^-1 k*) and for the v side
    # (v* - W k* and the denominator k*^T C^-1 k*). The original ROME code divided by the
    # key of the unprefixed prompt instead, which mismatches the u side and, over many
    # edits, can blow the update up (Gupta et al. 2024, "Rebuilding ROME").
    v = right_vector(cov, k_star, hp.cov_shrinkage)  # (D_in,): the key side, v . k* = 1
    module = model.get_submodule(spec.mlp_out_name(layer))
    with torch.no_grad():
        base_value = module(k_star.to(loaded.dtype).unsqueeze(0)).squeeze(0).float()  # W k* (+ bias): (D_out,)

    report("optimize_v")
    through = v.to(loaded.device) if hp.v_through_update else None
    d = compute_delta(loaded, layer, hp, templates, request, base_value, through, progress=progress)
    u = d.delta.float().cpu()  # v* - W k*
    result = EditResult(
        factors=(LowRankFactor.rank_one(spec.mlp_out_weight_name(layer), u, v.float().cpu()),),
        layer=layer,
        request=request,
        hparams=hp,
        cov_from_cache=cov_from_cache,
        key=k_star.float().cpu(),
        value=base_value.cpu() + u,
        compute_seconds=time.perf_counter() - t0,
        v_steps=d.steps,
        v_target_prob=d.target_prob,
    )
    log.info(
        "edit %r -> %r computed at layer %d: %d v* steps, P(target) %.3f in the prompts, %.1f s (C %s)",
        clip(request.filled()), clip(request.target), layer, d.steps, d.target_prob, result.compute_seconds,
        "cached" if cov_from_cache else "computed",
    )  # fmt: skip
    return result
