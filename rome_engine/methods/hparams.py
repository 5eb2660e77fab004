"""Hyperparameters of the accumulating methods: typed, frozen, flat, overridable by name.

    hp = memit_hparams_for(loaded)                        # family defaults + tuned per-model values
    hp = hp.with_overrides({"n_layers": 4, "v_lr": 0.2})  # names checked, values range-checked
    hp.z_hparams(layer)                                   # the RomeHParams that z / C / prefixes run on

``MemitHParams`` serves ``memit``, the ``projected`` mode (which also reads the
``nullspace_*``, ``l2`` and ``hard_prior`` fields) and the ``gated`` method (one layer,
``gate_threshold``; ``gated_hparams_for``). Each field is a
scalar, as in ``RomeHParams``, so that a per-call ``Mapping[str, float]`` can
override any of them; the fields shared with ROME (z's optimiser, C, the
context prefixes) keep ROME's names and meaning.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeVar

from ..errors import InvalidRequest
from ..rome.hparams import RomeHParams, hparams_for, value_ranges

if TYPE_CHECKING:
    from ..loading import LoadedModel

T = TypeVar("T", "MemitHParams", "FtHParams")


class _Overridable:
    """What every method's hyperparameters share: flat scalar fields, overridable by name."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def with_overrides(self: T, overrides: Mapping[str, float]) -> T:
        return _with_overrides(self, overrides)

    def check_ranges(self) -> None:
        _check_ranges(self)

    def to_dict(self) -> dict[str, float | int | None]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MemitHParams(_Overridable):
    # -- which matrices: the MLP output projections of layers layer - n_layers + 1 .. layer
    layer: int | None = None  # the last layer of the range (where z is read); None: the model's ROME layer
    n_layers: int = 3  # consecutive layers the update is spread over
    layer_offset: int = 1  # with layer None: the last layer = the model's ROME layer + layer_offset (centred)
    # -- MEMIT's solve: Delta = R K^T (lambda C + K K^T)^-1
    mom2_update_weight: float = 1500.0  # lambda: how many "C samples" one edit key weighs against
    # -- the projected mode: Delta^T = (P (K K^T + K_p K_p^T) + alpha I)^-1 P K R^T
    nullspace_threshold: float = 1.0  # write only from eigenvectors of C whose eigenvalue is below this ...
    nullspace_relative: int = 1  # ... times the mean eigenvalue tr(C)/d (1), or in absolute units (0, AlphaEdit: 2e-2)
    l2: float = 0.1  # alpha = l2 * tr(C): the ridge, relative to the mean squared key norm E||k||^2
    hard_prior: int = 1  # 1: earlier edits' keys are projected out exactly; 0: AlphaEdit's K_p K_p^T penalty
    null_cov_weight: float = 0.0  # w: inside the writable space the ridge of a direction with C-eigenvalue
    #   lambda is alpha (1 + w lambda / mean eigenvalue); 0: AlphaEdit's flat ridge, 10: MEMIT's C weight
    # -- the gated method: column j adds u_j s only where s = v_j . x > gate_threshold (v_j . k*_j = 1)
    gate_threshold: float = 0.5
    gate_spare: int = 1  # 1: a new column is silent (v . k = 0) on the active edits' keys it would respond to
    gate_fit_prompts: int = 1  # 1: v . k = 1 at the key of every prompt z was trained on; 0: at their mean only
    gate_min_cosine: float = 0.0  # > 0: a column also needs cos(x, k*) > this, scaled by diag(C)^-1/2; 0: off
    # -- z: the residual at the last layer that makes the model say the target (ROME's v* machinery)
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_loss_layer: int = -1
    v_weight_decay: float = 0.5  # weight of (||delta|| / ||h||)^2, h the residual at the subject's last token
    clamp_norm_factor: float = 0.75  # ||delta|| <= clamp_norm_factor * ||h||
    kl_factor: float = 0.0625
    v_stop_prob: float = 0.95
    v_stop_identity: float = 0.0
    v_stop_greedy: int = 0  # 1: stop once the target is every prompt's greedy answer (MPES, Gupta et al. 2025)
    k_identity_weight: float = 1.0  # weight of the unprefixed prompt's key in each layer's k*
    v_cache_prefix: int = 1
    v_skip_lower: int = 1
    # -- C = E[k k^T] per layer, as for ROME (the same cache files)
    mom2_n_tokens: int = 50_000
    mom2_seq_len: int = 128
    mom2_batch_size: int = 16
    cov_shrinkage: float = 0.0
    # -- context prefixes (the paper's MEMIT uses 5 of 10 tokens)
    ctx_len_short: int = 5
    ctx_n_short: int = 0
    ctx_len_long: int = 10
    ctx_n_long: int = 5
    ctx_seed: int = 0

    def layer_range(self) -> tuple[int, ...]:
        """The edited layers, lowest first (``layer`` must be resolved)."""
        if self.layer is None:
            raise ValueError("the last layer of the range is not resolved")
        return tuple(range(self.layer - self.n_layers + 1, self.layer + 1))

    def check_layers(self, num_layers: int) -> None:
        """InvalidRequest when the range or the loss layer does not fit a model of ``num_layers``."""
        if self.layer is None:
            return
        lo = self.layer - self.n_layers + 1
        if lo < 0 or self.layer >= num_layers:
            raise InvalidRequest(
                f"layers {lo}..{self.layer} (layer={self.layer}, n_layers={self.n_layers}) do not fit a model "
                f"of {num_layers} layers (0..{num_layers - 1})"
            )
        zhp = self.z_hparams(self.layer)
        zhp.check_layers(num_layers)
        if self.layer >= zhp.loss_layer(num_layers):
            # z is read at the last subject token; only a later block's attention carries it to the prompt's end
            raise InvalidRequest(
                f"the last layer of the range ({self.layer}) must come before the loss layer "
                f"({zhp.loss_layer(num_layers)})"
            )

    def z_hparams(self, layer: int) -> RomeHParams:
        """ROME's hyperparameters for z at ``layer``, for C and for the prefixes (the shared fields)."""
        shared = {f: getattr(self, f) for f in RomeHParams.names() if f in _MEMIT_SHARED}
        return RomeHParams(layer=layer, v_through_update=0, **shared)


@dataclass(frozen=True)
class FtHParams(_Overridable):
    """FT-L (Meng et al. 2022, section 4.2 baselines): Adam on one MLP output projection, with
    ||Delta W||_inf <= norm_constraint after every step, on the edit prompt only."""

    layer: int | None = None  # None: the model's ROME layer
    ft_num_steps: int = 25  # Adam steps at most (the paper's FT-L)
    ft_lr: float = 5e-4
    norm_constraint: float = 5e-4  # L-inf bound on each entry of Delta W (the paper's 5e-4)
    ft_stop_loss: float = 1e-2  # stop once the mean target NLL is below this
    ft_max_rank: int = 8  # the stored factor's rank at most (a truncated SVD beyond)
    ft_rank_tol: float = 1e-6  # singular values below ft_rank_tol * sigma_1 count as zero
    v_skip_lower: int = 1  # run the blocks below the layer once and replay them

    def check_layers(self, num_layers: int) -> None:
        if self.layer is not None and not 0 <= self.layer < num_layers:
            raise InvalidRequest(
                f"layer {self.layer} is out of range: the model has {num_layers} layers (0..{num_layers - 1})"
            )


_MEMIT_SHARED = frozenset(MemitHParams.names()) & frozenset(RomeHParams.names()) - {"layer"}

# (lo, hi) inclusive, beside ROME's own ranges for the shared names.
_RANGES: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "layer": (0, 10_000),
        "n_layers": (1, 16),
        "layer_offset": (-16, 16),
        "mom2_update_weight": (0.0, 1e9),
        "nullspace_threshold": (0.0, 1e6),
        "nullspace_relative": (0, 1),
        "l2": (1e-12, 1e6),
        "hard_prior": (0, 1),
        "null_cov_weight": (0.0, 1e4),
        "gate_threshold": (0.01, 0.99),
        "gate_spare": (0, 1),
        "gate_fit_prompts": (0, 1),
        "gate_min_cosine": (0.0, 0.99),
        "ft_num_steps": (0, 500),
        "ft_lr": (0.0, 1.0),
        "norm_constraint": (0.0, 10.0),
        "ft_stop_loss": (0.0, 100.0),
        "ft_max_rank": (1, 256),
        "ft_rank_tol": (0.0, 1.0),
    }
)


def _ranges() -> Mapping[str, tuple[float, float]]:
    return {**value_ranges(), **_RANGES}


def _check_ranges(hp: MemitHParams | FtHParams) -> None:
    ranges = _ranges()
    for f in dataclasses.fields(hp):
        value = getattr(hp, f.name)
        lo_hi = ranges.get(f.name)
        if value is None or lo_hi is None:
            continue
        if not lo_hi[0] <= value <= lo_hi[1]:
            raise InvalidRequest(f"hparam {f.name}={value} is out of range: allowed [{lo_hi[0]}, {lo_hi[1]}]")


def _with_overrides(hp: T, overrides: Mapping[str, float]) -> T:
    """A copy of ``hp`` with ``overrides`` applied; InvalidRequest naming an unknown name or a bad value."""
    fields = {f.name: f for f in dataclasses.fields(hp)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise InvalidRequest(
            f"unknown hparam name(s) {', '.join(unknown)} for {type(hp).__name__}: valid names are "
            + ", ".join(fields)
        )
    values: dict[str, float | int] = {}
    for name, raw in overrides.items():
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(float(raw)):
            raise InvalidRequest(f"hparam {name} must be a finite number, got {raw!r}")
        if fields[name].type in ("int", "int | None"):
            if float(raw) != int(raw):
                raise InvalidRequest(f"hparam {name} must be a whole number, got {raw!r}")
            values[name] = int(raw)
        else:
            values[name] = float(raw)
    out = dataclasses.replace(hp, **values)
    out.check_ranges()
    return out


# -- defaults -----------------------------------------------------------------

# SmolLM2-135M(-Instruct), 30 layers, down_proj input 1536 (docs/methods.md says how these were chosen):
# layers 3..5 around the traced/tuned ROME layer 4, lambda 1500 (k^T C^-1 k of a subject key is ~3000-4500
# here, so each layer writes ~85% of its share, as the paper's lambda does for GPT-J), the paper's z values
# but for z's step size 1.0 (not 0.5: 12 steps instead of 16, the same P(new) after) and 3 prefixes of 10
# tokens (not 5): projected 4.4 s/edit instead of 6.7 on records 0-4 (docs/methods.md, "Edit time").
_SMOLLM2_MEMIT = MemitHParams(layer=5, n_layers=3, v_lr=1.0, ctx_n_long=3)
# FT-L: the paper's 5e-4 bound (for GPT-2 XL) leaves the target at P ~0.02 here, where the down_proj
# entries are larger (rms 0.18); 5e-3 (lr alike) reaches P ~0.99 on the edit prompt in <= 25 steps.
_SMOLLM2_FT = FtHParams(ft_lr=5e-3, norm_constraint=5e-3)
_FT_BY_MODEL: Mapping[str, FtHParams] = MappingProxyType({"HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_FT})
_FT_BY_SHAPE: Mapping[tuple[str, int], FtHParams] = MappingProxyType({("llama", 30): _SMOLLM2_FT})

_MEMIT_BY_MODEL: Mapping[str, MemitHParams] = MappingProxyType(
    {"HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_MEMIT}
)
_MEMIT_BY_SHAPE: Mapping[tuple[str, int], MemitHParams] = MappingProxyType({("llama", 30): _SMOLLM2_MEMIT})

# The MEMIT paper's ranges (Meng et al. 2022b, hparams/MEMIT/*.json): GPT-2 XL 13..17 with lambda 20000,
# GPT-J 3..8 with lambda 15000; their C is E[k k^T] over 100k Wikipedia samples, as ours is.
_PAPER_BY_SHAPE: Mapping[tuple[str, int], MemitHParams] = MappingProxyType(
    {
        ("gpt2", 48): MemitHParams(layer=17, n_layers=5, mom2_update_weight=20_000.0, v_num_grad_steps=20),
        ("gptj", 28): MemitHParams(layer=8, n_layers=6, mom2_update_weight=15_000.0, v_num_grad_steps=25),
    }
)


def memit_hparams_for(loaded: LoadedModel) -> MemitHParams:
    """Defaults of ``loaded``: the paper's range for its depth, else tuned per-model values, else the
    generic defaults. ``layer`` stays None unless one of those names it; ``resolve`` fills it in."""
    key = (loaded.spec.family, loaded.num_layers)
    return (
        _PAPER_BY_SHAPE.get(key)
        or _MEMIT_BY_MODEL.get(loaded.model_id)
        or _MEMIT_BY_SHAPE.get(key)
        or MemitHParams()
    )


def gated_hparams_for(loaded: LoadedModel) -> MemitHParams:
    """The gated method: MEMIT's z and C settings for the model, on the one layer ROME edits
    (``layer`` None: resolved to the model's ROME layer, as ROME's own is)."""
    return dataclasses.replace(memit_hparams_for(loaded), layer=None, n_layers=1, layer_offset=0)


def method_hparams_for(method: str, loaded: LoadedModel) -> MemitHParams:
    """The defaults of one of the MEMIT-family methods (memit, projected, gated)."""
    return gated_hparams_for(loaded) if method == "gated" else memit_hparams_for(loaded)


def default_method(loaded: LoadedModel) -> str:
    """The method of an edit that names none when the server's default is "auto": ``gated`` on
    SmolLM2-135M, where the 1,000-edit sequential evaluation of issue #12 chose it (and its
    threshold); the null-space projected mode on the MEMIT paper's GPT-2 XL and GPT-J ranges
    (evaluated layers, not the gate); else ROME, whose single layer comes from the model's
    tuning or its depth."""
    key = (loaded.spec.family, loaded.num_layers)
    if loaded.model_id in _MEMIT_BY_MODEL or key in _MEMIT_BY_SHAPE:
        return "gated"
    return "projected" if key in _PAPER_BY_SHAPE else "rome"


def ft_hparams_for(loaded: LoadedModel) -> FtHParams:
    """FT-L at the model's ROME layer (``layer`` None unless the ROME defaults name one): tuned values
    for the model, else the paper's."""
    hp = _FT_BY_MODEL.get(loaded.model_id) or _FT_BY_SHAPE.get((loaded.spec.family, loaded.num_layers)) or FtHParams()
    return dataclasses.replace(hp, layer=hparams_for(loaded).layer)
