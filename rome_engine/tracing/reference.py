"""The plain reference of ``grid.trace``: one full forward pass per (token, layer)
cell, the noise samples as the batch. Slow; for tests and benchmarks."""

from __future__ import annotations

import time

import torch

from ..hooks import Trace
from ..loading import LoadedModel
from .grid import start_runs, trace_result
from .noise import NoiseCache, resolve_noise
from .request import TraceRequest, TraceResult
from .runs import answer_probs, forward


def trace_per_position(loaded: LoadedModel, req: TraceRequest, *, noise_cache: NoiseCache | None = None) -> TraceResult:
    """Reference implementation of ``trace``: one full forward pass per (token, layer)
    cell, the ``samples`` noise draws as the batch. Slow; for tests and benchmarks."""
    t0 = time.perf_counter()
    model, spec = loaded.model, loaded.spec
    with torch.inference_mode():
        runs = start_runs(loaded, req, resolve_noise(loaded, req.noise, noise_cache))
        clean = runs.clean
        corrupt = runs.corrupt(torch.arange(req.samples, device=loaded.device))
        ids = clean.input_ids.expand(req.samples, -1)  # (S, T)
        scores = torch.zeros(clean.num_tokens, clean.num_layers)
        for t in range(clean.num_tokens):
            for layer in range(clean.num_layers):

                def restore(name: str, out: torch.Tensor, t: int = t) -> torch.Tensor:  # out: (S, T, D)
                    out = out.clone()
                    out[:, t] = clean.states[name][t]
                    return out

                with (
                    Trace(model, [spec.embed], capture_output=False, edit_output=corrupt),
                    Trace(model, clean.modules_by_layer[layer], capture_output=False, edit_output=restore),
                ):
                    logits, _ = forward(loaded, ids)  # (S, V)
                scores[t, layer] = answer_probs(logits, clean.answer_id).mean()
    return trace_result(req, runs, scores, t0, extra_passes=clean.num_tokens * clean.num_layers)
