"""Batch edits (ApplyEdits) and the accumulating methods through the server and the SDK."""

from __future__ import annotations

import json

import pytest
import torch

from rome_engine.edit_store import decode_layer
from rome_engine.engine import EngineLimits
from romegw_client import Client, FailedPrecondition, InvalidArgument
from tests.conftest import weights_digest

# as in tests/rome_engine/test_methods.py: an edit of the tiny model in about a second
TINY = {
    "n_layers": 3, "mom2_n_tokens": 256, "mom2_seq_len": 32, "mom2_batch_size": 8, "cov_shrinkage": 0.1,
    "mom2_update_weight": 100.0, "v_num_grad_steps": 10, "v_lr": 0.02, "v_weight_decay": 0.01,
    "clamp_norm_factor": 4.0, "ctx_n_short": 1, "ctx_n_long": 1, "ctx_len_long": 6,
}  # fmt: skip
TINY_PROJ = {**TINY, "nullspace_threshold": 0.5, "nullspace_relative": 1}
FACTS = [
    ("The Eiffel Tower is in", "Eiffel Tower", " Rome"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", " English"),
    ("Toko Yasuda plays the", "Toko Yasuda", " piano"),
]
ANY = {"min_target_prob": 0.0, "force": True}  # the tiny model's edits are timed and checked, taken or not
# a random tiny model's updates are large next to its small matrices: the norm bound has its own tests
LIMITS = EngineLimits(max_update_norm_ratio=100.0)


def test_a_batch_of_three_facts_is_one_version_and_reverts_bit_exact(tiny_llama, serve, tmp_path) -> None:
    store = tmp_path / "edits"
    srv = serve(tiny_llama, LIMITS, edits=True, edit_store=store)
    base = weights_digest(tiny_llama.model)
    with Client(srv.target, timeout=300) as c:
        r = c.apply_edits(FACTS, method="memit", layer=2, hparams=TINY, author="ops", **ANY)
        e = r.edit
        assert r.head_version == 1 and e.version == 1 and e.method == "memit" and e.layers == (0, 1, 2)
        assert [(f.prompt.replace("{}", f.subject), f.target) for f in e.facts] == [(p, t) for p, _, t in FACTS]
        assert [m[0] for m in e.matrices] == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2)]
        assert e.header["format_version"] == 2 and all(m["rank"] == 3 and m["keys"] == 3 for m in e.header["matrices"])
        files = list((store / "layers").glob("*.safetensors"))
        assert len(files) == 1  # one layer file, rank-3 factors and the facts' keys
        layer = decode_layer(files[0].read_bytes(), stored=True)
        assert [tuple(f.u.shape) for f in layer.factors] == [(64, 3)] * 3
        assert set(layer.keys) == {m[0] for m in e.matrices}
        entries = json.loads((store / "manifest.json").read_text())["entries"]
        assert [(x["op"], x["version"]) for x in entries] == [("apply", 1)]
        edited = weights_digest(tiny_llama.model)
        assert edited != base
        c.revert_edit(to_version=0)
        assert weights_digest(tiny_llama.model) == base
        c.revert_edit(to_version=1)
        assert weights_digest(tiny_llama.model) == edited  # bit for bit, from the base and the layer
        c.revert_edit(to_version=0)


def test_projected_edits_leave_earlier_keys_alone_and_a_revert_derives_them_again(tiny_llama, serve) -> None:
    from tests.server.test_metrics import scrape, value

    srv = serve(tiny_llama, LIMITS, edits=True, metrics_port=0)
    manager = srv.engine.edits
    l2 = "model.layers.2.mlp.down_proj.weight"

    def free() -> float:  # the capacity gauge: dims a projected edit may still write along
        return value(scrape(srv.metrics_url), "romegw_edit_free_dims", param=l2)

    with Client(srv.target, timeout=300) as c:
        assert not any(name == "romegw_edit_free_dims" for name, _ in scrape(srv.metrics_url))  # none computed yet
        first = c.apply_edits(FACTS[:2], method="projected", layer=2, hparams=TINY_PROJ, **ANY).edit
        f1 = free()
        assert 0 < f1 < 128 - 2 and f1 == manager.free_dims()[l2]  # d_in 128 - preserved - 2 keys
        before = {p: tiny_llama.spec.as_out_in(tiny_llama.model.get_parameter(p)).detach().clone()
                  for p, _, _ in first.matrices}  # fmt: skip
        first_keys = manager.active_keys()
        assert {p: k.shape[1] for p, k in first_keys.items()} == {p: 2 for p in before}
        second = c.apply_edit(*FACTS[2], method="projected", layer=2, hparams=TINY_PROJ, **ANY).edit
        assert second.version == 2 and second.method == "projected"
        for param, w1 in before.items():
            w2 = tiny_llama.spec.as_out_in(tiny_llama.model.get_parameter(param)).detach()
            assert not torch.equal(w2, w1)  # the second edit wrote this matrix ...
            k_p = first_keys[param]
            torch.testing.assert_close(w2 @ k_p, w1 @ k_p, rtol=0, atol=1e-4)  # ... but not at the first's keys
        assert {p: k.shape[1] for p, k in manager.active_keys().items()} == {p: 3 for p in before}
        assert free() == f1 - 1  # one more key preserved
        # removing the first edit: the keys statistic is derived from the layers left, not subtracted
        c.revert_edit(edit_id=first.edit_id)
        keys = manager.active_keys()
        assert {p: k.shape[1] for p, k in keys.items()} == {p: 1 for p in before}
        assert free() == f1 + 1  # its two keys' dimensions are given back
        second_layer = manager.view(second.edit_id)
        assert second_layer.active
        c.revert_edit(to_version=2)
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                manager.active_keys().values(),
                (torch.cat([first_keys[p], keys[p]], dim=1) for p in manager.active_keys()),
                strict=True,
            )
        )
        c.revert_edit(to_version=0)
        assert manager.active_keys() == {}
        assert free() == f1 + 2


def test_batch_and_method_options_are_checked(tiny_llama, serve) -> None:
    srv = serve(tiny_llama, edits=True)
    with Client(srv.target, timeout=60) as c:
        with pytest.raises(InvalidArgument, match="rome edits one fact at a time"):
            c.apply_edits(FACTS, method="rome", **ANY)
        with pytest.raises(InvalidArgument, match="unknown edit method"):
            c.apply_edit(*FACTS[0], method="sgd")
        with pytest.raises(InvalidArgument, match="max_batch_facts"):
            c.apply_edits([FACTS[0]] * (srv.engine.limits.max_batch_facts + 1), method="memit")
        with pytest.raises(InvalidArgument, match="max_batch_facts"):
            c.apply_edits([], method="memit")
        with pytest.raises(InvalidArgument, match="n_layers"):
            c.apply_edit(*FACTS[0], method="rome", hparams={"n_layers": 2}, **ANY)
        with pytest.raises((FailedPrecondition, InvalidArgument)):
            c.apply_edits(FACTS[:2], method="memit", layer=2, hparams={**TINY, "n_layers": 9}, **ANY)
        assert c.model_info().head_version == 0


TINY_GATED = {**TINY, "n_layers": 1, "gate_threshold": 0.6, "v_lr": 0.2, "v_num_grad_steps": 20}


@pytest.mark.parametrize("min_cosine", [None, 0.5], ids=["threshold", "and-cosine"])
def test_gated_edits_leave_the_weights_alone_and_revert_and_restart_exactly(
    tokenizer, serve, tmp_path, min_cosine
) -> None:
    from tests.conftest import make_tiny

    hparams = TINY_GATED if min_cosine is None else {**TINY_GATED, "gate_min_cosine": min_cosine}
    fmt = 3 if min_cosine is None else 4

    store = tmp_path / "edits"
    loaded = make_tiny("llama", tokenizer)  # a private copy: its projections carry the store's slot hooks
    srv = serve(loaded, LIMITS, edits=True, edit_store=store)
    base = weights_digest(loaded.model)
    prompt, target = "The Eiffel Tower is in", " Rome"
    with Client(srv.target, timeout=300) as c:

        def score(**pin: int) -> float:
            return c.score(prompt, [target], **pin).scores[0].total_logprob

        before = score()
        e = c.apply_edit(*FACTS[0], method="gated", layer=2, hparams=hparams, **ANY).edit
        assert e.method == "gated" and e.layers == (2,) and e.header["format_version"] == fmt
        assert [(m["rank"], m["threshold"], m.get("min_cosine")) for m in e.header["matrices"]] == [
            (1, 0.6, min_cosine)
        ]
        assert weights_digest(loaded.model) == base  # the column is served beside the matrix
        one = score()
        assert one > before
        assert score(edit_version=0) == before  # a pinned read gets version 0's columns: none
        batch = c.apply_edits(FACTS[1:], method="gated", layer=2, hparams=hparams, **ANY).edit
        assert batch.version == 2 and [m["rank"] for m in batch.header["matrices"]] == [2]
        two = score()
        assert score(edit_version=1) == one
        c.revert_edit(to_version=0)
        assert score() == before and weights_digest(loaded.model) == base
        c.revert_edit(to_version=2)
        assert score() == two
    srv.stop()
    again = serve(make_tiny("llama", tokenizer), LIMITS, edits=True, edit_store=store)  # a restart
    with Client(again.target, timeout=60) as c:
        assert c.score(prompt, [target]).scores[0].total_logprob == two
        assert c.score(prompt, [target], edit_version=1).scores[0].total_logprob == one
