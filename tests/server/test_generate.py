"""Generate through a real server and the client SDK."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rome_engine.engine import EngineLimits
from romegw_client import Client, DeadlineExceeded, InvalidArgument, ResourceExhausted
from tests.conftest import wait_until


def hf_greedy(loaded, prompt: str, n: int) -> list[int]:
    ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = loaded.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_stream_equals_model_generate(family, request, serve) -> None:
    loaded = request.getfixturevalue(family)
    prompt = "The quick brown fox jumps over"
    expected = hf_greedy(loaded, prompt, 20)
    srv = serve(loaded)
    with Client(srv.target) as c:
        chunks = list(c.generate(prompt, max_new_tokens=20))
    ids = [i for ch in chunks for i in ch.token_ids]
    eos = loaded.tokenizer.eos_token_id
    if eos in expected:  # our stream ends at EOS and does not emit it
        expected = expected[: expected.index(eos)]
    assert ids == expected
    # order: one token per message, and the text is the decoding of the ids
    assert all(len(ch.token_ids) <= 1 for ch in chunks)
    assert "".join(ch.text for ch in chunks) == loaded.tokenizer.decode(ids, skip_special_tokens=True)
    last = chunks[-1]
    assert last.finish_reason in ("length", "eos")
    assert all(ch.finish_reason is None for ch in chunks[:-1])
    assert last.prompt_tokens == len(loaded.tokenizer(prompt)["input_ids"])
    assert last.completion_tokens == len(ids)
    assert last.edit_version == 0


def test_stop_sequence_truncates_and_is_not_sent(tiny_llama, serve) -> None:
    srv = serve(tiny_llama)
    prompt = "One two three"
    with Client(srv.target) as c:
        full = c.generate_text(prompt, max_new_tokens=30)
        assert len(full.text) > 8
        stop = full.text[5:8]  # a stop string that occurs in the greedy completion
        cut = c.generate_text(prompt, max_new_tokens=30, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text


def test_logprobs_and_top_alternatives(tiny_llama, serve) -> None:
    srv = serve(tiny_llama)
    with Client(srv.target) as c:
        out = c.generate_text("Hello there", max_new_tokens=4, logprobs=True, top_logprobs=3)
    assert len(out.tokens) == len(out.token_ids) == 4
    for t in out.tokens:
        assert t.logprob <= 0.0
        assert len(t.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert t.token_id == t.top_logprobs[0].token_id
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)


def test_sampling_is_reproducible_with_a_seed(tiny_llama, serve) -> None:
    srv = serve(tiny_llama)
    with Client(srv.target) as c:
        a = c.generate_text("Once upon", max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, seed=7)
        b = c.generate_text("Once upon", max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, seed=7)
        greedy = c.generate_text("Once upon", max_new_tokens=12)
    assert a.token_ids == b.token_ids
    assert a.token_ids != greedy.token_ids  # a random model at T=1.5 does not sample the argmax 12 times


@pytest.mark.parametrize(
    ("prompt", "params", "fragment"),
    [
        ("", {}, "prompt must not be empty"),
        ("Hi", {"max_new_tokens": -1}, "max_new_tokens must be >= 1"),
        ("Hi", {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ("Hi", {"max_new_tokens": 100_000}, "max_new_tokens=64"),
        ("Hi", {"top_p": 1.5}, "top_p must be in (0, 1]"),
        ("Hi", {"temperature": -0.5}, "temperature"),
        ("Hi", {"top_k": -3}, "top_k"),
        ("Hi", {"top_logprobs": 99}, "top_logprobs"),
        ("word " * 200, {}, "max_prompt_tokens=50"),
    ],
)
def test_bad_generate_input_is_invalid_argument(tiny_llama, serve, prompt, params, fragment) -> None:
    srv = serve(tiny_llama, EngineLimits(max_prompt_tokens=50, max_new_tokens=64))
    with Client(srv.target) as c, pytest.raises(InvalidArgument) as err:
        c.generate_text(prompt, **params)
    assert fragment in err.value.message


def test_prompt_plus_new_tokens_must_fit_the_context(tiny_gpt2, serve) -> None:
    srv = serve(tiny_gpt2, EngineLimits(max_new_tokens=1000))
    with Client(srv.target) as c:
        with pytest.raises(InvalidArgument, match="context length of 256 tokens"):
            c.generate_text("Hi there", max_new_tokens=255)
        assert c.generate_text("Hi there", max_new_tokens=250).finish_reason in ("length", "eos")


def test_cancel_frees_the_stream(tiny_llama, serve) -> None:
    srv = serve(tiny_llama, EngineLimits(max_new_tokens=4000))
    with Client(srv.target) as c:
        stream = c.generate("Count with me:", max_new_tokens=4000)
        first = next(stream)
        assert first.text is not None
        assert srv.engine.active_streams == 1
        stream.close()  # cancels the call
        assert wait_until(lambda: srv.engine.active_streams == 0, timeout=10)
        assert c.model_info().active_streams == 0


def test_deadline_stops_the_work(tiny_llama, serve) -> None:
    srv = serve(tiny_llama, EngineLimits(max_new_tokens=100_000))
    with Client(srv.target) as c, pytest.raises(DeadlineExceeded):
        c.generate_text("Count with me:", max_new_tokens=100_000, timeout=0.5)
    assert wait_until(lambda: srv.engine.active_streams == 0, timeout=10)


def test_concurrent_stream_limit_is_resource_exhausted(tiny_llama, serve) -> None:
    srv = serve(tiny_llama, EngineLimits(max_concurrent_streams=1, max_new_tokens=4000))
    with Client(srv.target) as c:
        running = c.generate("Count with me:", max_new_tokens=4000)
        next(running)
        with pytest.raises(ResourceExhausted) as err:
            c.generate_text("Another", max_new_tokens=2)
        assert "max_concurrent_streams=1" in err.value.message
        running.close()
        assert wait_until(lambda: srv.engine.active_streams == 0)
        assert c.generate_text("Another", max_new_tokens=2).completion_tokens == 2


def test_other_rpcs_answer_during_a_long_generation(tiny_llama, serve) -> None:
    srv = serve(tiny_llama, EngineLimits(max_new_tokens=100_000))
    done = threading.Event()

    def long_stream() -> None:
        with Client(srv.target) as c2:
            for _ in c2.generate("Count with me:", max_new_tokens=100_000):
                if done.is_set():
                    break

    t = threading.Thread(target=long_stream)
    t.start()
    try:
        assert wait_until(lambda: srv.engine.active_streams == 1)
        with Client(srv.target) as c:
            t0 = time.monotonic()
            assert c.health() == "SERVING"
            assert c.model_info().active_streams == 1
            assert c.score("a", [" b"]).scores[0].total_logprob < 0
            assert time.monotonic() - t0 < 10
    finally:
        done.set()
        t.join(timeout=20)


def test_greedy_stream_matches_engine_on_a_thread_pool_while_sampling(tiny_llama, serve) -> None:
    """Concurrent streams do not disturb one another's output."""
    srv = serve(tiny_llama)
    prompts = ["Alpha beta", "Gamma delta epsilon", "One", "The weather today"]
    with Client(srv.target) as c:
        alone = [c.generate_text(p, max_new_tokens=10).token_ids for p in prompts]
    results: dict[int, tuple[int, ...]] = {}

    def run(i: int) -> None:
        with Client(srv.target) as c2:
            results[i] = c2.generate_text(prompts[i], max_new_tokens=10).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[i] for i in range(len(prompts))] == alone
    assert torch.get_num_threads() >= 1
