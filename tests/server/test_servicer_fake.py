"""The server on a fake engine (no model): status mapping, conversion, auth, limits and the
shape of the streams, each through the real gRPC server and the SDK, in milliseconds."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest

from rome_engine import errors
from rome_engine.engine import TraceProgress
from rome_engine.generation import FINISH_LENGTH, GenerationChunk, TokenAlternative, TokenInfo
from rome_engine.protocol import EngineClient
from rome_engine.records import ApplyOptions, RevertRequest
from rome_engine.rome.request import EditRequest
from rome_engine.scoring import ContinuationScore, TokenScore
from romegw_client import (
    Client,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from romegw_client import TraceProgress as ClientProgress
from romegw_client.types import LayerFile
from romegw_server.auth import TokenTable
from romegw_server.main import ServerConfig, ServerThread
from tests.server.fake_engine import FakeEngine, edit_view

GEN = "generate-token-0123456789abcdef"
EDIT = "edit-token-fedcba9876543210abcd"

Serve = Callable[..., tuple[Client, FakeEngine]]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """``c, fake = serve(**config)``: a fresh fake engine behind a real server, and a client of it."""
    opened: list[tuple[ServerThread, Client]] = []

    def start(fake: FakeEngine | None = None, token: str | None = None, **config: object) -> tuple[Client, FakeEngine]:
        fake = fake or FakeEngine()
        srv = ServerThread(fake, ServerConfig(host="127.0.0.1", port=0, **config)).start()
        client = Client(srv.target, timeout=10, token=token)
        opened.append((srv, client))
        return client, fake

    yield start
    for srv, client in opened:
        client.close()
        srv.stop(grace=0)


def test_the_fake_implements_the_protocol() -> None:
    assert isinstance(FakeEngine(), EngineClient)  # the real Engine: tests/rome_engine/test_protocol.py


# -- status mapping


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (errors.InvalidRequest("top_p must be in (0, 1]"), InvalidArgument),
        (errors.NotFound("no edit 'x'"), NotFound),
        (errors.FailedPrecondition("expected version 3, head is 4"), FailedPrecondition),
        (errors.ResourceExhausted("max_concurrent_traces=2 reached"), ResourceExhausted),
        (errors.Unavailable("the engine is shutting down"), Unavailable),
        (errors.UnsupportedModel("family 'bert' is not supported"), FailedPrecondition),
    ],
)
def test_engine_errors_become_their_status_with_their_message(serve: Serve, error: Exception, expected: type) -> None:
    c, fake = serve()
    for method, call in (
        ("score", lambda: c.score("p", ["a"])),  # unary
        ("generate", lambda: c.generate_text("p")),  # a stream, before its first chunk
        ("trace", lambda: c.trace_result("The Eiffel Tower is", "Eiffel Tower")),
        ("get_edit", lambda: c.get_edit("x")),
    ):
        fake.errors[method] = error
        with pytest.raises(expected) as caught:
            call()
        assert caught.value.message == str(error), method


def test_a_bug_is_internal_with_a_reference_and_no_detail(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    c, fake = serve()
    fake.errors["score"] = KeyError("secret internal detail")
    with caplog.at_level(logging.ERROR), pytest.raises(Internal) as caught:
        c.score("p", ["a"])
    assert "internal error (ref " in caught.value.message and "secret" not in caught.value.message
    ref = caught.value.message.split("ref ")[1].split(")")[0]
    assert any(ref in r.getMessage() and r.exc_info for r in caplog.records)  # the traceback is in the log


def test_a_long_error_message_is_cut_in_its_middle(serve: Serve) -> None:
    c, fake = serve()
    fake.errors["score"] = errors.InvalidRequest("prompt " + "x" * 10_000 + " is too long: shorten it")
    with pytest.raises(InvalidArgument) as caught:
        c.score("p", ["a"])
    message = caught.value.message
    assert len(message) < 1100 and "chars cut" in message
    assert message.startswith("prompt xxx") and message.endswith("is too long: shorten it")


def test_an_error_in_the_middle_of_a_stream_ends_it_with_its_status(serve: Serve) -> None:
    c, fake = serve()
    fake.chunks = [GenerationChunk("Hel", [1]), errors.Unavailable("the engine is shutting down")]
    received = []
    with pytest.raises(Unavailable, match="shutting down"):
        for chunk in c.generate("p"):
            received.append(chunk.text)
    assert received == ["Hel"]


# -- conversion and stream shapes


def test_generate_params_defaults_and_stream_shape(serve: Serve) -> None:
    c, fake = serve()
    alt = (TokenAlternative(5, " lo", -0.5), TokenAlternative(6, " la", -1.5))
    fake.chunks = [
        GenerationChunk("Hel", [4], [TokenInfo(4, "Hel", -0.25, alt)], edit_version=3),
        GenerationChunk("lo", [5], [TokenInfo(5, "lo", -0.5)], FINISH_LENGTH, prompt_tokens=7, completion_tokens=2,
                        edit_version=3),
    ]  # fmt: skip
    chunks = list(c.generate("Say", max_new_tokens=2, temperature=0.7, top_p=0.9, top_k=5, seed=11, stop=["\n"],
                             top_logprobs=2))  # fmt: skip
    prompt, params = fake.given("generate")[0]
    assert prompt == "Say"
    assert (params.max_new_tokens, params.top_k, params.seed, params.stop) == (2, 5, 11, ("\n",))
    assert (params.temperature, params.top_p) == pytest.approx((0.7, 0.9))  # float32 on the wire
    assert params.logprobs and params.top_logprobs == 2
    assert [(x.text, x.token_ids, x.finish_reason) for x in chunks] == [("Hel", (4,), None), ("lo", (5,), "length")]
    assert (chunks[0].prompt_tokens, chunks[0].completion_tokens) == (0, 0)  # usage only on the last chunk
    assert (chunks[1].prompt_tokens, chunks[1].completion_tokens, chunks[1].edit_version) == (7, 2, 3)
    first = chunks[0].tokens[0]
    assert (first.token_id, first.text, first.logprob) == (4, "Hel", -0.25)
    assert [(a.token_id, a.text, a.logprob) for a in first.top_logprobs] == [(5, " lo", -0.5), (6, " la", -1.5)]
    assert chunks[1].tokens[0].top_logprobs == ()

    c.generate_text("Say")  # unset fields take the engine's defaults
    _, params = fake.given("generate")[1]
    assert params.max_new_tokens == fake.limits.default_max_new_tokens
    assert (params.temperature, params.top_p, params.top_k, params.seed, params.logprobs) == (0.0, 1.0, 0, None, False)


def test_score_and_model_info(serve: Serve) -> None:
    c, fake = serve()
    fake.edit_version = 4
    fake.scores = [ContinuationScore(" Paris", -1.5, -0.75, (TokenScore(1, " Par", -1.0), TokenScore(2, "is", -0.5)))]
    result = c.score("The capital is", [" Paris"])
    assert fake.given("score") == [("The capital is", [" Paris"])]
    assert result.edit_version == 4
    (s,) = result.scores
    assert (s.continuation, s.total_logprob, s.mean_logprob) == (" Paris", -1.5, -0.75)
    assert [(t.token_id, t.text, t.logprob) for t in s.tokens] == [(1, " Par", -1.0), (2, "is", -0.5)]
    info = c.model_info()
    assert (info.model_id, info.family, info.architecture, info.num_layers, info.head_version) == (
        "fake-model", "llama", "FakeForCausalLM", 2, 4
    )  # fmt: skip
    assert info.max_new_tokens == fake.limits.max_new_tokens and info.max_prompt_tokens == 255
    assert info.server_version == "0.0-fake" and info.load_seconds == 0.5


def test_version_pins_reach_the_engine_and_model_info_lists_versions_in_use(serve: Serve) -> None:
    c, fake = serve()
    c.generate_text("Hi", edit_version=3, min_edit_version=2, timeout=30)
    c.score("Hi", [" there"])
    list(c.trace("The Eiffel Tower is", "Eiffel Tower", edit_version=0))
    generate_pin, score_pin, trace_pin = fake.given("pin")
    assert (generate_pin.edit_version, generate_pin.min_edit_version) == (3, 2)
    # the caller's time left bounds a wait; gRPC carries the deadline as a rounded timeout header and the
    # server reads its own clock, so the server's time left may exceed the client's 30 s by a little (CI saw 30.1)
    assert generate_pin.wait_seconds is not None and 20 < generate_pin.wait_seconds < 31
    assert (score_pin.edit_version, score_pin.min_edit_version) == (None, None)  # unset: the head
    assert (trace_pin.edit_version, trace_pin.min_edit_version) == (0, None)  # 0 is a version (the base)
    fake.known_version, fake.in_use = 7, {5: 2, 7: 1}
    info = c.model_info()
    assert (info.known_version, info.versions_in_use) == (7, {7: 1, 5: 2})


def test_trace_progress_then_result(serve: Serve) -> None:
    c, fake = serve()
    events = list(c.trace("The Eiffel Tower is", "Eiffel Tower", kind="mlp", window=4))
    request = fake.given("trace")[0]
    assert (request.kind, request.window, request.samples, request.seed, request.answer, request.noise) == (
        "mlp", 4, 10, 0, None, None
    )  # fmt: skip
    assert [(e.done, e.total, e.message) for e in events[:-1]] == [
        (2, 8, "2/8 cells restored"), (8, 8, "8/8 cells restored")
    ]  # fmt: skip
    assert all(isinstance(e, ClientProgress) for e in events[:-1])
    r = events[-1]
    assert r.tokens == ("The", " Eiffel", " Tower", " is") and r.subject_range == (1, 3)
    assert (r.answer, r.answer_token_id, r.kind, r.num_layers, r.samples) == (" Paris", 42, "mlp", 2, 10)
    assert [[round(x, 4) for x in row] for row in r.scores] == [[0.0, 0.1], [0.2, 0.3], [0.4, 0.5], [0.6, 0.7]]
    fake.trace_events = [TraceProgress(1, 4), errors.ResourceExhausted("max_trace_cells")]
    with pytest.raises(ResourceExhausted):
        list(c.trace("The Eiffel Tower is", "Eiffel Tower"))


def test_apply_edit_request_and_layer(serve: Serve) -> None:
    c, fake = serve()
    r = c.apply_edit("{} lives in", "Person 1", " City1", layer=2, hparams={"v_lr": 0.5}, expected_version=0,
                     author="alice", comment="why", force=True)  # fmt: skip
    (request,), options = fake.given("apply_edits")[0]
    assert request == EditRequest(prompt="{} lives in", subject="Person 1", target=" City1", layer=2,
                                  hparams={"v_lr": 0.5})  # fmt: skip
    assert options == ApplyOptions(dry_run=False, expected_version=0, author="alice", comment="why", force=True)
    assert (r.head_version, r.dry_run) == (1, False)
    e = r.edit
    assert (e.edit_id, e.version, e.parent_version, e.author, e.comment, e.active) == ("e1", 1, 0, "alice", "why", True)
    assert (e.prompt, e.subject, e.target, e.layer) == ("{} lives in", "Person 1", " City1", 2)
    assert e.matrices == (("model.layers.2.mlp.down_proj.weight", (64, 128), 1.5),)
    assert (e.target_before, e.target_after, e.old_object) == (0.01, 0.9, " Rome")
    assert e.header["facts"][0]["hparams"] == {"v_lr": 0.5, "clamp_norm_factor": 4}  # header_json carries all

    dry = c.apply_edit("{} lives in", "Person 2", " City2")
    _, options = fake.given("apply_edits")[1]
    assert options.expected_version is None and options.force is False
    dry = c.apply_edit("{} lives in", "Person 2", " City2", dry_run=True)
    assert dry.dry_run and not dry.edit.active and dry.head_version == 2


def test_min_target_prob_is_the_requests_or_the_servers(serve: Serve) -> None:
    """The fake's edits reach P(target) 0.9: a dry run reports whether the threshold would refuse it."""
    c, fake = serve()
    r = c.apply_edit("{} lives in", "P", " C", dry_run=True)
    assert (r.min_target_prob, r.below_min_target_prob) == (0.0, False)  # the server's default here
    r = c.apply_edit("{} lives in", "P", " C", dry_run=True, min_target_prob=0.95)
    assert (r.min_target_prob, r.below_min_target_prob) == (0.95, True)
    assert fake.given("apply_edits")[-1][1].min_target_prob == 0.95
    for bad in (float("nan"), -0.1, 1.5):
        with pytest.raises(InvalidArgument, match="min_target_prob must be a probability"):
            c.apply_edit("{} lives in", "P", " C", min_target_prob=bad)


def test_revert_list_get_export_import(serve: Serve) -> None:
    c, fake = serve()
    fake.views = [edit_view("b", 2), edit_view("a", 1, active=False)]
    fake.edit_version = 2
    r = c.revert_edit(to_version=1, author="bob")
    assert fake.given("revert_edit")[0] == RevertRequest(to_version=1, edit_id=None, author="bob", comment="")
    assert (r.head_version, r.removed_edit_ids, r.seconds) == (1, ("b",), 0.125)
    c.revert_edit(edit_id="b")
    assert fake.given("revert_edit")[1].edit_id == "b"

    assert [e.edit_id for e in c.list_edits().edits] == ["b"]
    assert [e.edit_id for e in c.list_edits(include_inactive=True).edits] == ["b", "a"]
    assert c.get_edit("a").version == 1

    fake.edit_version = 2
    files = c.export_edits(from_version=0)
    assert fake.given("export_edits") == [(0, None)]
    assert [(f.filename, f.version, f.edit_id, f.sha256) for f in files] == [
        ("a.safetensors", 1, "a", "ab" * 32), ("b.safetensors", 2, "b", "ab" * 32)
    ]  # fmt: skip
    c.export_edits(from_version=1, to_version=1)
    assert fake.given("export_edits")[1] == (1, 1)

    sent = [LayerFile("x.safetensors", b'{"edit_id": "x"}', 7, "x", ""),
            LayerFile("y.safetensors", b'{"edit_id": "y"}', 8, "y", "ff")]  # fmt: skip
    imported = c.import_edits(sent)
    assert fake.given("import_edits") == [[(b'{"edit_id": "x"}', None), (b'{"edit_id": "y"}', "ff")]]
    assert [(e.edit_id, e.version) for e in imported] == [("x", 3), ("y", 4)]


def test_list_edits_pages_by_count(serve: Serve) -> None:
    c, fake = serve()
    fake.views = [edit_view(f"e{v}", v) for v in range(5, 0, -1)]
    ids, token, pages = [], "", 0
    while True:
        page = c.list_edits(page_size=2, page_token=token)
        ids += [e.edit_id for e in page.edits]
        pages, token = pages + 1, page.next_page_token
        if not token:
            break
    assert (ids, pages) == (["e5", "e4", "e3", "e2", "e1"], 3)
    assert len(c.list_edits().edits) == 5  # page_size 0: the default (50)
    for bad in ({"page_size": 1001}, {"page_token": "not-a-number"}):
        with pytest.raises(InvalidArgument):
            c.list_edits(**bad)


def test_list_edits_pages_by_bytes_and_echoes_old_long_texts_clipped(serve: Serve) -> None:
    c, fake = serve(max_page_bytes=3000)
    fake.views = [edit_view(f"e{v}", v, comment="c" * 1200) for v in range(4, 0, -1)]
    first = c.list_edits(page_size=10)
    assert 1 <= len(first.edits) < 4 and first.next_page_token == str(len(first.edits))
    fake.views = [edit_view("big", 1, author="a" * 5000, comment="c" * 9000)]  # stored before the limits
    (only,) = c.list_edits(page_size=10).edits  # over the byte budget alone: still one per page
    assert only.author == "a" * 256 + "...[4744 more chars]" and only.comment.startswith("c" * 4096 + "...[")
    assert only.header["author"] == only.author  # header_json echoes the clipped texts too
    assert c.get_edit("big").author == only.author


# -- limits


def test_stored_strings_are_checked_before_the_engine_computes(serve: Serve) -> None:
    c, fake = serve()
    for options, field in (({"author": "a" * 257}, "author"), ({"comment": "c" * 4097}, "comment")):
        with pytest.raises(InvalidArgument, match=field):
            c.apply_edit("{} lives in", "S", " T", **options)
        with pytest.raises(InvalidArgument, match=field):
            c.revert_edit(to_version=0, **options)
    with pytest.raises(InvalidArgument, match="max_edit_chars"):
        c.apply_edit("{} lives in", "S" * (fake.limits.max_edit_chars + 1), " T")
    assert fake.given("apply_edits") == [] and fake.given("revert_edit") == []


# -- auth


def test_roles_are_an_allow_list(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    table = TokenTable([("generate", GEN, "frontend"), ("edit", EDIT, "alice")])
    c, fake = serve(tokens=table)
    with pytest.raises(Unauthenticated, match="missing"):
        c.score("p", ["a"])
    assert c.health() == "SERVING"  # health needs no token
    target = f"127.0.0.1:{c.target.rsplit(':', 1)[1]}"
    with Client(target, token="wrong-token-0000000000") as wrong, pytest.raises(Unauthenticated, match="unknown"):
        wrong.score("p", ["a"])
    with Client(target, token=GEN) as gen:
        assert gen.generate_text("p").text == "ok"
        for call in (lambda: gen.apply_edit("{} lives in", "S", " T"), gen.export_edits,
                     lambda: gen.revert_edit(to_version=0)):  # fmt: skip
            with pytest.raises(PermissionDenied, match="'edit' role"):
                call()
    assert fake.given("apply_edits") == []
    with caplog.at_level(logging.INFO, logger="romegw.audit"), Client(target, token=EDIT) as edit:
        edit.apply_edit("{} lives in", "S", " T")
    assert any("who=alice what=ApplyEdit version_before=0 version_after=1" in r.getMessage() for r in caplog.records)
    with grpc.insecure_channel(target) as ch:  # an RPC no role names: refused before it is looked up
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/romegw.v1.RomeGateway/NewThing")(b"", metadata=(("authorization", f"Bearer {EDIT}"),))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_malformed_request_bytes_are_invalid_argument(serve: Serve) -> None:
    c, fake = serve()
    target = f"127.0.0.1:{c.target.rsplit(':', 1)[1]}"
    with grpc.insecure_channel(target) as ch, pytest.raises(grpc.RpcError) as err:
        ch.unary_unary("/romegw.v1.RomeGateway/Score")(b"\xff\xff\xff", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fake.given("score") == []


def test_metrics_come_from_the_engine_interface() -> None:
    fake = FakeEngine(edit_version=3, active_layers=2)
    with ServerThread(fake, ServerConfig(host="127.0.0.1", port=0, metrics_port=0)) as srv:
        with Client(srv.target, timeout=10) as c:
            c.score("p", ["a"])
        text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    assert 'model_id="fake-model"' in text and 'device="cpu"' in text  # from engine.info()
    assert "romegw_model_load_seconds 0.5" in text
    assert "romegw_edit_head_version 3.0" in text and "romegw_edit_active_layers 2.0" in text
    assert 'romegw_rpc_requests_total{code="OK",method="Score"} 1.0' in text


def test_a_client_that_reads_its_writes_sends_its_newest_version(serve: Serve) -> None:
    first, fake = serve()
    with Client(first.target, read_your_writes=True) as c, Client(first.target) as plain:
        c.generate_text("Hi")  # nothing written yet: no floor
        c.apply_edit("{} lives in", "Person 1", " City1", dry_run=True)  # a dry run writes nothing
        c.score("Hi", [" there"])
        r = c.apply_edit("{} lives in", "Person 1", " City1")
        assert c.written_version == r.head_version == 1
        c.generate_text("Hi")
        c.score("Hi", [" there"])
        list(c.trace("The Eiffel Tower is", "Eiffel Tower"))
        c.generate_text("Hi", edit_version=0)  # an explicit pin wins
        plain.generate_text("Hi")  # opt-in per client
    pins = [(p.edit_version, p.min_edit_version) for p in fake.given("pin")]
    assert pins == [(None, None), (None, None), (None, 1), (None, 1), (None, 1), (0, None), (None, None)]
