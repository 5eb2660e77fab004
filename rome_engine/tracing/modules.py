"""Which modules a (token, layer) restoration sets back. The names come from
the model's ``ArchSpec`` (``arch.py`` is the one place that knows them).

    window_layers(15, 10, 30)                    # range(10, 20)
    restored_modules(spec, "mlp", 1, 3, 4)       # the MLPs of layers 0, 1, 2
"""

from __future__ import annotations

from ..arch import ArchSpec


def window_layers(layer: int, window: int, num_layers: int) -> range:
    """Layers restored together for a cell at ``layer``: ``window`` layers centred on it, clamped.

    layers max(0, l - w//2) .. min(L, l - w//2 + w) - 1 (the paper's convention)
    """
    start = layer - window // 2
    return range(max(0, start), min(num_layers, start + window))


def restored_modules(spec: ArchSpec, kind: str, layer: int, window: int, num_layers: int) -> list[str]:
    """Names of the modules whose outputs a (token, ``layer``) restoration sets back."""
    if kind == "hidden":
        return [spec.block_name(layer)]
    name = spec.mlp_name if kind == "mlp" else spec.attn_name
    return [name(i) for i in window_layers(layer, window, num_layers)]


def first_restored(kind: str, layer: int, window: int, num_layers: int) -> int:
    """The lowest layer a restoration at ``layer`` touches: blocks below it run as corrupted."""
    return layer if kind == "hidden" else window_layers(layer, window, num_layers).start


def state_names(spec: ArchSpec, kind: str, num_layers: int) -> list[str]:
    """Every module of ``kind``, one per layer: the clean run records their outputs."""
    return [name for layer in range(num_layers) for name in restored_modules(spec, kind, layer, 1, num_layers)]
