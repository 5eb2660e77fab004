"""The Trace RPC: progress messages, then the grid; errors for bad input."""

from __future__ import annotations

import pytest
import torch

from rome_engine.engine import EngineLimits
from rome_engine.tracing import TraceRequest, trace
from romegw_client import Client, InvalidArgument, TraceProgress, TraceResult


def test_trace_streams_progress_then_the_grid(tiny_llama, serve) -> None:
    srv = serve(tiny_llama)
    prompt, subject = "The Eiffel Tower is in the city of", "The Eiffel Tower"
    with Client(srv.target) as c:
        events = list(c.trace(prompt, subject, kind="mlp", samples=3, window=2, seed=1, noise=0.5))
    progress = [e for e in events if isinstance(e, TraceProgress)]
    results = [e for e in events if isinstance(e, TraceResult)]
    assert len(results) == 1 and isinstance(events[-1], TraceResult)
    assert progress and progress[-1].done == progress[-1].total
    r = results[0]
    direct = trace(tiny_llama, TraceRequest(prompt, subject, kind="mlp", samples=3, window=2, seed=1, noise=0.5))
    assert list(r.tokens) == direct.tokens
    assert r.subject_range == direct.subject_range
    assert r.num_layers == 4 and len(r.scores) == len(r.tokens)
    assert torch.allclose(torch.tensor(r.scores), direct.scores, atol=1e-5)
    assert r.clean_prob == pytest.approx(direct.clean_prob, abs=1e-6)
    assert r.kind == "mlp" and r.samples == 3 and r.window == 2 and r.edit_version == 0
    assert r.peak == direct.peak


def test_trace_bad_input(tiny_llama, serve) -> None:
    srv = serve(tiny_llama, EngineLimits(max_trace_cells=40))
    with Client(srv.target) as c:
        with pytest.raises(InvalidArgument, match="does not occur|not found|subject"):
            c.trace_result("The Eiffel Tower is in", "Big Ben")
        with pytest.raises(InvalidArgument, match="samples"):
            c.trace_result("The Eiffel Tower is in", "Eiffel", samples=0)
        # the serving limit on samples is the engine's (the library's own bound is far higher)
        with pytest.raises(InvalidArgument, match="max_trace_samples=64"):
            c.trace_result("The Eiffel Tower is in", "Eiffel", samples=65)
        with pytest.raises(InvalidArgument, match="max_trace_cells=40"):
            c.trace_result("The Eiffel Tower is in the middle of a big old city", "Eiffel")
