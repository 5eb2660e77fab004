"""ImportEdits against hostile layer files, through a live server and the client SDK (raw gRPC
where the SDK refuses the input): every malformed or unfit file is refused before anything is
written, nothing lands outside ``layers/``, the head and the served answers stay as they were,
the stream is bounded, and a server starts on a read-only store."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
import threading
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_save

from rome_engine.engine import EngineLimits
from romegw_client import Client
from romegw_client.errors import FailedPrecondition, GatewayError, InvalidArgument, ResourceExhausted
from romegw_client.pb import gateway_pb2 as pb
from romegw_client.pb import gateway_pb2_grpc as pb_grpc
from tests.conftest import wait_until
from tests.server.layer_files import encode, layer_file, layer_parts

PROMPT = "The Eiffel Tower is located in"
SOME_ID = uuid.UUID("abcdef01-2345-4678-9abc-def012345678")


# ------------------------------------------------------------------ layer files


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ a live server


class Live:
    """A server on a private tiny llama, its store at ROOT/data/edits beside ROOT/data/cache/models."""

    def __init__(self, srv, root: Path) -> None:
        self.srv, self.root = srv, root
        self.manager = srv.engine.edits
        self.client = Client(srv.target, timeout=60)
        self.greedy = self.answer()

    def answer(self) -> str:
        return self.client.generate_text(PROMPT, max_new_tokens=8, temperature=0.0).text

    def parts(self, **kw: object) -> tuple[dict, dict[str, torch.Tensor]]:
        return layer_parts(self.manager.loaded, self.manager.weights, **kw)

    def state(self) -> tuple:
        return self.srv.engine.edit_version, tree(self.root)

    def assert_unchanged(self, before: tuple) -> None:
        assert self.state() == before, "a refused import changed the head or the files"
        assert self.answer() == self.greedy, "a refused import changed the served answers"


@pytest.fixture(scope="module")
def live(tokenizer, tmp_path_factory):
    from romegw_server.main import ServerConfig, ServerThread, build_engine
    from tests.conftest import make_tiny

    root = tmp_path_factory.mktemp("container")
    cache_model = root / "data" / "cache" / "models" / "SmolLM2-135M-Instruct"
    cache_model.mkdir(parents=True)
    (cache_model / "model.safetensors").write_bytes(b"the converted model")
    limits = EngineLimits(max_prompt_tokens=48, max_new_tokens=8, max_import_files=3, max_import_bytes=200_000)
    config = ServerConfig(host="127.0.0.1", port=0, limits=limits, edit_store=root / "data" / "edits",
                          cache_dir=root / "data" / "cache")
    engine = build_engine(make_tiny("llama", tokenizer), config)
    srv = ServerThread(engine, config).start()
    live = Live(srv, root)
    yield live
    live.client.close()
    srv.stop(grace=0.5)
    engine.close()


def refused(live: Live, content: bytes, error: type = InvalidArgument) -> str:
    """Import ``content``; it must be refused with ``error`` and change nothing. Returns the message."""
    before = live.state()
    with pytest.raises(error) as e:
        live.client.import_edits([layer_file(content)])
    live.assert_unchanged(before)
    return str(e.value)


# ------------------------------------------------------------------ tests


def test_a_valid_layer_imports(live) -> None:
    """The control: the files the other tests break are accepted when intact."""
    header, tensors = live.parts(seed=1)
    imported = live.client.import_edits([layer_file(encode(header, tensors))])
    assert [e.edit_id for e in imported] == [header["edit_id"]]
    assert (live.root / "data" / "edits" / "layers" / f"{header['edit_id']}.safetensors").exists()
    live.client.revert_edit(to_version=0)
    assert live.answer() == live.greedy


@pytest.mark.parametrize(
    "edit_id",
    [
        "../../cache/models/SmolLM2-135M-Instruct/model",
        "../../model/model",
        "/tmp/romegw-absolute",
        f"./{SOME_ID}",
        str(SOME_ID).upper(),
        f"{SOME_ID}/../../x",
    ],
)
def test_an_edit_id_is_never_a_path(live, edit_id) -> None:
    header, tensors = live.parts()
    header["edit_id"] = edit_id
    message = refused(live, encode(header, tensors))
    assert "edit_id must be a UUID" in message
    assert not Path("/tmp/romegw-absolute.safetensors").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_non_finite_or_huge_factors_are_refused(live, value) -> None:
    header, tensors = live.parts()
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], value)
    message = refused(live, encode(header, tensors), InvalidArgument if value != 1e30 else FailedPrecondition)
    assert "NaN or infinite" in message or "max_update_norm_ratio=1.0" in message


def test_an_update_larger_than_its_matrix_is_refused(live) -> None:
    header, tensors = live.parts(scale=1.0)  # finite, but ||u v^T|| is many times ||W||
    message = refused(live, encode(header, tensors), FailedPrecondition)
    assert "over the limit max_update_norm_ratio=1.0" in message


def test_a_factor_may_only_touch_an_mlp_output_projection(live) -> None:
    weights, loaded = live.manager.weights, live.manager.loaded
    name = "model.embed_tokens.weight"
    out_dim, in_dim = weights.parameter(name).shape
    header, _ = live.parts()
    u, v = torch.randn(out_dim) * 1e-3, torch.randn(in_dim) * 1e-3
    header["matrices"] = [{"name": name, "shape": [out_dim, in_dim], "update_norm": float(u.norm() * v.norm())}]
    header["base_fingerprint"] = weights.fingerprint([name]).to_json()
    assert loaded.model_id == header["base_fingerprint"]["model_id"]
    message = refused(live, encode(header, {f"{name}.u": u, f"{name}.v": v}), FailedPrecondition)
    assert "not a matrix edits may change" in message


def _drop(key: str):
    return lambda h, t: h.pop(key)


def _set(key: str, value: object):
    return lambda h, t: h.__setitem__(key, value)


def _reshape_u(h: dict, t: dict) -> None:
    name = next(k for k in t if k.endswith(".u"))
    t[name] = t[name].reshape(-1, 1)  # right element count, wrong shape


def _transpose_dims(h: dict, t: dict) -> None:
    m = h["matrices"][0]
    m["shape"] = m["shape"][::-1]  # the factors no longer fit the listed shape


MALFORMED = {
    "no base_fingerprint": _drop("base_fingerprint"),
    "fingerprint lists no matrices": lambda h, t: h["base_fingerprint"].__setitem__("matrices", {}),
    "version abc": _set("version", "abc"),
    "matrices [{}]": _set("matrices", [{}]),
    "probability not a number": lambda h, t: h["probabilities"].__setitem__("target_after", "high"),
    "edit_id a list": _set("edit_id", ["a"]),
    "edit_id a number": _set("edit_id", 7),
    "no request": _drop("request"),
    "u reshaped to (N, 1)": _reshape_u,
    "shape not the factors'": _transpose_dims,
    "header a list": lambda h, t: (h.clear(), h.__setitem__("format_version", [1])),
    "author over its limit": _set("author", "a" * 300),
    "layer past int32": _set("layer", 2**40),
    "a lone surrogate in the subject": lambda h, t: h["request"].__setitem__("subject", "\udc80"),
    "an hparam past float": lambda h, t: h["request"]["hparams"].__setitem__("v_lr", 10**400),
    "float64 factors": lambda h, t: t.update({k: x.double() for k, x in t.items()}),
    "an extra tensor": lambda h, t: t.__setitem__("lm_head.weight.u", torch.zeros(3)),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_header_is_invalid_argument_and_changes_nothing(live, case) -> None:
    header, tensors = live.parts()
    MALFORMED[case](header, tensors)
    message = refused(live, encode(header, tensors), InvalidArgument)
    assert "not a valid layer file" in message


def test_a_bad_second_file_leaves_the_first_unstored(live) -> None:
    good_header, good = live.parts(seed=2)
    bad_header, bad = live.parts(seed=3)
    bad_header["matrices"] = [{}]
    before = live.state()
    with pytest.raises(InvalidArgument):
        live.client.import_edits([layer_file(encode(good_header, good)), layer_file(encode(bad_header, bad))])
    live.assert_unchanged(before)


def test_the_import_stream_is_bounded(live) -> None:
    files = [layer_file(encode(*live.parts(seed=10 + i))) for i in range(4)]
    before = live.state()
    with pytest.raises(ResourceExhausted, match="max_import_files=3"):
        live.client.import_edits(files)
    live.assert_unchanged(before)


def test_a_junk_stream_is_refused_at_its_first_message(live) -> None:
    """60 messages of 150 kB junk (each under the byte limit): the server refuses the first one as it
    arrives, and stops reading, instead of holding all of them in memory before checking any."""

    def messages():
        for _ in range(60):
            yield pb.EditLayerFile(filename="junk.safetensors", content=os.urandom(1000) * 150)

    before = live.state()
    channel = grpc.insecure_channel(live.srv.target)
    with pytest.raises(grpc.RpcError) as e:
        pb_grpc.RomeGatewayStub(channel).ImportEdits(messages(), timeout=60)
    channel.close()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert e.value.details().startswith("layer file 1 of the import:"), e.value.details()
    # (how many messages the client had queued by then is gRPC's flow control, not the server's doing)
    live.assert_unchanged(before)


def test_the_import_byte_limit(live) -> None:
    """Valid files past max_import_bytes (200 kB here): refused naming the limit, nothing stored."""
    header, tensors = live.parts()
    header["request"]["prompt"] = "p" * 90_000  # a valid header of ~90 kB
    files = [layer_file(encode({**header, "edit_id": str(uuid.uuid4())}, tensors)) for _ in range(3)]
    before = live.state()
    with pytest.raises(ResourceExhausted, match="max_import_bytes=200000"):
        live.client.import_edits(files)
    live.assert_unchanged(before)


# ------------------------------------------------------------------ fuzz

_junk = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                             max_size=2),
)
_paths = st.sampled_from(["../x", "/abs", "./a", "..", "", "a/b", "layers/../../z", "\x00"])
_required = ["format_version", "edit_id", "version", "parent_version", "request", "matrices", "base_fingerprint"]


def _bad_for(key: str) -> st.SearchStrategy:
    """A value that is never valid for the header field ``key``."""
    if key in ("version", "parent_version", "format_version"):
        return st.one_of(st.text(max_size=4), st.integers(-5, -1), st.floats(), st.none(), st.lists(st.integers()))
    if key == "edit_id":
        return st.one_of(_paths, st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2),
                         st.uuids().map(lambda u: str(u).upper()))
    return st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=1))


@st.composite
def mutations(draw):
    """(a description, a function that breaks a valid (header, tensors) pair for sure)."""
    kind = draw(st.sampled_from(["drop", "field", "nested", "tensor_value", "tensor_shape", "tensor_dtype",
                                 "tensor_name", "matrix", "junk_header", "extreme"]))
    if kind == "drop":
        key = draw(st.sampled_from(_required))
        return kind, lambda h, t: h.pop(key)
    if kind == "field":
        key = draw(st.sampled_from(_required))
        value = draw(_bad_for(key))
        return f"{kind} {key}={value!r}", lambda h, t: h.__setitem__(key, value)
    if kind == "nested":
        path = draw(st.sampled_from([("request", "subject"), ("request", "layer"), ("base_fingerprint", "matrices"),
                                     ("probabilities", "target_after")]))
        value = draw(st.one_of(st.none(), st.lists(st.integers(), max_size=1), st.just(float("nan")),
                               st.just(-1), st.just(2.5) if path[1] == "target_after" else st.nothing()))
        return f"{kind} {path}={value!r}", lambda h, t: h[path[0]].__setitem__(path[1], value)
    if kind == "tensor_value":
        value = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30]))
        side = draw(st.sampled_from(["u", "v"]))
        return f"{kind} {side}={value}", lambda h, t: _fill(t, side, value)
    if kind == "tensor_shape":
        extra = draw(st.sampled_from([(1,), (-1, 1), (1, -1), "truncate", "grow"]))
        side = draw(st.sampled_from(["u", "v"]))
        return f"{kind} {side} {extra}", lambda h, t: _reshape(t, side, extra)
    if kind == "tensor_dtype":
        dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8]))
        return f"{kind} {dtype}", lambda h, t: t.update({k: x.to(dtype) for k, x in t.items()})
    if kind == "tensor_name":
        name = draw(st.sampled_from(["model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.up_proj.weight",
                                     "../../x", "model.layers.99.mlp.down_proj.weight", "a"]))
        return f"{kind} {name}", lambda h, t: _rename(h, t, name)
    if kind == "matrix":
        m = draw(st.one_of(st.just({}), st.just([]), st.just(None), st.fixed_dictionaries(
            {"name": st.text(max_size=5), "shape": st.lists(st.integers(-2, 2), max_size=3)})))
        return f"{kind} {m!r}", lambda h, t: h.__setitem__("matrices", [m])
    if kind == "extreme":  # the right type, a value no API field can carry
        where, value = draw(st.sampled_from(_EXTREME))
        return f"{kind} {where}={value!r}", lambda h, t: _put(h, where, value)
    value = draw(_junk)
    return f"{kind} {value!r}", lambda h, t: (h.clear(), h.__setitem__("x", value))


_EXTREME = [
    *((w, v) for w in ("layer", "request.layer") for v in (2**31, 2**64, -1)),
    *((w, v) for w in ("version", "parent_version") for v in (2**64, 10**400)),
    *((w, "\ud800 lone surrogate") for w in ("author", "comment", "request.subject", "probabilities.old_object",
                                              "request.hparams.note")),
    ("request.hparams.v_lr", 10**400),
    ("created_at", "t" * 300),
]


def _put(h: dict, where: str, value: object) -> None:
    *path, key = where.split(".")
    for p in path:
        h = h[p]
    h[key] = value


def _side(t: dict, side: str) -> str:
    return next(k for k in t if k.endswith(f".{side}"))


def _fill(t: dict, side: str, value: float) -> None:
    k = _side(t, side)
    t[k] = t[k].clone()
    t[k][0] = value


def _reshape(t: dict, side: str, how: object) -> None:
    k = _side(t, side)
    x = t[k]
    if how == "truncate":
        t[k] = x[:-1].clone()
    elif how == "grow":
        t[k] = torch.cat([x, x[:1]])
    else:
        t[k] = x.reshape(*how) if how != (1,) else x[:1].clone()


def _rename(h: dict, t: dict, name: str) -> None:
    old = _side(t, "u").removesuffix(".u")
    t[f"{name}.u"], t[f"{name}.v"] = t.pop(f"{old}.u"), t.pop(f"{old}.v")
    if name != old:
        h["matrices"][0]["name"] = name
        h["base_fingerprint"]["matrices"] = {name: h["base_fingerprint"]["matrices"].pop(old)}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(mutations(), min_size=1, max_size=3))
def test_fuzz_import_of_mutated_layer_files(live, muts) -> None:
    before = live.state()
    header, tensors = live.parts(seed=5)
    for _, mutate in muts:
        # an earlier mutation may have removed what this one changes: the file is broken already
        with contextlib.suppress(KeyError, TypeError, AttributeError, IndexError, StopIteration, RuntimeError):
            mutate(header, tensors)
    try:
        content = encode(header, tensors)
    except Exception:  # safetensors cannot write this one: send raw junk of the same kind
        content = json.dumps(header, default=str).encode()
    channel = grpc.insecure_channel(live.srv.target)
    try:
        pb_grpc.RomeGatewayStub(channel).ImportEdits(iter([pb.EditLayerFile(content=content)]), timeout=60)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details()
    finally:
        channel.close()
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), (
        [d for d, _ in muts], code, details)
    assert live.state() == before, [d for d, _ in muts]
    assert live.answer() == live.greedy


# ------------------------------------------------------------------ a read-only store


def test_a_server_starts_on_a_read_only_store_with_a_stray_file(tiny_llama, serve, tmp_path, monkeypatch) -> None:
    """A stray file in layers/ and an unverifiable head on a store nothing can be written to:
    the server starts with warnings and serves the newest consistent version."""
    from rome_engine.edit_store import EditStore
    from rome_engine.editing import EditManager

    store = tmp_path / "edits"
    manager = EditManager(tiny_llama, EditStore(store, tiny_llama.model_id), compute=lambda *_: None)
    layers = []
    for seed in (1, 2):
        header, tensors = layer_parts(tiny_llama, manager.weights, seed=seed)
        from rome_engine.edit_store import decode_layer

        layer = decode_layer(encode(header, tensors))
        entry = manager.store_layer(layer)
        manager.activate(entry.active, entry.version)
        layers.append(layer)
    manager.activate([], 0)
    (store / "layers" / f"{layers[1].edit_id}.safetensors").write_bytes(b"damaged")  # head: unverifiable
    (store / "layers" / f"{uuid.uuid4()}.safetensors").write_bytes(b"stray")
    (store / "layers" / ".x.safetensors.tmp").write_bytes(b"stray temp")
    before = tree(store)

    real_unlink, real_mkstemp = os.unlink, tempfile.mkstemp

    def read_only(path: object) -> bool:
        return str(path).startswith(str(store))

    def unlink(path, *a, **kw):
        if read_only(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_unlink(path, *a, **kw)

    def mkstemp(*a, dir=None, **kw):
        if read_only(dir):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkstemp(*a, dir=dir, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    srv = serve(tiny_llama, edits=True, edit_store=store)
    with Client(srv.target, timeout=60) as c:
        assert c.model_info().head_version == 1  # version 2's layer is damaged: version 1 is served
        assert c.generate_text(PROMPT, max_new_tokens=4, temperature=0.0).text is not None
    assert srv.engine.edits.active == [layers[0].edit_id]
    assert tree(store) == before  # nothing written, nothing removed


# ------------------------------------------------------------------ found by the review of the fix


def test_a_bulky_header_is_refused(live) -> None:
    """A header that fits the message limit but would make every later ListEdits reply huge, or
    that carries text as hyperparameters, is refused before anything is stored."""
    header, tensors = live.parts(seed=5)
    header["junk"] = header["junk2"] = "\u00e9" * 30_000  # 120 kB of UTF-8 in the file, 360 kB echoed as JSON
    content = safetensors_save(tensors, metadata={"romegw": json.dumps(header, ensure_ascii=False)})
    assert "bytes as JSON, over the limit" in refused(live, content)
    header, tensors = live.parts(seed=6)
    header["request"]["hparams"]["v_lr"] = "a string"
    assert "must be a finite number" in refused(live, encode(header, tensors))


def test_an_import_whose_caller_leaves_during_the_commit_is_whole_live_and_audited(live, caplog) -> None:
    """The caller's deadline passes while the import's swap waits for a forward pass in flight:
    afterwards all of its layers are stored AND live (never some of them, never stored but not
    served), and audited."""
    engine = live.srv.engine
    gate = engine.versions.gate
    release = threading.Event()
    held = threading.Event()

    def long_forward_pass() -> None:  # what a forward pass holds while it runs
        with gate.reading():
            held.set()
            release.wait(60)

    holder = threading.Thread(target=long_forward_pass)
    holder.start()
    assert held.wait(10)
    before = engine.edit_version
    assert engine.active_layers == 0
    files = [layer_file(encode(*live.parts(seed=20 + i))) for i in range(3)]
    caplog.set_level(logging.INFO, logger="romegw.audit")  # the audit comes after the caller has gone
    with pytest.raises(GatewayError) as e:
        live.client.import_edits(files, timeout=5.0)  # checking 3 small files takes milliseconds
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert gate._writers_waiting, "the import never reached its swap (it waits there for the pass)"
    release.set()
    holder.join(timeout=10)
    assert wait_until(lambda: engine.active_layers == 3, timeout=30)  # all three, live (after any earlier test)
    assert engine.edit_version > before
    manifest = json.loads((live.root / "data" / "edits" / "manifest.json").read_text())
    assert manifest["entries"][-1]["version"] == engine.edit_version  # served = recorded
    assert [x["op"] for x in manifest["entries"][-3:]] == ["import"] * 3
    audited = lambda: any("what=ImportEdits" in r.getMessage() for r in caplog.records)  # noqa: E731
    assert wait_until(audited, timeout=10), "the import was never audited"
    live.client.revert_edit(to_version=0)
    assert live.answer() == live.greedy
