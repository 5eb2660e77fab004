"""Versioned edits through a real server on the embedded model: apply, generate, list, revert.

The edits name no method, so they take the server's default ("auto"), which on the embedded
model is the gated method at layer 4 (methods.default_method): the weights never change.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from rome_engine.loading import default_cache_dir
from romegw_client import Client, FailedPrecondition, InvalidArgument, NotFound

pytestmark = pytest.mark.embedded


def param_hashes(model: torch.nn.Module) -> dict[str, str]:
    return {
        n: hashlib.sha256(p.detach().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
        for n, p in model.named_parameters()
    }


def answer(c: Client, prompt: str) -> tuple[str, int]:
    out = c.generate_text(prompt, max_new_tokens=4)
    return out.text, out.edit_version


def test_apply_generate_revert_bit_exact(embedded, serve) -> None:
    before = param_hashes(embedded.model)
    srv = serve(embedded, edits=True, cache_dir=default_cache_dir())
    with Client(srv.target, timeout=900) as c:
        assert answer(c, "The Eiffel Tower is in")[0].startswith(" Paris")
        assert c.model_info().default_edit_method == "gated"  # "auto" on the embedded model
        with pytest.raises(FailedPrecondition, match="expected_version 3"):
            c.apply_edit("The Eiffel Tower is in", "The Eiffel Tower", " Rome", expected_version=3)
        with pytest.raises(InvalidArgument, match="does not occur in prompt"):
            c.apply_edit("The Eiffel Tower is in", "The Louvre", " Rome")

        dry = c.apply_edit("The Eiffel Tower is in", "The Eiffel Tower", " Rome", dry_run=True)
        assert dry.dry_run and dry.head_version == 0
        assert param_hashes(embedded.model) == before  # a dry run changes nothing

        r = c.apply_edit(
            "The Eiffel Tower is in", "The Eiffel Tower", "Rome", expected_version=0, author="ops", comment="t-1"
        )
        e = r.edit
        assert (r.head_version, e.version, e.parent_version, e.active) == (1, 1, 0, True)
        assert e.target == " Rome" and e.author == "ops" and e.comment == "t-1"
        assert e.target_after > e.target_before and e.old_object.startswith(" Paris")
        assert e.method == "gated" and e.layers == (4,) and e.header["format_version"] == 3
        assert len(e.matrices) == 1 and all(norm > 0 for _, _, norm in e.matrices)
        assert param_hashes(embedded.model) == before  # served beside the weights
        assert e.header["base_fingerprint"]["model_id"] == embedded.model_id
        assert e.header["facts"][0]["subject"] == "The Eiffel Tower"

        text, version = answer(c, "The Eiffel Tower is in")
        assert text.startswith(" Rome") and version == 1
        scores = c.score("The Eiffel Tower is located in the city of", [" Rome", " Paris"])
        assert scores.best().continuation == " Rome" and scores.edit_version == 1
        assert answer(c, "The capital of France is")[0].startswith(" Paris")
        info = c.model_info()
        assert (info.head_version, info.active_layers) == (1, 1)
        assert [x.edit_id for x in c.list_edits().edits] == [e.edit_id]
        assert c.get_edit(e.edit_id).header == e.header
        with pytest.raises(NotFound):
            c.get_edit("00000000-0000-0000-0000-000000000000")

        rv = c.revert_edit(to_version=0, author="ops", comment="undo")
        assert (rv.head_version, rv.removed_edit_ids, rv.active_layers) == (0, (e.edit_id,), 0)
        text, version = answer(c, "The Eiffel Tower is in")
        assert text.startswith(" Paris") and version == 0
        assert c.list_edits().edits == ()
        assert [x.active for x in c.list_edits(include_inactive=True).edits] == [False]
    assert param_hashes(embedded.model) == before


FACTS = [
    ("The Eiffel Tower is in", "The Eiffel Tower", " Rome", " Paris"),
    ("The Colosseum is in", "The Colosseum", " London", " Rome"),
    ("Toyota is a company from", "Toyota", " Germany", " Japan"),
]


def test_three_edits_revert_the_middle_one_then_restart(embedded, serve, tmp_path) -> None:
    before = param_hashes(embedded.model)
    store = tmp_path / "store"
    srv = serve(embedded, edits=True, edit_store=store, cache_dir=default_cache_dir())
    with Client(srv.target, timeout=900) as c:
        ids = [c.apply_edit(p, s, new).edit.edit_id for p, s, new, _ in FACTS]
        for p, _, new, _ in FACTS:
            assert answer(c, p)[0].startswith(new), p
        at3 = param_hashes(embedded.model)
        rv = c.revert_edit(edit_id=ids[1], author="ops")
        assert rv.removed_edit_ids == (ids[1],) and rv.head_version == 4 and rv.active_layers == 2
        for (p, _, new, old), expected in zip(FACTS, [True, False, True], strict=True):
            text = answer(c, p)[0]
            assert text.startswith(new if expected else old), (p, text)
        with pytest.raises(FailedPrecondition, match="not active"):
            c.revert_edit(edit_id=ids[1])
        after_middle = {p: answer(c, p)[0] for p, *_ in FACTS}
        assert c.revert_edit(to_version=3).head_version == 3
        assert param_hashes(embedded.model) == at3
        assert c.revert_edit(to_version=4).head_version == 4
        history = c.list_edits(include_inactive=True)
        assert [e.edit_id for e in history.edits] == ids[::-1]
    srv.stop()
    srv.engine.edits.activate([], 0)
    assert param_hashes(embedded.model) == before

    # a restart on the same store serves the same version and the same answers
    srv2 = serve(embedded, edits=True, edit_store=store, cache_dir=default_cache_dir())
    with Client(srv2.target) as c:
        assert c.model_info().head_version == 4
        for p, text in after_middle.items():
            assert answer(c, p) == (text, 4)
        c.revert_edit(to_version=0)
    assert param_hashes(embedded.model) == before
