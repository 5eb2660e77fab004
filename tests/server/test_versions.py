"""Versions without stalls, through a live server and the SDK: an edit goes live while streams run
(they keep their version, token for token), any request may pin a version of the history, and
``min_edit_version`` waits for the server to know a version."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from rome_engine.engine import EngineLimits
from romegw_client import Client
from romegw_client.errors import FailedPrecondition, GatewayError, InvalidArgument, NotFound
from tests.conftest import make_tiny, wait_until
from tests.server.layer_files import encode, layer_file, layer_parts
from tests.server.test_metrics import scrape

LIMITS = EngineLimits(max_update_norm_ratio=100.0, max_new_tokens=1000, max_version_wait=0.5)
PROMPTS = ["The Eiffel Tower is located in", "Alice Smith lives in", "The capital of France is"]
CONTINUATIONS = [" Paris", " Rome", " the city of London"]


def import_layer(client: Client, srv, *, seed: int) -> int:
    """Import a random layer big enough to change what the tiny model says; the new head version."""
    header, tensors = layer_parts(srv.engine.edits.loaded, srv.engine.edits.weights, seed=seed, scale=0.3)
    (info,) = client.import_edits([layer_file(encode(header, tensors))])
    return info.version


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pinned_base_and_head_streams_share_a_batch(family, tokenizer, serve) -> None:
    """Streams pinned to version 0 equal the base model's greedy output while streams on the head,
    decoded in the same batches, see the edit; Score and Trace honour the pin."""
    srv = serve(make_tiny(family, tokenizer), LIMITS, edits=True)
    trace_options = {"kind": "mlp", "samples": 2, "window": 1, "seed": 3}
    with Client(srv.target, timeout=120) as c:
        base = {p: c.generate_text(p, max_new_tokens=12).text for p in PROMPTS}
        base_scores = c.score(PROMPTS[0], CONTINUATIONS)
        base_trace = c.trace_result(PROMPTS[0], "The Eiffel Tower", **trace_options)
        version = import_layer(c, srv, seed=1)
        head = {p: c.generate_text(p, max_new_tokens=12).text for p in PROMPTS}
        assert head != base, "the edit changed nothing: this test would prove nothing"

        batches_before = sum(n for size, n in srv.engine.scheduler.batch_sizes.items() if size > 1)
        with ThreadPoolExecutor(2 * len(PROMPTS)) as pool:
            runs = [
                (p, pin, pool.submit(c.generate_text, p, max_new_tokens=12, **pin))
                for _ in range(2) for p in PROMPTS for pin in ({"edit_version": 0}, {})
            ]  # fmt: skip
            for p, pin, future in runs:
                out = future.result()
                assert out.edit_version == (0 if pin else version)
                assert out.text == (base if pin else head)[p], (p, pin)
        assert sum(n for size, n in srv.engine.scheduler.batch_sizes.items() if size > 1) > batches_before

        pinned = c.score(PROMPTS[0], CONTINUATIONS, edit_version=0)
        assert pinned.edit_version == 0
        for got, want in zip(pinned.scores, base_scores.scores, strict=True):
            assert got.total_logprob == pytest.approx(want.total_logprob, abs=1e-5)
        assert c.score(PROMPTS[0], CONTINUATIONS).edit_version == version

        traced = c.trace_result(PROMPTS[0], "The Eiffel Tower", edit_version=0, **trace_options)
        assert traced.edit_version == 0
        assert traced.clean_prob == pytest.approx(base_trace.clean_prob, abs=1e-6)
        flat = [x for row in traced.scores for x in row]
        assert flat == pytest.approx([x for row in base_trace.scores for x in row], abs=1e-6)


def test_a_running_stream_keeps_its_version_through_an_edit_and_a_revert(tokenizer, serve) -> None:
    """Token for token the text of a run without the edit; the edit goes live while it runs."""
    srv = serve(make_tiny("llama", tokenizer), LIMITS, edits=True)
    n = 600
    with Client(srv.target, timeout=300) as c:
        alone = c.generate_text(PROMPTS[0], max_new_tokens=n)
        stream = c.generate(PROMPTS[0], max_new_tokens=n)
        chunks = [next(stream)]
        edited = import_layer(c, srv, seed=2)
        during = c.model_info()
        assert during.head_version == edited
        assert during.versions_in_use.get(0) == 1, "the stream ended before the edit went live: make it longer"
        assert c.score(PROMPTS[0], CONTINUATIONS).edit_version == edited  # new requests: the new head
        reverted = c.revert_edit(edit_id=c.list_edits().edits[0].edit_id)
        assert reverted.head_version > edited
        chunks += list(stream)
    assert "".join(ch.text for ch in chunks) == alone.text
    assert {ch.edit_version for ch in chunks} == {0}
    assert chunks[-1].completion_tokens == alone.completion_tokens == n


def test_pins_that_cannot_be_served(tokenizer, serve) -> None:
    srv = serve(make_tiny("llama", tokenizer), LIMITS, edits=True)
    with Client(srv.target, timeout=60) as c:
        with pytest.raises(NotFound, match=r"version 3 does not exist \(versions 0\.\.0 exist\)"):
            c.generate_text(PROMPTS[0], max_new_tokens=2, edit_version=3)
        with pytest.raises(NotFound, match="version 9"):
            c.score(PROMPTS[0], CONTINUATIONS, edit_version=9)
        with pytest.raises(NotFound, match=f"version {2**64 - 1} does not exist"):  # the largest uint64
            c.generate_text(PROMPTS[0], max_new_tokens=2, edit_version=2**64 - 1)
        with pytest.raises(NotFound, match="version 9"):
            c.trace_result(PROMPTS[0], "The Eiffel Tower", edit_version=9, samples=1)
        with pytest.raises(InvalidArgument, match="older than min_edit_version"):
            c.generate_text(PROMPTS[0], max_new_tokens=2, edit_version=0, min_edit_version=1)
        with pytest.raises(ValueError, match="edit_version must be >= 0"):
            c.score(PROMPTS[0], CONTINUATIONS, edit_version=-1)
        # the server waited (max_version_wait) and names both versions
        t0 = time.perf_counter()
        with pytest.raises(FailedPrecondition, match=r"min_edit_version 5 is newer than what this server serves "
                                                     r"\(its history up to version 0 is live, 0 is known; head 0\)"):
            c.generate_text(PROMPTS[0], max_new_tokens=2, min_edit_version=5)
        assert time.perf_counter() - t0 >= 0.4
        # the caller's deadline bounds the wait too
        with pytest.raises(GatewayError) as e:
            c.score(PROMPTS[0], CONTINUATIONS, min_edit_version=5, timeout=0.2)
        assert e.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION)
        assert c.generate_text(PROMPTS[0], max_new_tokens=2, min_edit_version=0).edit_version == 0


def test_min_edit_version_waits_for_the_edit(tokenizer, serve) -> None:
    srv = serve(make_tiny("llama", tokenizer), EngineLimits(max_update_norm_ratio=100.0), edits=True, metrics_port=0)
    result: dict[str, object] = {}
    with Client(srv.target, timeout=60) as c:

        def read_my_write() -> None:
            result["out"] = c.generate_text(PROMPTS[0], max_new_tokens=3, min_edit_version=1)

        waiter = threading.Thread(target=read_my_write)
        waiter.start()
        assert wait_until(lambda: srv.engine.waiting_for_version == 1)
        metrics = scrape(srv.metrics_url)
        assert metrics[("romegw_requests_waiting_for_version", ())] == 1
        assert import_layer(c, srv, seed=3) == 1
        waiter.join(timeout=30)
        assert result["out"].edit_version == 1
        c.generate_text(PROMPTS[1], max_new_tokens=2, edit_version=0)
    metrics = scrape(srv.metrics_url)
    assert metrics[("romegw_edit_live_seconds_count", ())] == 1
    assert metrics[("romegw_version_cache_misses_total", ())] >= 1
    assert metrics[("romegw_version_cache_bytes", ())] > 0
    assert ("romegw_streams_by_version", (("version", "pinned"),)) in metrics


def test_a_pinned_version_that_does_not_verify_fails_alone(tokenizer, serve, tmp_path) -> None:
    """A damaged layer of an old version: its pin is FAILED_PRECONDITION (no store path in the message),
    and a stream running beside it is untouched."""
    loaded = make_tiny("llama", tokenizer)
    store = tmp_path / "store"
    srv = serve(loaded, LIMITS, edits=True, edit_store=store)
    with Client(srv.target, timeout=60) as c:
        import_layer(c, srv, seed=4)
        c.revert_edit(to_version=0)
    srv.stop(grace=0.5)
    srv.engine.close()
    srv.engine.edits.activate([], 0)
    (layer,) = (store / "layers").glob("*.safetensors")
    damaged = bytearray(layer.read_bytes())
    damaged[-5] ^= 0xFF
    layer.write_bytes(bytes(damaged))
    srv = serve(loaded, LIMITS, edits=True, edit_store=store)  # serves version 0; version 1's layer is not loaded
    with Client(srv.target, timeout=120) as c:
        alone = c.generate_text(PROMPTS[0], max_new_tokens=200).text
        with ThreadPoolExecutor(1) as pool:
            beside = pool.submit(c.generate_text, PROMPTS[0], max_new_tokens=200)
            with pytest.raises(FailedPrecondition, match="version 1 cannot be served") as e:
                c.generate_text(PROMPTS[1], max_new_tokens=2, edit_version=1)
            assert str(store) not in str(e.value)
            assert beside.result().text == alone
