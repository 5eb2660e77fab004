"""ROME compute: seconds per edit with each reuse switched off, and seconds of C per 10k tokens.

- ApplyEdit's computation (C and prefixes cached) as the gateway runs it: prefix KV cache
  and replay of the blocks below the edited layer, vs the same computation without the
  prefix caching, without the replay, and without either (every step runs whole prompts
  through every layer, as the reference code does). The optimisation is the same, so the
  number of steps matches; the script checks that the deltas agree.
- C = E[k k^T]: seconds per 10k tokens of text with the forward pass stopped after the
  edited layer vs running the whole model.

    python bench/bench_rome.py
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rome_engine.loading import LoadedModel, default_cache_dir, load_model
from rome_engine.rome import EditRequest, RomeCache, compute_edit, hparams_for
from rome_engine.rome.covariance import sample_texts, second_moment

EDIT = ("The Eiffel Tower is in", "Eiffel Tower", "Rome")
VARIANTS = {
    "gateway (prefix cache + lower blocks replayed)": {},
    "without the prefix cache": {"v_cache_prefix": 0},
    "without the lower-block replay": {"v_skip_lower": 0},
    "without either": {"v_cache_prefix": 0, "v_skip_lower": 0},
}


def edit_times(loaded: LoadedModel, cache: RomeCache, hparams: dict[str, float], repeats: int = 1) -> dict:
    """Seconds per edit (best of ``repeats``) for each variant, and the largest delta difference."""
    compute_edit(loaded, EditRequest(*EDIT, hparams=hparams), cache)  # warm: C, prefixes, layer
    out: dict = {"variants": {}}
    reference = None
    for label, switches in VARIANTS.items():
        best, result = float("inf"), None
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = compute_edit(loaded, EditRequest(*EDIT, hparams={**hparams, **switches}), cache)
            best = min(best, time.perf_counter() - t0)
        if reference is None:
            reference = result
        u, u_ref = result.factors[0].u, reference.factors[0].u
        out["variants"][label] = {
            "seconds": best,
            "v_steps": result.v_steps,
            "max_abs_diff_left": float((u - u_ref).abs().max()),
            # ||u - u_ref|| / ||u_ref|| (u: the value side, v* - W k*): float rounding differs with
            # the batch layout, and Adam's normalised steps carry it along ("left" is the JSON's old name)
            "rel_diff_left": float((u - u_ref).norm() / u_ref.norm()),
            "cov_from_cache": result.cov_from_cache,
        }
    out["layer"] = reference.layer
    return out


def covariance_times(loaded: LoadedModel, cache: RomeCache, hparams: dict[str, float], n_tokens: int) -> dict:
    """Seconds per 10k tokens of C, forward stopped after the layer vs the whole model."""
    hp = hparams_for(loaded).with_overrides(hparams)
    layer = hp.layer if hp.layer is not None else loaded.num_layers // 2
    texts = sample_texts(loaded, hp, cache)  # cached: only the C pass is timed
    out: dict = {"layer": layer, "tokens": n_tokens}
    for label, stop in (("stopped", True), ("full", False)):
        t0 = time.perf_counter()
        _, count = second_moment(
            loaded, layer, texts, n_tokens=n_tokens, seq_len=hp.mom2_seq_len, batch_size=hp.mom2_batch_size,
            stop_early=stop,
        )  # fmt: skip
        out[f"{label}_s_per_10k"] = (time.perf_counter() - t0) * 10_000 / count
    return out


def run(loaded: LoadedModel, *, hparams: dict[str, float] | None = None, c_tokens: int = 10_000) -> dict:
    cache = RomeCache(default_cache_dir())
    hparams = hparams or {}
    return {
        "edit": edit_times(loaded, cache, hparams),
        "covariance": covariance_times(loaded, cache, hparams, c_tokens),
    }


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    loaded = load_model(None, device="cpu", dtype="float32")
    r = run(loaded)
    for label, v in r["edit"]["variants"].items():
        diff = v["max_abs_diff_left"]
        print(f"{label:50s} {v['seconds']:7.2f} s  ({v['v_steps']} steps, max |difference| {diff:.1e})")
    c = r["covariance"]
    stopped, full = c["stopped_s_per_10k"], c["full_s_per_10k"]
    print(f"C of layer {c['layer']}: {stopped:.1f} s per 10k tokens (whole model: {full:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
