"""An edit that did not take (P(target) after it below min_target_prob) is refused and changes nothing."""

from __future__ import annotations

import pytest

from rome_engine.engine import EngineLimits
from romegw_client import Client, FailedPrecondition
from tests.conftest import weights_digest

FAST = {"v_num_grad_steps": 3, "mom2_n_tokens": 2000, "ctx_n_short": 1, "ctx_n_long": 1}



def test_an_edit_below_min_target_prob_is_refused_and_changes_nothing(tiny_llama, serve, tmp_path) -> None:
    store = tmp_path / "edits"
    srv = serve(tiny_llama, edits=True, edit_store=store, limits=EngineLimits(min_target_prob=1.0))
    before = weights_digest(tiny_llama.model)
    with Client(srv.target, timeout=300) as c:
        # the server's threshold (1.0: no edit reaches it): refused with the measured probabilities
        with pytest.raises(FailedPrecondition, match=r"did not take: P\(' Paris'\) on its prompt went .* -> .*"
                                                     r"below min_target_prob=1"):  # fmt: skip
            c.apply_edit("{} lives in", "Alice Smith", " Paris", hparams=FAST)
        assert c.model_info().head_version == 0 and c.list_edits(include_inactive=True).edits == ()
        assert weights_digest(tiny_llama.model) == before
        assert not list((store / "layers").glob("*")) and not (store / "manifest.json").exists()

        # a dry run reports it instead of refusing
        dry = c.apply_edit("{} lives in", "Alice Smith", " Paris", hparams=FAST, dry_run=True)
        assert dry.dry_run and dry.below_min_target_prob and dry.min_target_prob == 1.0

        # a request's own threshold overrides the server's: 0 accepts the same edit
        r = c.apply_edit("{} lives in", "Alice Smith", " Paris", hparams=FAST, min_target_prob=0.0)
        assert r.head_version == 1 and not r.below_min_target_prob and r.min_target_prob == 0.0
        assert r.edit.target_after == pytest.approx(dry.edit.target_after, rel=1e-3)
    c2 = Client(srv.target, timeout=60)
    with c2:
        c2.revert_edit(to_version=0)
    assert weights_digest(tiny_llama.model) == before
