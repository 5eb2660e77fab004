"""Computing, applying and removing one ROME edit.

The update of the edited projection W (as (out, in)) is rank one
(Meng et al. 2022, eq. 2, with the r-ROME key fix):

    W' = W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*)
       = W + outer(left, right),  left = v* - W k* = delta,  right = C^-1 k* / (k*^T C^-1 k*)

so W' k* = v* exactly and W' k = W k for every k with (C^-1 k*)^T k = 0.

    result = compute_edit(loaded, EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome"), cache)
    apply_edit(loaded, result)     # W += outer(left, right), in W's storage layout
    remove_edit(loaded, result)    # W restored bit for bit from the copy saved at apply

``compute_edit`` leaves the weights as it found them: it measures the edit
through ``layers.rank_one_patch``, whose hook acts only on the calling thread's
forward passes. ``apply_edit`` and ``remove_edit`` write W in place, which every
thread sees: they are for evaluation, where nothing else runs on the model (the
server never calls them; it swaps weights through ``layers.LayerWeights`` inside
the engine's version gate).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch

from ..arch import ArchSpec
from ..bounds import clip
from ..edit_store import RankOneFactor
from ..errors import FailedPrecondition, InvalidRequest
from ..generation import SamplingParams, generate_tokens
from ..layer_selection import select_edit_layer
from ..layers import rank_one_patch
from ..loading import LoadedModel
from ..scoring import encode_prompt, score_continuations, split_continuation
from .cache import ProgressFn, RomeCache
from .compute_u import compute_key, right_vector
from .compute_v import compute_delta
from .context import context_templates
from .covariance import layer_covariance
from .hparams import RomeHParams, hparams_for
from .request import EditRequest

log = logging.getLogger(__name__)


@dataclass(eq=False)
class EditResult:
    """One computed edit: ``outer(left, right)`` added to ``param_name`` (as (out, in))."""

    param_name: str  # e.g. "model.layers.6.mlp.down_proj.weight"
    left: torch.Tensor  # (D_out,) float32, = v* - W k*
    right: torch.Tensor  # (D_in,) float32, = C^-1 k* / (k*^T C^-1 k*)
    layer: int
    request: EditRequest  # normalised: template prompt, target with its leading space
    hparams: RomeHParams  # as used, layer filled in
    target_before: float  # P(target | filled prompt), whole sequence, before the edit
    target_after: float  # ... with the edit applied
    old_object: str  # the model's greedy answer before the edit ("" if none)
    old_before: float  # P(old_object | filled prompt) before the edit
    old_after: float  # ... with the edit applied
    compute_seconds: float
    cov_from_cache: bool  # C was read from memory or disk, not computed
    update_norm: float  # ||outer(left, right)||_F = ||left|| ||right||
    key: torch.Tensor  # (D_in,) float32, k*
    value: torch.Tensor  # (D_out,) float32, v* = W k* + left
    v_steps: int = 0  # Adam steps taken for v*
    v_target_prob: float = 0.0  # mean P(target) over the context prompts at the end of the optimisation
    _original: torch.Tensor | None = field(default=None, repr=False)  # the weight saved by apply_edit

    @property
    def applied(self) -> bool:
        return self._original is not None


def rank_one_delta(spec: ArchSpec, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """outer(left, right) in the weight's storage layout ((in, out) for GPT-2's Conv1D), float32."""
    return spec.from_out_in(torch.outer(left.float(), right.float())).contiguous()


def _param(loaded: LoadedModel, name: str) -> torch.nn.Parameter:
    return loaded.model.get_parameter(name)


def _updated(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    # W' = W + outer(left, right), summed in float32 and stored in the weight's dtype
    return (weight.float() + delta.to(weight.device)).to(weight.dtype)


@torch.no_grad()
def apply_edit(loaded: LoadedModel, result: EditResult) -> None:
    """W += outer(left, right); keeps a copy of W so that ``remove_edit`` restores it exactly."""
    if result.applied:
        raise FailedPrecondition(f"the edit of {result.param_name} is already applied")
    w = _param(loaded, result.param_name)
    result._original = w.detach().clone()
    w.copy_(_updated(w, rank_one_delta(loaded.spec, result.left, result.right)))


@torch.no_grad()
def remove_edit(loaded: LoadedModel, result: EditResult) -> None:
    """Put back the exact tensor saved by ``apply_edit`` (remove edits in reverse order)."""
    if result._original is None:
        raise FailedPrecondition(f"the edit of {result.param_name} is not applied")
    w = _param(loaded, result.param_name)
    expected = _updated(result._original, rank_one_delta(loaded.spec, result.left, result.right))
    if not torch.equal(w, expected):
        raise FailedPrecondition(
            f"{result.param_name} changed since this edit was applied: remove later edits first"
        )
    w.copy_(result._original)
    result._original = None


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


def _probs(loaded: LoadedModel, prompt: str, continuations: list[str]) -> list[float]:
    scores = score_continuations(loaded, prompt, continuations)
    return [float(torch.tensor(s.total_logprob).exp()) for s in scores]


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
    right = right_vector(cov, k_star, hp.cov_shrinkage)  # (D_in,), right . k* = 1
    module = model.get_submodule(spec.mlp_out_name(layer))
    with torch.no_grad():
        base_value = module(k_star.to(loaded.dtype).unsqueeze(0)).squeeze(0).float()  # W k* (+ bias): (D_out,)

    prompt = request.filled()
    old_object = first_answer(greedy_text(loaded, prompt, max_new_tokens=8))
    conts = [request.target] + ([old_object] if old_object.strip() else [])
    before = _probs(loaded, prompt, conts)

    report("optimize_v")
    through = right.to(loaded.device) if hp.v_through_update else None
    d = compute_delta(loaded, layer, hp, templates, request, base_value, through, progress=progress)
    left = d.delta.float().cpu()  # v* - W k*
    right = right.float().cpu()

    result = EditResult(
        param_name=spec.mlp_out_weight_name(layer),
        left=left,
        right=right,
        layer=layer,
        request=request,
        hparams=hp,
        target_before=before[0],
        target_after=float("nan"),
        old_object=old_object if old_object.strip() else "",
        old_before=before[1] if len(before) > 1 else 0.0,
        old_after=0.0,
        compute_seconds=0.0,
        cov_from_cache=cov_from_cache,
        update_norm=float(left.norm() * right.norm()),
        key=k_star.float().cpu(),
        value=(base_value.cpu() + left),
        v_steps=d.steps,
        v_target_prob=d.target_prob,
    )
    report("measure")
    # Measured through a hook on this thread (W' x = W x + left (right . x)), never by writing the
    # weights: generation streams served meanwhile from other threads keep the weights they started on.
    with rank_one_patch(loaded, [RankOneFactor(result.param_name, left, right)]):
        after = _probs(loaded, prompt, conts)
    result.target_after = after[0]
    result.old_after = after[1] if len(after) > 1 else 0.0
    result.compute_seconds = time.perf_counter() - t0
    log.info(
        "edit %r -> %r at layer %d: P(target) %.3f -> %.3f, P(%r) %.3f -> %.3f, %.1f s (C %s)",
        clip(prompt), clip(request.target), layer, result.target_before, result.target_after, clip(result.old_object),
        result.old_before, result.old_after, result.compute_seconds, "cached" if cov_from_cache else "computed",
    )  # fmt: skip
    return result
