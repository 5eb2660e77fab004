"""The model-family table: the one place that knows module and config names.

Each supported family of Hugging Face causal LMs gets one ``ArchSpec`` that
names its token embeddings, its list of transformer blocks, and, relative to
a block, the MLP, the MLP's input and output projections and the attention
module. ROME edits the MLP output projection (``mlp_out``); causal tracing
restores block outputs, MLP outputs or attention outputs. ``config_sizes``
reads the sizes the families' configs name differently (GPT-2's ``n_embd``,
``n_head``, ``n_positions``; the others' ``hidden_size``, ...).

    spec = spec_for(model)
    w = spec.mlp_out_weight(model, layer=5)   # the matrix ROME rewrites
    config_sizes(model.config).hidden         # D
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig

from .errors import UnsupportedModel


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]  # config.model_type values served by this entry
    embed: str  # token embeddings (nn.Embedding)
    blocks: str  # nn.ModuleList of transformer blocks
    mlp: str  # relative to a block: the MLP module (its output is "the MLP output")
    mlp_in: str  # relative to a block: the MLP's input (up) projection
    mlp_out: str  # relative to a block: the MLP's output (down) projection, edited by ROME
    attn: str  # relative to a block: the attention module
    attn_out: str  # relative to a block: the attention output projection
    final_norm: str
    unembed: str
    # GPT-2 stores Conv1D weights as (in, out); everyone else as nn.Linear (out, in).
    conv1d: bool = False
    # Default ROME layers from the paper, by number of layers of the model.
    paper_layers: dict[int, int] = field(default_factory=dict)
    # The block-relative modules (attribute names above) whose weights an editing method may
    # change; an edit layer touching any other parameter is refused. ROME: the MLP output projection.
    editable: tuple[str, ...] = ("mlp_out",)

    # -- module access -------------------------------------------------------

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return get_module(model, self.blocks)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.block_list(model))

    def block_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def mlp_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.mlp}"

    def mlp_out_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.mlp_out}"

    def attn_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.attn}"

    def mlp_out_weight_name(self, layer: int) -> str:
        return f"{self.mlp_out_name(layer)}.weight"

    def mlp_out_weight(self, model: nn.Module, layer: int) -> torch.nn.Parameter:
        return get_module(model, self.mlp_out_name(layer)).weight

    def editable_weight_names(self, num_layers: int) -> frozenset[str]:
        """The parameters an edit layer may touch: each block's ``editable`` modules' weights."""
        return frozenset(
            f"{self.blocks}.{layer}.{getattr(self, attr)}.weight"
            for layer in range(num_layers)
            for attr in self.editable
        )

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return get_module(model, self.embed)

    def as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as (out_features, in_features), whatever its storage (a view)."""
        return weight.T if self.conv1d else weight

    def from_out_in(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of ``as_out_in``: an (out, in) matrix in the weight's storage layout."""
        return matrix.T if self.conv1d else matrix

    def project(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The editable projection ``module`` applied to x (..., in) with ``weight`` (storage layout) in
        place of its own, by the same arithmetic as its forward (Conv1D: addmm; Linear: F.linear)."""
        bias = getattr(module, "bias", None)
        if self.conv1d:
            flat = x.reshape(-1, x.shape[-1])
            out = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
            return out.view(*x.shape[:-1], weight.shape[1])
        return torch.nn.functional.linear(x, weight, bias)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; LookupError if there is none."""
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise LookupError(name) from e


_LLAMA_LIKE = ArchSpec(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3"),
    embed="model.embed_tokens",
    blocks="model.layers",
    mlp="mlp",
    mlp_in="mlp.up_proj",
    mlp_out="mlp.down_proj",
    attn="self_attn",
    attn_out="self_attn.o_proj",
    final_norm="model.norm",
    unembed="lm_head",
)

FAMILIES: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="gpt2",
        model_types=("gpt2",),
        embed="transformer.wte",
        blocks="transformer.h",
        mlp="mlp",
        mlp_in="mlp.c_fc",
        mlp_out="mlp.c_proj",
        attn="attn",
        attn_out="attn.c_proj",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        conv1d=True,
        paper_layers={48: 17},  # GPT-2 XL: layer 17 (Meng et al. 2022)
    ),
    ArchSpec(
        family="gptj",
        model_types=("gptj",),
        embed="transformer.wte",
        blocks="transformer.h",
        mlp="mlp",
        mlp_in="mlp.fc_in",
        mlp_out="mlp.fc_out",
        attn="attn",
        attn_out="attn.out_proj",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        paper_layers={28: 5},  # GPT-J 6B: layer 5 (Meng et al. 2022)
    ),
    ArchSpec(
        family="gpt_neox",
        model_types=("gpt_neox",),
        embed="gpt_neox.embed_in",
        blocks="gpt_neox.layers",
        mlp="mlp",
        mlp_in="mlp.dense_h_to_4h",
        mlp_out="mlp.dense_4h_to_h",
        attn="attention",
        attn_out="attention.dense",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
    ),
    _LLAMA_LIKE,
)


@dataclass(frozen=True)
class ConfigSizes:
    """The sizes of a model as its config gives them, whatever the family calls them."""

    hidden: int  # D
    heads: int
    kv_heads: int  # == heads without grouped-query attention
    head_dim: int
    intermediate: int  # the MLP's inner width
    vocab: int
    context_length: int  # the most positions the model takes; 1 << 30 when the config names none


def config_sizes(config: PretrainedConfig) -> ConfigSizes:
    """The sizes in a Hugging Face config, with the fallbacks a family without a field implies."""
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 1))
    return ConfigSizes(
        hidden=hidden,
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", 0) or heads),
        head_dim=int(getattr(config, "head_dim", 0) or hidden // max(heads, 1)),
        intermediate=int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 4 * hidden),
        vocab=int(config.vocab_size),
        context_length=_context_length(config),
    )


def _context_length(config: PretrainedConfig) -> int:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return 1 << 30


def supported_model_types() -> list[str]:
    return sorted(t for spec in FAMILIES for t in spec.model_types)


def spec_for_model_type(model_type: str) -> ArchSpec:
    for spec in FAMILIES:
        if model_type in spec.model_types:
            return spec
    raise UnsupportedModel(
        f"unsupported architecture {model_type!r}: supported model types are "
        + ", ".join(supported_model_types())
    )


def spec_for(model: nn.Module) -> ArchSpec:
    """The family entry of a loaded Hugging Face model (checked against its modules)."""
    spec = spec_for_model_type(model.config.model_type)
    get_module(model, spec.blocks)
    get_module(model, spec.mlp_out_name(0))
    return spec
