"""The edit store's on-disk format and the layer weights, with real rank-one factors."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rome_engine.delta import LowRankFactor, as_if_applied
from rome_engine.edit_store import (
    EditLayer,
    EditStore,
    Manifest,
    decode_layer,
    encode_layer,
    read_layer_header,
    tensor_sha256,
)
from rome_engine.editing import EditManager
from rome_engine.errors import FailedPrecondition, NotFound
from rome_engine.layers import LayerWeights
from rome_engine.methods import LayerInfo, MethodResult, RequestInfo
from rome_engine.records import LayerHeader, ManifestEntry, RevertRequest
from rome_engine.rome import RomeHParams


def param_hashes(model: torch.nn.Module) -> dict[str, str]:
    return {n: hashlib.sha256(p.detach().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
            for n, p in model.named_parameters()}


def random_layer(loaded, weights: LayerWeights, layer_index: int, seed: int, version: int = 1) -> EditLayer:
    g = torch.Generator().manual_seed(seed)
    name = loaded.spec.mlp_out_weight_name(layer_index)
    out_dim, in_dim = loaded.spec.as_out_in(weights.parameter(name)).shape
    f = LowRankFactor.rank_one(name, torch.randn(out_dim, generator=g) * 0.1, torch.randn(in_dim, generator=g) * 0.1)
    header = {
        "format_version": 1, "edit_id": str(uuid.uuid4()), "version": version, "parent_version": 0,
        "created_at": "2026-01-01T00:00:00Z", "author": "test", "comment": "",
        "request": {"prompt": "{} is in", "subject": "X", "target": " Y", "layer": layer_index, "hparams": {}},
        "layer": layer_index, "matrices": [{"name": name, "shape": [out_dim, in_dim], "update_norm": f.norm}],
        "base_fingerprint": weights.fingerprint([name]).to_json(), "probabilities": {}, "compute_seconds": 0.0,
    }
    return EditLayer(LayerHeader.from_json(header), (f,))


def method_result(factor: LowRankFactor, requests, keys: torch.Tensor | None = None) -> MethodResult:
    """A computed edit of ``factor`` as the editing methods return it (for fake compute functions)."""
    layer = int(factor.param.split(".")[2])
    return MethodResult(
        method="rome", factors=(factor,), keys={factor.param: keys} if keys is not None else {}, layers=(layer,),
        hparams=RomeHParams(layer=layer), cov_from_cache=False,
        requests=tuple(RequestInfo(r, 0.0, 0, 0.0, 0.0) for r in requests),
        layer_info=(LayerInfo(layer, factor.param, 0.0, factor.norm, 1.0),), compute_seconds=0.0,
    )  # fmt: skip


@pytest.fixture
def model_copy(request):
    """A private copy of a tiny model (these tests change weights)."""
    from tests.conftest import make_tiny

    return make_tiny(request.param, request.getfixturevalue("tokenizer"))


@pytest.mark.parametrize("model_copy", ["gpt2", "llama"], indirect=True)
def test_materialize_is_bit_exact_and_order_stable(model_copy) -> None:
    loaded = model_copy
    before = param_hashes(loaded.model)
    w = LayerWeights(loaded)
    layers = [random_layer(loaded, w, i % 2, seed=i) for i in range(3)]  # two layers touch matrix 0
    w.materialize(layers)
    after3 = param_hashes(loaded.model)
    assert after3 != before
    w.materialize([layers[0], layers[2]])
    w.materialize(layers)
    assert param_hashes(loaded.model) == after3  # the same list, the same bits
    w.materialize([])
    assert param_hashes(loaded.model) == before  # the base back, bit for bit


@pytest.mark.parametrize("model_copy", ["gpt2", "llama"], indirect=True)
def test_delta_orientation_and_patch_equivalence(model_copy) -> None:
    """W' x = W x + u (v . x) in (out, in) terms, for Conv1D (GPT-2) and Linear (Llama) storage."""
    loaded = model_copy
    w = LayerWeights(loaded)
    layer = random_layer(loaded, w, 1, seed=3)
    f = layer.factors[0]
    ids = torch.tensor([[5, 9, 11, 20]])
    with torch.no_grad():
        base = loaded.model(ids).logits
        with as_if_applied(loaded, [f]):
            patched = loaded.model(ids).logits
    W0 = loaded.spec.as_out_in(w.parameter(f.param)).detach().clone()
    w.materialize([layer])
    W1 = loaded.spec.as_out_in(w.parameter(f.param)).detach()
    assert torch.allclose(W1 - W0, f.delta(), atol=1e-6)
    with torch.no_grad():
        applied = loaded.model(ids).logits
    assert not torch.allclose(base, applied)
    assert torch.allclose(patched, applied, atol=1e-4)
    w.materialize([])


def test_layer_file_roundtrip_and_tamper_detection(tiny_llama) -> None:
    w = LayerWeights(tiny_llama)
    layer = random_layer(tiny_llama, w, 2, seed=1)
    data = encode_layer(layer)
    back = decode_layer(data)
    assert back.header == layer.header
    assert torch.equal(back.factors[0].u, layer.factors[0].u)
    assert torch.equal(back.factors[0].v, layer.factors[0].v)
    with pytest.raises(ValueError):
        decode_layer(data[: len(data) // 2])


def test_store_manifest_revert_and_restart(tiny_llama, tmp_path, caplog) -> None:
    loaded = tiny_llama
    before = param_hashes(loaded.model)
    store = EditStore(tmp_path, loaded.model_id)
    m = EditManager(loaded, store, compute=lambda *_: None)
    m.restore()
    entries = []
    for i in range(3):
        layer = random_layer(loaded, m.weights, i, seed=i, version=i + 1)
        e = m.store_layer(layer)
        m.activate(e.active, e.version)
        entries.append(e)
    assert [e.version for e in entries] == [1, 2, 3]
    at3 = param_hashes(loaded.model)
    ids = [e.edit_id for e in entries]
    # the layer file's header is readable alone, and the manifest names every active layer
    assert read_layer_header(tmp_path / entries[0].file).edit_id == ids[0]
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["format_version"] == 2 and [(e["active_keep"], len(e["active_add"])) for e in doc["entries"]] == [
        (0, 1), (1, 1), (2, 1)
    ]  # each apply adds one id to the list before it
    assert list(Manifest.from_json((tmp_path / "manifest.json").read_bytes()).entries[-1].active) == ids

    # remove the middle layer: a new version without it
    revert = RevertRequest(edit_id=ids[1], author="a")
    version, active, removed = m.plan_revert(revert)
    m.record_revert(version, active, revert)
    m.activate(active, version)
    assert (version, active, removed) == (4, [ids[0], ids[2]], [ids[1]])

    # revert to version 3: bit for bit what it was
    version, active, _ = m.plan_revert(RevertRequest(to_version=3))
    m.record_revert(version, active, RevertRequest(to_version=3, author="a"))
    m.activate(active, version)
    assert param_hashes(loaded.model) == at3
    with pytest.raises(NotFound):
        m.plan_revert(RevertRequest(to_version=99))

    # a restart on the same store re-applies version 3
    m.activate([], 0)
    assert param_hashes(loaded.model) == before
    m2 = EditManager(loaded, EditStore(tmp_path, loaded.model_id), compute=lambda *_: None)
    assert m2.restore() == 3
    assert param_hashes(loaded.model) == at3

    # alter the third layer's file: the server falls back to the newest consistent version and says so
    m2.activate([], 0)
    path = tmp_path / entries[2].file
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    m3 = EditManager(loaded, EditStore(tmp_path, loaded.model_id), compute=lambda *_: None)
    with caplog.at_level(logging.ERROR):
        version = m3.restore()
    assert version == 2
    assert m3.active == ids[:2]
    assert "does not match its checksum" in caplog.text
    assert json.loads((tmp_path / "manifest.json").read_text())["entries"][-1]["op"] == "recover"
    m3.activate([], 0)
    assert param_hashes(loaded.model) == before


def test_store_refuses_another_models_store_and_orphans_are_removed(tiny_llama, tmp_path) -> None:
    store = EditStore(tmp_path, tiny_llama.model_id)
    m = EditManager(tiny_llama, store, compute=lambda *_: None)
    layer = random_layer(tiny_llama, m.weights, 0, seed=0)
    m.store_layer(layer)
    m.activate([], 0)
    with pytest.raises(FailedPrecondition, match="belongs to model"):
        EditStore(tmp_path, "another-model")
    orphan = tmp_path / "layers" / f"{uuid.uuid4()}.safetensors"
    orphan.write_bytes(b"partial")
    restarted = EditManager(tiny_llama, EditStore(tmp_path, tiny_llama.model_id), compute=lambda *_: None)
    assert restarted.restore() == 1
    assert not orphan.exists()
    restarted.activate([], 0)  # the shared model as it was


def test_import_refuses_a_layer_for_another_base(tiny_llama, tokenizer, tmp_path) -> None:
    from tests.conftest import make_tiny

    other = make_tiny("llama", tokenizer, seed=1)  # same shapes, other weights
    layer = random_layer(other, LayerWeights(other), 0, seed=0)
    m = EditManager(tiny_llama, EditStore(tmp_path, tiny_llama.model_id), compute=lambda *_: None)
    with pytest.raises(FailedPrecondition, match="another base model"):
        m.check_import(encode_layer(layer), None)
    assert tensor_sha256(torch.zeros(2)) == tensor_sha256(torch.zeros(2))


def _write_entry(store: EditStore, header: dict, tensors: dict) -> None:
    """Store a layer file as it is, bypassing every check (an older server, a hand edit, a bug)."""
    from safetensors.torch import save as safetensors_save

    data = safetensors_save(tensors, metadata={"romegw": json.dumps(header)})
    rel = f"layers/{header['edit_id']}.safetensors"
    (store.root / rel).write_bytes(data)
    store._commit(ManifestEntry(
        op="import", version=store.manifest.max_version + 1, parent_version=store.manifest.head_version,
        edit_id=header["edit_id"], file=rel, sha256=hashlib.sha256(data).hexdigest(),
        active=(*store.manifest.active_at(store.manifest.head_version), header["edit_id"]),
        at="2026-01-01T00:00:00Z",
    ))


def _no_request(h: dict, t: dict) -> None:
    del h["facts"]


def _u_column(h: dict, t: dict) -> None:
    name = next(k for k in t if k.endswith(".u"))
    t[name] = t[name].reshape(1, -1)  # a row where a column belongs


def _nan(h: dict, t: dict) -> None:
    name = next(k for k in t if k.endswith(".v"))
    t[name] = torch.full_like(t[name], float("nan"))


def _embeddings(h: dict, t: dict) -> None:
    """A consistent layer whose factor targets the token embeddings (49152, 64): not an editable matrix."""
    name, (vocab, width) = "model.embed_tokens.weight", (49152, 64)
    t.clear()
    t[f"{name}.u"], t[f"{name}.v"] = torch.full((vocab, 1), 1e-3), torch.full((width, 1), 1e-3)
    h["matrices"] = [{"name": name, "shape": [vocab, width], "update_norm": 1e-3}]
    h["base_fingerprint"]["matrices"] = {name: h.pop("_embed_sha")}


@pytest.mark.parametrize("damage", [_no_request, _u_column, _nan, _embeddings])
def test_a_store_entry_that_fails_at_start_is_skipped_like_a_damaged_layer(damage, tiny_llama, tmp_path) -> None:
    """Headers the old import accepted (no request; u of shape (N, 1)) made every later start crash."""
    before = param_hashes(tiny_llama.model)
    store = EditStore(tmp_path, tiny_llama.model_id)
    m = EditManager(tiny_llama, store, compute=lambda *_: None)
    good = random_layer(tiny_llama, m.weights, 0, seed=0)
    entry = m.store_layer(good)
    m.activate(entry.active, entry.version)
    m.activate([], 0)
    bad = random_layer(tiny_llama, m.weights, 1, seed=1, version=2)
    tensors = {f"{f.param}.{s}": getattr(f, s) for f in bad.factors for s in ("u", "v")}
    header = bad.header.to_json()
    header["_embed_sha"] = tensor_sha256(tiny_llama.model.get_parameter("model.embed_tokens.weight"))
    damage(header, tensors)
    header.pop("_embed_sha", None)
    _write_entry(store, header, tensors)

    m2 = EditManager(tiny_llama, EditStore(tmp_path, tiny_llama.model_id), compute=lambda *_: None)
    assert m2.restore() == 1
    assert m2.active == [good.edit_id]
    last = json.loads((tmp_path / "manifest.json").read_text())["entries"][-1]
    assert (last["op"], last["version"], last["from_version"]) == ("recover", 1, 2)
    m2.activate([], 0)
    assert param_hashes(tiny_llama.model) == before


def test_an_oversized_stored_update_is_not_restored(tiny_llama, tmp_path) -> None:
    m = EditManager(tiny_llama, EditStore(tmp_path, tiny_llama.model_id), compute=lambda *_: None)
    layer = random_layer(tiny_llama, m.weights, 0, seed=0)
    m.store_layer(layer)
    ratio = layer.factors[0].norm / float(m.weights.base(layer.factors[0].param).norm())
    lenient = EditManager(tiny_llama, EditStore(tmp_path, tiny_llama.model_id), compute=lambda *_: None,
                          max_update_norm_ratio=ratio * 2)
    assert lenient.restore() == 1
    lenient.activate([], 0)
    strict = EditManager(tiny_llama, EditStore(tmp_path, tiny_llama.model_id), compute=lambda *_: None,
                         max_update_norm_ratio=ratio / 2)
    assert strict.restore() == 0  # the layer is over the limit: the base is served
    strict.activate([], 0)
    # that start's fallback is not a decision: once the layer verifies again, it is served again
    again = EditManager(tiny_llama, EditStore(tmp_path, tiny_llama.model_id), compute=lambda *_: None,
                        max_update_norm_ratio=ratio * 2)
    assert again.restore() == 1 and again.active == [layer.edit_id]
    ops = [(e["op"], e["version"]) for e in json.loads((tmp_path / "manifest.json").read_text())["entries"]]
    assert ops == [("apply", 1), ("recover", 0), ("recover", 1)]
    again.activate([], 0)


def _apply_entry(ids: list[str], i: int) -> ManifestEntry:
    e = ids[i]
    return ManifestEntry("apply", i + 1, tuple(ids[: i + 1]), parent_version=i, edit_id=e,
                         file=f"layers/{e}.safetensors", sha256="0" * 64)  # fmt: skip


def test_the_manifest_grows_by_one_short_entry_per_edit_and_round_trips() -> None:
    """Format 2 stores each entry's active list as (keep, add) against the entry before, so 300
    applies cost 300 short entries, not 300 lists of up to 300 ids; reverts decode exactly."""
    ids = [str(uuid.uuid4()) for _ in range(300)]
    m = Manifest("m", [_apply_entry(ids, i) for i in range(300)])
    m.entries.append(ManifestEntry("revert", 301, tuple(ids[:100] + ids[101:]), from_version=300, edit_id=ids[100]))
    m.entries.append(ManifestEntry("revert", 5, tuple(ids[:5]), from_version=301, to_version=5))
    m.entries.append(ManifestEntry("recover", 300, tuple(ids), from_version=5, reason="r"))
    data = m.to_json()
    doc = json.loads(data)
    sizes = [len(json.dumps(e)) for e in doc["entries"]]
    assert max(sizes[:300]) - min(sizes[:300]) < 10  # an apply's entry does not grow with the history
    assert [(e["active_keep"], len(e["active_add"])) for e in doc["entries"][300:]] == [(100, 199), (5, 0), (5, 295)]
    back = Manifest.from_json(data)
    assert [e.active for e in back.entries] == [e.active for e in m.entries]
    assert back.to_json() == data
    # the encoding memo follows a rollback (a failed write drops the new entries) and a replacement
    del m.entries[-2:]
    m.entries.append(ManifestEntry("revert", 302, tuple(ids[:3]), from_version=301, to_version=3))
    assert [e.active for e in Manifest.from_json(m.to_json()).entries] == [e.active for e in m.entries]


def test_a_format_1_manifest_is_read_and_rewritten_as_format_2_with_the_same_history() -> None:
    data = (Path(__file__).parents[1] / "fixtures" / "edit_store_v1" / "manifest.json").read_bytes()
    old = Manifest.from_json(data)
    assert json.loads(data)["format_version"] == 1 and len(old.entries) == 4
    new = Manifest.from_json(old.to_json())
    assert json.loads(old.to_json())["format_version"] == 2
    assert [e.to_json() for e in new.entries] == [e.to_json() for e in old.entries]


@pytest.mark.parametrize(
    "manifest",
    [
        b"[]",
        b'{"format_version": 1, "model_id": "tiny-llama", "entries": [7]}',
        b'{"format_version": 1, "model_id": "tiny-llama", "entries": [{"op": "revert", "version": "abc",'
        b' "active": []}]}',
        b'{"format_version": 1, "model_id": "tiny-llama", "entries": [{"op": "apply", "version": 1, "active": [],'
        b' "edit_id": "../../x", "file": "layers/../../x.safetensors", "sha256": ""}]}',
        b"{not json",
        # format 2: the active list as a delta against the entry before
        b'{"format_version": 2, "model_id": "tiny-llama", "entries": [{"op": "recover", "version": 0,'
        b' "from_version": 0, "active_keep": 1, "active_add": []}]}',
        b'{"format_version": 2, "model_id": "tiny-llama", "entries": [{"op": "recover", "version": 0,'
        b' "from_version": 0, "active_keep": true, "active_add": []}]}',
        b'{"format_version": 2, "model_id": "tiny-llama", "entries": [{"op": "recover", "version": 0,'
        b' "from_version": 0, "active_keep": 0, "active_add": "abc"}]}',
        b'{"format_version": 2, "model_id": "tiny-llama", "entries": [{"op": "recover", "version": 0,'
        b' "from_version": 0, "active": []}]}',
        b'{"format_version": 3, "model_id": "tiny-llama", "entries": []}',
    ],
)
def test_a_damaged_manifest_is_refused_with_a_clear_error(manifest, tiny_llama, tmp_path) -> None:
    (tmp_path / "manifest.json").write_bytes(manifest)
    with pytest.raises(FailedPrecondition, match="manifest .* is damaged"):
        EditStore(tmp_path, tiny_llama.model_id)


def test_a_manifest_naming_a_file_outside_layers_is_refused(tiny_llama, tmp_path) -> None:
    m = EditManager(tiny_llama, EditStore(tmp_path, tiny_llama.model_id), compute=lambda *_: None)
    layer = random_layer(tiny_llama, m.weights, 0, seed=0)
    m.store_layer(layer)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    doc["entries"][0]["file"] = "../outside.safetensors"
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(FailedPrecondition, match="file must be layers/"):
        EditStore(tmp_path, tiny_llama.model_id)


def test_a_layer_with_a_path_as_edit_id_is_never_written(tiny_llama, tmp_path) -> None:
    store = EditStore(tmp_path / "edits", tiny_llama.model_id)
    m = EditManager(tiny_llama, store, compute=lambda *_: None)
    layer = random_layer(tiny_llama, m.weights, 0, seed=0)
    bad = EditLayer(replace(layer.header, edit_id="../../model/model"), layer.factors)
    with pytest.raises(ValueError, match="edit_id must be a UUID"):
        store.add_layer(bad, active=[])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["edits", "layers"]


def test_a_computed_layer_that_a_restart_would_refuse_is_never_stored(tiny_llama, tmp_path) -> None:
    from rome_engine.errors import InvalidRequest
    from rome_engine.rome import EditRequest

    name = tiny_llama.spec.mlp_out_weight_name(0)
    scale = {"value": 100.0}

    def compute(loaded, requests, method, prior_keys, progress=None):
        factor = LowRankFactor.rank_one(name, torch.ones(64) * scale["value"], torch.ones(128))
        return method_result(factor, requests, keys=torch.ones(128, 1))

    request = EditRequest("{} is in", "X", " Y")
    m = EditManager(tiny_llama, EditStore(tmp_path, tiny_llama.model_id), compute=compute)
    with pytest.raises(FailedPrecondition, match="max_update_norm_ratio=1.0"):
        m.compute_layer([request], "rome", author="a", comment="")
    scale["value"] = float("nan")
    with pytest.raises(FailedPrecondition, match="NaN or infinite"):
        m.compute_layer([request], "rome", author="a", comment="")
    scale["value"] = 1e-4
    with pytest.raises(InvalidRequest, match="author has 300 characters, over the limit of 256"):
        m.compute_layer([request], "rome", author="a" * 300, comment="")
    layer = m.compute_layer([request], "rome", author="a", comment="")
    back = decode_layer(encode_layer(layer))
    assert back.edit_id == layer.edit_id and back.header == layer.header
    assert torch.equal(back.keys[name], torch.ones(128, 1)) and back.header.matrices[0].keys == 1


@pytest.mark.parametrize("model_copy", ["llama"], indirect=True)
@pytest.mark.parametrize("cache_bytes", [0, 1 << 30])
def test_kept_sums_give_the_bits_of_a_sum_from_the_base(model_copy, cache_bytes: int) -> None:
    """A version built on the kept sum of its parent equals the same layers summed from the base,
    bit for bit, whichever way the history went (forward, back, a branch); 0 bytes keeps nothing."""
    from rome_engine.delta import rebuilt

    loaded = model_copy
    w = LayerWeights(loaded, sum_cache_bytes=cache_bytes)
    layers = [random_layer(loaded, w, 0, seed=40 + i) for i in range(5)]
    name = layers[0].factors[0].param
    for active in ([0], [0, 1], [0, 1, 2], [0, 1], [0, 1, 3, 4], [0, 2], [0, 1, 3, 4]):
        chosen = [layers[i] for i in active]
        w.materialize(chosen)
        expected = rebuilt(loaded.spec, w.base(name), [layer.factors[0] for layer in chosen])
        assert torch.equal(w.parameter(name).detach(), expected), active
    w.materialize([])
    assert torch.equal(w.parameter(name).detach(), w.base(name))
