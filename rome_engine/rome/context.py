"""Context templates: the edit prompt behind short prefixes the model writes itself.

ROME computes the key k* and optimises v* over the prompt preceded by a few
random prefixes, so that the edit holds whatever text comes before the
subject. The prefixes are sampled from the model (top-k 5, seeded, from a
few one-word seeds), generated once per model and cached in memory and as
JSON under ``<cache_dir>/rome/<model key>/``.

    templates = context_templates(loaded, hp, cache)
    # ("{}", "The first thing I did. {}", "Therefore, we have. {}", ...)
"""

from __future__ import annotations

import logging
import re
import time

from ..fileio import write_json
from ..generation import SamplingParams, generate_tokens
from ..loading import LoadedModel
from ..scoring import encode_prompt
from .cache import ProgressFn, RomeCache, read_json
from .hparams import RomeHParams
from .request import SLOT

log = logging.getLogger(__name__)

SEEDS = ("The", "Therefore", "Because", "I", "You")
TOP_K = 5  # sample among the 5 likeliest tokens: ordinary text, not the single greedy one


def context_templates(
    loaded: LoadedModel, hp: RomeHParams, cache: RomeCache, *, progress: ProgressFn | None = None
) -> tuple[str, ...]:
    """``("{}", "<prefix 1>. {}", ...)``: the identity first, then the prefixed templates."""
    prefixes = context_prefixes(loaded, hp, cache, progress=progress)
    return (SLOT, *(f"{p}. {SLOT}" for p in prefixes))


def context_prefixes(
    loaded: LoadedModel, hp: RomeHParams, cache: RomeCache, *, progress: ProgressFn | None = None
) -> tuple[str, ...]:
    """The cleaned prefixes (memory, then disk, then generated)."""
    spec = f"{hp.ctx_n_short}x{hp.ctx_len_short}-{hp.ctx_n_long}x{hp.ctx_len_long}-s{hp.ctx_seed}"
    path = cache.model_dir(loaded) / f"prefixes-{spec}.json"

    def load_or_generate() -> tuple[str, ...]:
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("prefixes"), list):
            return tuple(str(p) for p in data["prefixes"])
        t0 = time.perf_counter()
        plan = [(hp.ctx_len_short, hp.ctx_n_short), (hp.ctx_len_long, hp.ctx_n_long)]
        prefixes = generate_prefixes(loaded, plan, seed=hp.ctx_seed, progress=progress)
        write_json(path, {"model_id": loaded.model_id, "plan": plan, "prefixes": list(prefixes)})
        log.info("generated %d context prefixes in %.1f s -> %s", len(prefixes), time.perf_counter() - t0, path)
        return prefixes

    prefixes, _ = cache.get_or_compute(f"prefixes:{path}", load_or_generate)
    return prefixes


def generate_prefixes(
    loaded: LoadedModel, plan: list[tuple[int, int]], *, seed: int, progress: ProgressFn | None = None
) -> tuple[str, ...]:
    """``count`` prefixes of ``length`` new tokens for each (length, count) of ``plan``;
    ``progress("prefixes", done, total)`` runs before each (raising from it abandons them)."""
    out: list[str] = []
    total = sum(count for _, count in plan)
    for length, count in plan:
        for i in range(count):
            if progress is not None:
                progress("prefixes", len(out), total)
            start = SEEDS[i % len(SEEDS)]
            params = SamplingParams(max_new_tokens=length, temperature=1.0, top_k=TOP_K, seed=seed + len(out))
            text = "".join(c.text for c in generate_tokens(loaded, encode_prompt(loaded.tokenizer, start), params))
            out.append(clean_prefix(start + text) or start)
    return tuple(out)


def clean_prefix(text: str) -> str:
    """One line, no braces, no trailing full stop (the template adds ". ")."""
    text = text.replace("{", " ").replace("}", " ")
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip(" .")
