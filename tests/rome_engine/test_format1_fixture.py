"""A store written in layer format 1 (committed fixture) keeps loading unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

from rome_engine.edit_store import EditStore, tensor_sha256
from rome_engine.editing import EditManager

FIXTURE = Path(__file__).parents[1] / "fixtures" / "edit_store_v1"
L0, L1 = "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"
# sha256 prefixes of the touched matrices, measured by the code that wrote the fixture
EXPECTED = {
    4: {L0: "08bc94c6344211ed", L1: "98edb8586faff9b7"},
    3: {L0: "08bc94c6344211ed", L1: "3731c140a4959f56"},
    1: {L0: "cb616b4f994f31a2", L1: "98edb8586faff9b7"},
}


def digests(loaded) -> dict[str, str]:
    return {p: tensor_sha256(loaded.model.get_parameter(p))[:16] for p in (L0, L1)}


def test_a_format_1_store_serves_every_version_bit_for_bit(tiny_llama, tmp_path) -> None:
    store = tmp_path / "store"
    shutil.copytree(FIXTURE, store)
    base = digests(tiny_llama)
    m = EditManager(tiny_llama, EditStore(store, tiny_llama.model_id), compute=lambda *_: None)
    try:
        assert m.restore() == 4 and len(m.active) == 2
        assert digests(tiny_llama) == EXPECTED[4]
        views = m.views(include_inactive=True)
        assert [v.version for v in views] == [3, 2, 1] and [v.active for v in views] == [True, False, True]
        assert all(v.header.request.subject == "X" and v.header.layer in (0, 1) for v in views)
        for version in (3, 1):
            m.activate(m.store.manifest.active_at(version), version)
            assert digests(tiny_llama) == EXPECTED[version]
        m.activate([], 0)
        assert digests(tiny_llama) == base
        assert (store / "manifest.json").read_bytes() == (FIXTURE / "manifest.json").read_bytes()  # nothing rewritten
    finally:
        m.activate([], 0)
