"""Random and malformed requests at every RPC of a live server: only client-error statuses
come back (never INTERNAL or UNKNOWN, never a crash), and the model and the edit store are
unchanged afterwards."""

from __future__ import annotations

import hashlib

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rome_engine.engine import EngineLimits
from romegw_client.pb import gateway_pb2 as pb
from romegw_client.pb import gateway_pb2_grpc as pb_grpc
from romegw_server.auth import TokenTable

GEN = "fuzz-generate-token-000000000000"
EDIT = "fuzz-edit-token-0000000000000000"
CLIENT_ERRORS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

texts = st.text(max_size=40) | st.sampled_from(["", "{}", "{} {}", "The Eiffel Tower is in", "\x00", "🙂" * 5])
int32 = st.integers(-(2**31), 2**31 - 1)
uint64 = st.integers(0, 2**64 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


def state(model: torch.nn.Module, store) -> tuple:
    params = hashlib.sha256()
    for _, p in sorted(model.named_parameters()):
        params.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    manifest = (store / "manifest.json").read_bytes() if (store / "manifest.json").exists() else b""
    files = sorted(p.name for p in (store / "layers").iterdir())
    return params.hexdigest(), manifest, files


@pytest.fixture(scope="module")
def live(tiny_llama, tmp_path_factory):
    from romegw_server.main import ServerConfig, ServerThread, build_engine

    limits = EngineLimits(max_prompt_tokens=48, max_new_tokens=8, max_trace_cells=64, max_continuations=4)
    config = ServerConfig(
        host="127.0.0.1", port=0, limits=limits, edit_store=tmp_path_factory.mktemp("fuzz-store"),
        cache_dir=tmp_path_factory.mktemp("fuzz-cache"),
        tokens=TokenTable([("generate", GEN, "fuzz-gen"), ("edit", EDIT, "fuzz-edit")]),
    )
    engine = build_engine(tiny_llama, config)
    srv = ServerThread(engine, config).start()
    channel = grpc.insecure_channel(srv.target)
    before = state(tiny_llama.model, config.edit_store)
    yield pb_grpc.RomeGatewayStub(channel), channel
    assert state(tiny_llama.model, config.edit_store) == before, "the fuzz changed the model or the edit store"
    channel.close()
    srv.stop(grace=0.5)
    engine.close()


def call(fn, request, token: str = GEN) -> grpc.StatusCode:
    try:
        out = fn(request, timeout=60, metadata=(("authorization", f"Bearer {token}"),))
        if hasattr(out, "__iter__") and not hasattr(out, "SerializeToString"):
            list(out)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert e.code() in CLIENT_ERRORS, (e.code(), e.details())
        return e.code()


@SETTINGS
@given(prompt=texts, n=st.none() | int32, t=st.none() | floats, p=st.none() | floats, k=st.none() | int32,
       seed=st.none() | uint64, stop=st.lists(texts, max_size=10), top=int32)
def test_generate(live, prompt, n, t, p, k, seed, stop, top) -> None:
    stub, _ = live
    req = pb.GenerateRequest(prompt=prompt, stop=stop, top_logprobs=top, logprobs=top % 2 == 0)
    for name, v in (("max_new_tokens", n), ("temperature", t), ("top_p", p), ("top_k", k), ("seed", seed)):
        if v is not None:
            setattr(req, name, v)
    call(stub.Generate, req)


@SETTINGS
@given(prompt=texts, conts=st.lists(texts, max_size=6))
def test_score(live, prompt, conts) -> None:
    call(live[0].Score, pb.ScoreRequest(prompt=prompt, continuations=conts))


@SETTINGS
@given(prompt=texts, subject=texts, answer=st.none() | texts, kind=int32, noise=st.none() | floats,
       samples=st.none() | int32, window=st.none() | int32, seed=st.none() | uint64)
def test_trace(live, prompt, subject, answer, kind, noise, samples, window, seed) -> None:
    req = pb.TraceRequest(prompt=prompt, subject=subject, kind=kind % 6)
    for name, v in (("answer", answer), ("noise", noise), ("samples", samples), ("window", window), ("seed", seed)):
        if v is not None:
            setattr(req, name, v)
    call(live[0].Trace, req)


@SETTINGS
@given(prompt=texts, subject=texts, target=texts, layer=st.none() | int32,
       hp=st.dictionaries(st.sampled_from(["v_lr", "v_num_grad_steps", "nope", "layer", "mom2_n_tokens"]), floats,
                          max_size=3))
def test_apply_edit(live, prompt, subject, target, layer, hp) -> None:
    spec = pb.EditSpec(prompt=prompt, subject=subject, target=target, hparams=hp)
    if layer is not None:
        spec.layer = layer
    # a valid request meets a head that moved (expected_version 999): still nothing changes
    req = pb.ApplyEditRequest(edit=spec, expected_version=999)
    assert call(live[0].ApplyEdit, req, token=EDIT) != grpc.StatusCode.OK
    assert call(live[0].ApplyEdit, req) == grpc.StatusCode.PERMISSION_DENIED


@SETTINGS
@given(to_version=st.none() | uint64, edit_id=st.none() | texts, size=int32, token=texts,
       lo=uint64, hi=st.none() | uint64)
def test_revert_list_get_export(live, to_version, edit_id, size, token, lo, hi) -> None:
    stub = live[0]
    req = pb.RevertEditRequest()
    if to_version is not None:
        req.to_version = to_version
    elif edit_id is not None:
        req.edit_id = edit_id
    call(stub.RevertEdit, req, token=EDIT)
    call(stub.ListEdits, pb.ListEditsRequest(page_size=size, page_token=token))
    call(stub.GetEdit, pb.GetEditRequest(edit_id=edit_id or ""))
    export = pb.ExportEditsRequest(from_version=lo)
    if hi is not None:
        export.to_version = hi
    call(stub.ExportEdits, export, token=EDIT)


@SETTINGS
@given(blobs=st.lists(st.binary(max_size=300), min_size=1, max_size=3), sha=texts)
def test_import_edits(live, blobs, sha) -> None:
    files = [pb.EditLayerFile(filename="x.safetensors", content=b, sha256=sha) for b in blobs]
    assert call(live[0].ImportEdits, iter(files), token=EDIT) != grpc.StatusCode.OK


@SETTINGS
@given(data=st.binary(max_size=200), method=st.sampled_from(
    ["Generate", "Score", "Trace", "ApplyEdit", "RevertEdit", "ListEdits", "GetEdit", "ExportEdits", "GetModelInfo"]))
def test_malformed_bytes(live, data, method) -> None:
    _, channel = live
    streaming = method in ("Generate", "Trace", "ExportEdits")
    fn = (channel.unary_stream if streaming else channel.unary_unary)(f"/romegw.v1.RomeGateway/{method}")
    call(fn, data, token=EDIT)
