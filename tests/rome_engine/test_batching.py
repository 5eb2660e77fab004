"""Continuous batching: streams of different lengths joining at different times give the same
tokens as when each runs alone; cancelled rows leave at once; sampling keeps its seed."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from rome_engine.batching import BatchScheduler
from rome_engine.generation import GenerationChunk, SamplingParams, generate_tokens

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog", "A", "One two three four five six seven"]
LENGTHS = [20, 7, 30, 12]


def alone(loaded, prompt: str, params: SamplingParams) -> list[int]:
    ids = loaded.tokenizer(prompt)["input_ids"]
    return [i for c in generate_tokens(loaded, ids, params) for i in c.token_ids]


def collect(q: queue.Queue) -> tuple[list[int], GenerationChunk]:
    ids = []
    while True:
        c = q.get(timeout=60)
        if isinstance(c, BaseException):
            raise c
        ids += c.token_ids
        if c.finish_reason is not None:
            return ids, c


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_batched_greedy_equals_alone_with_staggered_joins(family, request) -> None:
    loaded = request.getfixturevalue(family)
    expected = [alone(loaded, p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, LENGTHS, strict=True)]
    sch = BatchScheduler(loaded, max_batch_size=8)
    try:
        queues = []
        for k, (p, n) in enumerate(zip(PROMPTS, LENGTHS, strict=True)):
            q: queue.Queue = queue.Queue()
            queues.append(q)
            sch.submit(loaded.tokenizer(p)["input_ids"], SamplingParams(max_new_tokens=n), emit=q.put,
                       cancelled=lambda: False)
            time.sleep(0.02 * k)  # join while others are running
        got = [collect(q)[0] for q in queues]
        assert got == expected
        assert max(sch.batch_sizes) >= 2  # they did share forward passes
    finally:
        sch.close()


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_prompts_arriving_together_share_one_prefill(family, request) -> None:
    loaded = request.getfixturevalue(family)
    expected = [alone(loaded, p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, LENGTHS, strict=True)]
    sch = BatchScheduler(loaded, max_batch_size=8)
    try:
        queues = [queue.Queue() for _ in PROMPTS]
        with sch._cond:  # hold the scheduler so that all four are pending at its next step
            for q, p, n in zip(queues, PROMPTS, LENGTHS, strict=True):
                sch.submit(loaded.tokenizer(p)["input_ids"], SamplingParams(max_new_tokens=n), emit=q.put,
                           cancelled=lambda: False)
        got = [collect(q)[0] for q in queues]
        assert sch.prefills == 1  # prompts of 1 to 9 tokens, left-padded into one pass
        assert got == expected
    finally:
        sch.close()


def test_batch_limit_queues_the_rest(tiny_llama) -> None:
    sch = BatchScheduler(tiny_llama, max_batch_size=2)
    try:
        queues = [queue.Queue() for _ in range(5)]
        for q in queues:
            sch.submit(tiny_llama.tokenizer("Hi")["input_ids"], SamplingParams(max_new_tokens=5), emit=q.put,
                       cancelled=lambda: False)
        outs = [collect(q) for q in queues]
        assert all(len(ids) == 5 for ids, _ in outs)
        assert max(sch.batch_sizes) == 2
    finally:
        sch.close()


def test_cancelled_row_leaves_and_others_continue(tiny_llama) -> None:
    sch = BatchScheduler(tiny_llama, max_batch_size=4)
    try:
        stop = threading.Event()
        q1: queue.Queue = queue.Queue()
        q2: queue.Queue = queue.Queue()
        ids = tiny_llama.tokenizer("Count")["input_ids"]
        sch.submit(ids, SamplingParams(max_new_tokens=100_000), emit=q1.put, cancelled=stop.is_set)
        sch.submit(ids, SamplingParams(max_new_tokens=30), emit=q2.put, cancelled=lambda: False)
        q1.get(timeout=30)
        stop.set()
        _, last = collect(q1)
        assert last.finish_reason == "cancelled"
        got, _ = collect(q2)
        assert got == alone(tiny_llama, "Count", SamplingParams(max_new_tokens=30))
        deadline = time.monotonic() + 10
        while sch.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sch.running == 0
    finally:
        sch.close()


def test_sampled_rows_keep_their_own_seeds(tiny_llama) -> None:
    params = [SamplingParams(max_new_tokens=15, temperature=1.2, top_k=40, seed=s) for s in (1, 2, 3)]
    expected = [alone(tiny_llama, "Once upon", p) for p in params]
    sch = BatchScheduler(tiny_llama, max_batch_size=4)
    try:
        queues = []
        for p in params:
            q: queue.Queue = queue.Queue()
            queues.append(q)
            sch.submit(tiny_llama.tokenizer("Once upon")["input_ids"], p, emit=q.put, cancelled=lambda: False)
        assert [collect(q)[0] for q in queues] == expected
    finally:
        sch.close()


def test_a_row_that_fails_to_sample_fails_alone(tiny_llama) -> None:
    """temperature=1e-40 (the engine refuses it; the scheduler does not check) makes sampling raise:
    that row gets its own error, the greedy row decoded beside it finishes normally."""
    expected = alone(tiny_llama, PROMPTS[1], SamplingParams(max_new_tokens=30))
    sch = BatchScheduler(tiny_llama, max_batch_size=8)
    try:
        good: queue.Queue = queue.Queue()
        bad: queue.Queue = queue.Queue()
        ids = tiny_llama.tokenizer(PROMPTS[1])["input_ids"]
        sch.submit(ids, SamplingParams(max_new_tokens=30), emit=good.put, cancelled=lambda: False)
        first = good.get(timeout=60)  # the good row is running: the bad one joins its batch
        sch.submit(ids, SamplingParams(max_new_tokens=30, temperature=1e-40, seed=1), emit=bad.put,
                   cancelled=lambda: False)  # fmt: skip
        error = bad.get(timeout=60)
        assert isinstance(error, BaseException)
        rest, last = collect(good)
        assert first.token_ids + rest == expected
        assert last.finish_reason == "length"
        assert sch.running == 0 or wait_idle(sch)
    finally:
        sch.close()


def wait_idle(sch: BatchScheduler, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and sch.running:
        time.sleep(0.01)
    return sch.running == 0
