"""The default layer ROME edits in a model.

The paper's layers (``ArchSpec.paper_layers``, e.g. GPT-2 XL: 17) are used
when the model's depth has one. Otherwise the layer is found the paper's way:
an MLP causal trace over a few facts the model knows, and the layer where
restoring the MLP at the last subject token has the largest average indirect
effect. That takes a minute on a CPU, so the answer is cached in a small JSON
file per model under ``cache_dir`` (keyed by model id and a hash of the model
config) and computed once.

    layer = select_edit_layer(loaded, cache_dir=default_cache_dir())
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import InvalidRequest
from .fileio import write_json
from .loading import LoadedModel, config_sha256, safe_model_id
from .tracing import Fact, NoiseCache, trace_summary

log = logging.getLogger(__name__)

CACHE_FORMAT = 1

# Facts a small model is likely to know; the answer is the expected next token
# (its first token counts). Only facts the model gives P(answer) >= min_prob are
# traced. No subject starts the prompt: in a model without a BOS token the
# first position is the attention sink, noise there damages every later
# position, and restoring one state recovers little. (SmolLM2-135M gives these
# P = 0.36 to 0.99.)
DEFAULT_FACTS: tuple[Fact, ...] = (
    Fact("The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris"),
    Fact("The capital of France is", "France", " Paris"),
    Fact("The capital of Japan is", "Japan", " Tokyo"),
    Fact("The Colosseum is located in the city of", "Colosseum", " Rome"),
    Fact("The Statue of Liberty is located in New", "Statue of Liberty", " York"),
    Fact("The Louvre is a museum in", "Louvre", " Paris"),
    Fact("The Kremlin is located in", "Kremlin", " Moscow"),
    Fact("The capital of Italy is", "Italy", " Rome"),
    Fact("The official language of Germany is", "Germany", " German"),
    Fact("The currency of Japan is the", "Japan", " yen"),
)


def default_window(num_layers: int) -> int:
    """The paper's 10 MLP layers restored together, at most a third of the model's depth
    (a window as deep as the model restores every MLP at once and has no peak)."""
    return max(1, min(10, num_layers // 3))


def config_hash(loaded: LoadedModel) -> str:
    """A short hash of the model's architecture config (paths and versions left out)."""
    return config_sha256(loaded).hexdigest()[:16]


def cache_path(cache_dir: Path, loaded: LoadedModel) -> Path:
    return cache_dir / "edit_layers" / f"{safe_model_id(loaded.model_id)}-{config_hash(loaded)}.json"


def _read_cached(path: Path) -> int | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return int(data["layer"]) if data.get("format") == CACHE_FORMAT else None
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the unreadable edit-layer cache %s: %s", path, e)
        return None


def select_edit_layer(
    loaded: LoadedModel,
    *,
    facts: Sequence[tuple[str, str, str | None]] | None = None,
    cache_dir: Path | None = None,
    n_facts: int = 8,
    samples: int = 4,
    window: int | None = None,
    min_prob: float = 0.1,
    noise_cache: NoiseCache | None = None,
) -> int:
    """The default ROME layer of ``loaded``: the paper's layer for its depth if there is
    one, else the peak of the MLP indirect effect at the last subject token over
    (at most ``n_facts`` of) ``facts`` the model answers with P >= ``min_prob``.
    ``window`` (MLP layers restored together) defaults to the paper's 10, at most a
    third of the depth. With ``cache_dir`` the traced answer is cached on disk
    (``None``: not cached)."""
    num_layers = loaded.spec.num_layers(loaded.model)
    if num_layers in loaded.spec.paper_layers:
        layer = loaded.spec.paper_layers[num_layers]
        log.info("edit layer of %s: %d (the paper's, %d layers)", loaded.model_id, layer, num_layers)
        return layer
    path = cache_path(cache_dir, loaded) if cache_dir is not None else None
    if path is not None and (cached := _read_cached(path)) is not None:
        log.info("edit layer of %s: %d (cached in %s)", loaded.model_id, cached, path)
        return cached

    t0 = time.perf_counter()
    chosen = list(facts or DEFAULT_FACTS)
    window = window or default_window(num_layers)
    try:
        summary = trace_summary(
            loaded,
            chosen,
            kind="mlp",
            samples=samples,
            window=window,
            min_clean_prob=min_prob,
            max_facts=n_facts,
            noise_cache=noise_cache,
        )
    except InvalidRequest:
        log.warning(
            "%s gives none of the %d facts P >= %.2f: tracing them anyway", loaded.model_id, len(chosen), min_prob
        )
        summary = trace_summary(
            loaded, chosen, kind="mlp", samples=samples, window=window, max_facts=n_facts, noise_cache=noise_cache
        )
    layer = summary.peak_layer
    seconds = time.perf_counter() - t0
    log.info(
        "edit layer of %s: %d (MLP trace peak over %d facts, %.1f s)",
        loaded.model_id,
        layer,
        summary.n_facts,
        seconds,
    )
    if path is not None:
        write_json(
            path,
            {
                "format": CACHE_FORMAT,
                "model_id": loaded.model_id,
                "config_hash": config_hash(loaded),
                "layer": layer,
                "num_layers": num_layers,
                "n_facts": summary.n_facts,
                "samples": samples,
                "window": window,
                "last_subject_effect": summary.last_subject_effect,
                "seconds": round(seconds, 2),
            },
            indent=2,
        )
    return layer
