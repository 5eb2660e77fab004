"""The accumulating methods on tiny random models: MEMIT, the projected mode, FT-L, and their algebra."""

from __future__ import annotations

import pytest
import torch

from rome_engine.delta import as_if_applied
from rome_engine.errors import FailedPrecondition, InvalidRequest
from rome_engine.loading import LoadedModel
from rome_engine.methods import (
    LowRankFactor,
    MemitHParams,
    MethodResult,
    compute_ft,
    compute_memit,
    compute_method,
    compute_projected,
    default_method,
    layer_eigenbasis,
    preserved_basis,
    projector,
)
from rome_engine.methods.ft import finetune_delta, resolve_ft_hparams, truncated_factor
from rome_engine.methods.projection import BasisChain, extend_basis
from rome_engine.methods.solve import CovRidge, memit_factor, projected_factor
from rome_engine.rome import EditRequest, RomeCache
from rome_engine.scoring import score_continuations

pytestmark = pytest.mark.usefixtures("one_thread")

# Small enough that an edit of a tiny model takes about a second: C from 256 tokens (shrunk a little:
# 256 tokens hardly pin down a 256 x 256 C), two prefixes, few z steps at a step size that suits a
# residual of norm ~0.3; the range 0..2 ends below the last block (z reaches the prompt's end through
# a later block's attention).
TINY = {
    "layer": 2,
    "n_layers": 3,
    "mom2_n_tokens": 256,
    "mom2_seq_len": 32,
    "mom2_batch_size": 8,
    "cov_shrinkage": 0.1,
    "mom2_update_weight": 100.0,
    "v_num_grad_steps": 10,
    "v_lr": 0.02,
    "v_weight_decay": 0.01,
    "clamp_norm_factor": 4.0,
    "ctx_n_short": 1,
    "ctx_n_long": 1,
    "ctx_len_long": 6,
}
# The projected mode on a tiny C: preserve the eigenvectors above half the mean eigenvalue.
TINY_PROJ = {**TINY, "nullspace_threshold": 0.5, "nullspace_relative": 1}

FACTS = (
    EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome"),
    EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English"),
    EditRequest("Toko Yasuda plays the", "Toko Yasuda", "piano"),
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> RomeCache:
    return RomeCache(tmp_path_factory.mktemp("methods-cache"))


@pytest.fixture(scope="module")
def memit_batch(tiny_gpt2: LoadedModel, cache: RomeCache) -> tuple[MethodResult, dict[str, torch.Tensor]]:
    """MEMIT of three facts on the tiny GPT-2, and the parameters before it ran."""
    snap = {n: p.detach().clone() for n, p in tiny_gpt2.model.named_parameters()}
    return compute_memit(tiny_gpt2, FACTS, cache, overrides=TINY), snap


def _out_in(loaded: LoadedModel, param: str) -> torch.Tensor:
    return loaded.spec.as_out_in(loaded.model.get_parameter(param)).detach().float()  # (out, in)


def _logprob(loaded: LoadedModel, request: EditRequest) -> float:
    with torch.no_grad():
        return score_continuations(loaded, request.filled(), [request.target])[0].total_logprob


# -- MEMIT ------------------------------------------------------------------------


def test_memit_leaves_the_weights_unchanged(memit_batch: tuple[MethodResult, dict], tiny_gpt2: LoadedModel) -> None:
    _, snap = memit_batch
    for n, p in tiny_gpt2.model.named_parameters():
        assert torch.equal(p, snap[n]), f"{n} changed"


def test_a_batch_of_three_facts_gives_rank_three_factors(memit_batch: tuple[MethodResult, dict]) -> None:
    result, _ = memit_batch
    assert result.layers == (0, 1, 2)
    assert result.params == tuple(f"transformer.h.{i}.mlp.c_proj.weight" for i in (0, 1, 2))
    for f in result.factors:
        assert f.u.shape == (64, 3) and f.v.shape == (256, 3)  # GPT-2's c_proj as (out, in): 64 x 256
        assert f.u.dtype == f.v.dtype == torch.float32
        assert int(torch.linalg.matrix_rank(f.delta())) == 3
        assert result.keys[f.param].shape == (256, 3)
    assert [r.request for r in result.requests] == list(FACTS)


def test_memit_moves_the_target_in_every_layer_of_its_range(
    memit_batch: tuple[MethodResult, dict], tiny_gpt2: LoadedModel
) -> None:
    result, _ = memit_batch
    for fact in FACTS:
        before = _logprob(tiny_gpt2, fact)
        for f in result.factors:
            assert f.norm > 0
            with as_if_applied(tiny_gpt2, [f]):  # this layer's update alone
                alone = _logprob(tiny_gpt2, fact)
            assert alone > before + 1e-3, f"{f.param} alone: {before:.4f} -> {alone:.4f} for {fact.target!r}"
        with as_if_applied(tiny_gpt2, result.factors):
            together = _logprob(tiny_gpt2, fact)
        assert together > before + 1e-2


def test_each_layer_writes_its_share_at_its_keys(memit_batch: tuple[MethodResult, dict]) -> None:
    """Delta_i K_i = R_i V^T K_i: with lambda C small next to K K^T the layer writes most of its residual share."""
    result, _ = memit_batch
    for f, info in zip(result.factors, result.layer_info, strict=True):
        k = result.keys[f.param]
        share = torch.diagonal(f.v.T @ k)  # (3,): v_j . k_j
        assert 0.0 < float(share.min()) <= float(share.max()) < 1.0 + 1e-4
        assert info.written == pytest.approx(float(share.mean()), rel=1e-5)


def test_as_if_applied_equals_writing_the_weights(
    memit_batch: tuple[MethodResult, dict], tiny_gpt2: LoadedModel
) -> None:
    result, _ = memit_batch
    f = result.factors[1]
    module = tiny_gpt2.model.get_submodule(f.param.removesuffix(".weight"))
    x = torch.randn(2, 5, 256)
    with torch.no_grad(), as_if_applied(tiny_gpt2, [f]):
        patched = module(x)
    expected = x @ (_out_in(tiny_gpt2, f.param) + f.delta()).T + module.bias  # (W + u v^T) x + b
    torch.testing.assert_close(patched, expected, rtol=1e-4, atol=1e-5)


def test_memit_solve_is_the_papers_normal_equation() -> None:
    """Delta = R K^T (lambda C + K K^T)^-1 minimises ||Delta K - R||^2 + lambda tr(Delta C Delta^T)."""
    torch.manual_seed(0)
    a = torch.randn(12, 12, dtype=torch.float64)
    cov = a @ a.T / 12
    keys, resid = torch.randn(12, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    u, v = memit_factor(resid, keys, cov, lam=2.0)
    delta = (u.double() @ v.double().T)
    # stationarity: (Delta K - R) K^T + lambda Delta C = 0
    grad = (delta @ keys - resid) @ keys.T + 2.0 * delta @ (cov + 1e-8 * torch.trace(cov) / 12 * torch.eye(12))
    assert float(grad.abs().max()) < 1e-5


# -- the projected mode -------------------------------------------------------------


def test_projected_solve_spares_every_key_the_projector_removes() -> None:
    torch.manual_seed(0)
    d = 16
    keep = torch.linalg.qr(torch.randn(d, 5, dtype=torch.float64)).Q  # preserved span
    prior = torch.randn(d, 3, dtype=torch.float64)
    proj = projector(keep, prior, hard=True)
    assert proj.free == d - 5 - 3
    dense = proj.dense()
    torch.testing.assert_close(dense @ dense, dense)  # a projector
    keys, resid = torch.randn(d, 2, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    u, v = projected_factor(resid, keys, proj, alpha=0.1)
    spared = torch.cat([keep @ torch.randn(5, 4, dtype=torch.float64), prior], dim=1)  # P k = 0
    assert float((u.double() @ (v.double().T @ spared)).abs().max()) < 1e-5
    assert float((u.double() @ (v.double().T @ keys)).abs().max()) > 0.1  # and it writes at its own keys


def test_projected_solve_equals_the_d_by_d_system() -> None:
    """The hard mode's r x r solve (push-through identity) is AlphaEdit's (P K K^T + alpha I)^-1 P K."""
    torch.manual_seed(1)
    d = 24
    keep = torch.linalg.qr(torch.randn(d, 6, dtype=torch.float64)).Q
    proj = projector(keep, torch.randn(d, 4, dtype=torch.float64), hard=True)
    keys, resid = torch.randn(d, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    _, v = projected_factor(resid, keys, proj, alpha=0.3)
    p = proj.dense()
    expected = torch.linalg.solve(p @ keys @ keys.T + 0.3 * torch.eye(d, dtype=torch.float64), p @ keys)
    torch.testing.assert_close(v.double(), expected, rtol=1e-5, atol=1e-6)


def test_cov_weighted_ridge_is_the_d_by_d_system_spares_the_same_keys_and_writes_where_c_is_small() -> None:
    """null_cov_weight: the hard mode's conjugate-gradient solve is (P (K K^T + gamma C) P + alpha I)^-1 P K,
    still leaves every key with P k = 0 alone, and moves ordinary (C-distributed) keys less than the flat ridge."""
    g = torch.Generator().manual_seed(6)
    d = 32
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g)).Q
    cov = basis @ torch.diag(torch.logspace(-3, 1, d, dtype=torch.float64)) @ basis.T  # a spread spectrum
    keep = basis[:, -4:]  # the four largest directions are preserved
    prior = torch.randn(d, 3, dtype=torch.float64, generator=g)
    proj = projector(keep, prior, hard=True)
    keys, resid = torch.randn(d, 2, dtype=torch.float64, generator=g), torch.randn(5, 2, dtype=torch.float64)
    alpha, gamma = 0.2, 3.0
    _, v = projected_factor(resid, keys, proj, alpha, cov_ridge=CovRidge(cov, gamma))
    p = proj.dense()
    expected = torch.linalg.solve(p @ (keys @ keys.T + gamma * cov) @ p + alpha * torch.eye(d, dtype=p.dtype), p @ keys)
    torch.testing.assert_close(v.double(), expected, rtol=1e-5, atol=1e-7)
    spared = torch.cat([keep, prior], dim=1)
    assert float((v.double().T @ spared).abs().max()) < 1e-6
    _, flat = projected_factor(resid, keys, proj, alpha)

    def disturbance(v: torch.Tensor) -> float:  # E||Delta x||^2 over x ~ C, per unit written at the keys
        v = v.double()
        return float(torch.trace(v.T @ cov @ v) / torch.diagonal(v.T @ keys).pow(2).sum())

    assert disturbance(v) < 0.9 * disturbance(flat)
    # the soft mode's dense solve takes the same term
    _, soft = projected_factor(resid, keys, projector(keep), alpha, prior @ prior.T, CovRidge(cov, gamma))
    pk = projector(keep).dense()
    m = keys @ keys.T + prior @ prior.T + gamma * cov
    torch.testing.assert_close(
        soft.double(),
        torch.linalg.solve(pk @ m + alpha * torch.eye(d, dtype=pk.dtype), pk @ keys),
        rtol=1e-5,
        atol=1e-7,
    )


def test_an_ill_conditioned_cov_weighted_solve_is_refused_not_returned() -> None:
    """A null_cov_weight far beyond sense (gamma / alpha ~1e12 on a spectrum spread over 1e12) stops
    conjugate gradients short of the answer: FailedPrecondition naming the knob, never an approximate factor."""
    g = torch.Generator().manual_seed(7)
    d = 64
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g)).Q
    cov = basis @ torch.diag(torch.logspace(-8, 4, d, dtype=torch.float64)) @ basis.T
    proj = projector(torch.zeros(d, 0, dtype=torch.float64))
    keys, resid = torch.randn(d, 1, dtype=torch.float64, generator=g), torch.randn(5, 1, dtype=torch.float64)
    with pytest.raises(FailedPrecondition, match="did not converge.*smaller null_cov_weight"):
        projected_factor(resid, keys, proj, 1e-6, cov_ridge=CovRidge(cov, 1e6))
    projected_factor(resid, keys, proj, 1.0, cov_ridge=CovRidge(cov, 1e-4))  # a sane weight solves


def _blocks(n: int, d: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(f"edit-{i}", torch.randn(d, 1 + i % 3, generator=g)) for i in range(n)]


def test_key_basis_memo_gives_the_bits_of_a_fresh_fold_and_refolds_after_a_revert() -> None:
    """The earlier keys' basis is extended edit by edit from a memo; a fresh fold (a restart) gives
    the same bits, and a history that is not an extension (a middle edit reverted) is refolded."""
    d = 64
    keep = torch.linalg.qr(torch.randn(d, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))).Q
    blocks = _blocks(12, d, seed=4)
    chain = BasisChain()
    for n in range(1, len(blocks) + 1):  # one more edit each time, as a run of ApplyEdit sees them
        q = chain.basis(keep, blocks[:n])
    fresh = projector(keep, blocks).basis
    assert torch.equal(q, fresh)
    assert q.shape[1] == 10 + sum(k.shape[1] for _, k in blocks)
    torch.testing.assert_close(q.T @ q, torch.eye(q.shape[1], dtype=q.dtype), rtol=0, atol=1e-12)
    # the earlier keys lie in Q's span: P k_p = 0
    p = projector(keep, blocks, chain=chain)
    assert float(p.apply(torch.cat([k for _, k in blocks], dim=1)).abs().max()) < 1e-9
    # revert of edit-5: the memo is not a prefix of the new history, so it is folded again
    without = blocks[:5] + blocks[6:]
    assert torch.equal(chain.basis(keep, without), projector(keep, without).basis)
    # another preserved basis (other hyperparameters) never reuses the memo
    keep2 = keep[:, :8]
    assert torch.equal(chain.basis(keep2, without), projector(keep2, without).basis)


def test_key_basis_stays_orthonormal_over_many_extensions_and_skips_spanned_keys() -> None:
    d = 96
    g = torch.Generator().manual_seed(5)
    q = torch.linalg.qr(torch.randn(d, 20, dtype=torch.float64, generator=g)).Q
    for _ in range(70):
        q = extend_basis(q, torch.randn(d, 1, generator=g) * 1e3)
    assert q.shape[1] == 90
    torch.testing.assert_close(q.T @ q, torch.eye(90, dtype=q.dtype), rtol=0, atol=1e-10)
    inside = q @ torch.randn(90, 2, dtype=torch.float64, generator=g)  # already spanned: adds nothing
    assert extend_basis(q, inside).shape[1] == 90


def test_soft_prior_is_a_penalty_not_a_constraint() -> None:
    torch.manual_seed(0)
    d = 16
    keep = torch.linalg.qr(torch.randn(d, 5, dtype=torch.float64)).Q
    prior = torch.randn(d, 3, dtype=torch.float64)
    proj = projector(keep, prior, hard=False)
    assert proj.free == d - 5
    keys, resid = prior[:, :1] + 0.5 * torch.randn(d, 1, dtype=torch.float64), torch.randn(7, 1, dtype=torch.float64)
    u, v = projected_factor(resid, keys, proj, alpha=0.1, prior_gram=prior @ prior.T)
    u0, v0 = projected_factor(resid, keys, proj, alpha=0.1)
    moved = float((u.double() @ (v.double().T @ prior)).norm())
    assert 0 < moved < float((u0.double() @ (v0.double().T @ prior)).norm())  # less than without K_p K_p^T


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_projected_update_leaves_earlier_keys_and_the_preserved_span_unchanged(
    family: str, request: pytest.FixtureRequest, cache: RomeCache
) -> None:
    loaded: LoadedModel = request.getfixturevalue(family)
    snap = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    first = compute_projected(loaded, FACTS[:2], cache, overrides=TINY_PROJ)
    second = compute_projected(loaded, FACTS[2:], cache, prior_keys=first.keys, overrides=TINY_PROJ)
    for n, p in loaded.model.named_parameters():
        assert torch.equal(p, snap[n]), f"{n} changed"
    hp = MemitHParams(**{k: v for k, v in TINY_PROJ.items()})
    for f in second.factors:
        w = _out_in(loaded, f.param)  # (out, in) float32
        w_new = w + f.delta()  # W' = W + u v^T, float32
        k_p = first.keys[f.param]  # (in, 2): the earlier edit's keys
        torch.testing.assert_close(w_new @ k_p, w @ k_p, rtol=0, atol=1e-4)
        layer = int(f.param.split(".")[2])
        eig, _ = layer_eigenbasis(loaded, layer, hp.z_hparams(layer), cache)
        keep = preserved_basis(eig, hp.nullspace_threshold, relative=True).float()  # (in, m)
        assert 0 < keep.shape[1] < keep.shape[0]
        torch.manual_seed(0)
        k = keep @ torch.randn(keep.shape[1], 8)  # keys in the preserved span: P k = 0
        torch.testing.assert_close(w_new @ k, w @ k, rtol=0, atol=1e-4)
        k_new = second.keys[f.param]
        assert float((f.delta() @ k_new).norm()) > 1e-3  # the edit itself writes
        info = second.layer_info[second.layers.index(layer)]
        assert info.free_dims == keep.shape[0] - keep.shape[1] - 2


def test_projected_refuses_a_layer_with_no_free_direction(tiny_llama: LoadedModel, cache: RomeCache) -> None:
    d_in = 128
    prior = {tiny_llama.spec.mlp_out_weight_name(i): torch.randn(d_in, d_in) for i in range(3)}
    with pytest.raises(FailedPrecondition, match="no free direction"):
        compute_projected(tiny_llama, FACTS[:1], cache, prior_keys=prior, overrides=TINY_PROJ)


# -- FT-L ---------------------------------------------------------------------------


def test_ft_respects_its_norm_bound_and_raises_the_target(tiny_llama: LoadedModel, cache: RomeCache) -> None:
    overrides = {"layer": 1, "ft_num_steps": 10, "norm_constraint": 2e-3, "ft_lr": 1e-3}
    hp = resolve_ft_hparams(tiny_llama, FACTS[:1], cache, overrides)
    delta, loss = finetune_delta(tiny_llama, hp, FACTS[:1])
    assert delta.shape == (64, 128)  # down_proj (out, in)
    assert float(delta.abs().max()) <= 2e-3 * (1 + 1e-6)
    assert float(delta.abs().max()) > 1e-3  # it moved
    assert loss.steps == 10

    before = _logprob(tiny_llama, FACTS[0])
    param = tiny_llama.spec.mlp_out_weight_name(1)
    with as_if_applied(tiny_llama, [LowRankFactor(param, delta, torch.eye(128))]):  # Delta W exactly
        after = _logprob(tiny_llama, FACTS[0])
    assert after > before + 1e-2

    result = compute_ft(tiny_llama, FACTS[:1], cache, overrides={**overrides, "ft_max_rank": 4})
    (f,) = result.factors
    assert f.param == param and f.rank == 4 and result.keys[param].shape == (128, 1)
    err = result.layer_info[0].truncation_error
    assert err == pytest.approx(float((delta - f.delta()).norm() / delta.norm()), rel=1e-3)


def test_truncation_keeps_a_low_rank_change_exact() -> None:
    torch.manual_seed(0)
    delta = torch.randn(20, 2) @ torch.randn(2, 30)
    u, v, err = truncated_factor(delta, max_rank=8)
    assert u.shape == (20, 2) and v.shape == (30, 2) and err < 1e-6
    torch.testing.assert_close(u @ v.T, delta, rtol=1e-5, atol=1e-5)
    u, v, err = truncated_factor(delta, max_rank=1)
    assert u.shape == (20, 1) and 0 < err < 1


# -- hyperparameters, dispatch, progress ------------------------------------------------


def test_hparams_are_typed_checked_and_flat() -> None:
    hp = MemitHParams().with_overrides({"n_layers": 4.0, "layer": 6, "v_lr": 0.25})
    assert hp.n_layers == 4 and isinstance(hp.n_layers, int) and hp.layer_range() == (3, 4, 5, 6)
    assert hp.to_dict()["v_lr"] == 0.25
    assert hp.z_hparams(6).layer == 6 and hp.z_hparams(6).v_through_update == 0
    with pytest.raises(InvalidRequest, match="n_layers"):
        MemitHParams().with_overrides({"bogus": 1})
    with pytest.raises(InvalidRequest, match="whole number"):
        MemitHParams().with_overrides({"n_layers": 2.5})
    with pytest.raises(InvalidRequest, match="out of range"):
        MemitHParams().with_overrides({"hard_prior": 2})
    with pytest.raises(InvalidRequest, match="do not fit"):
        MemitHParams(layer=1, n_layers=3).check_layers(4)
    with pytest.raises(InvalidRequest, match="before the loss layer"):
        MemitHParams(layer=3, n_layers=2).check_layers(4)


def test_dispatch_and_progress(tiny_llama: LoadedModel, cache: RomeCache) -> None:
    stages: list[str] = []
    compute_method("memit", tiny_llama, FACTS[:1], cache, overrides={**TINY, "n_layers": 2},
                   progress=lambda s, d, t: stages.append(s))  # fmt: skip
    assert {"prefixes", "optimize_z", "solve"} <= set(stages)
    with pytest.raises(InvalidRequest, match="unknown method"):
        compute_method("mend", tiny_llama, FACTS[:1], cache)
    with pytest.raises(InvalidRequest, match="one fact at a time"):
        compute_method("rome", tiny_llama, FACTS[:2], cache)


def test_a_progress_callback_that_raises_abandons_the_edit(tiny_llama: LoadedModel, cache: RomeCache) -> None:
    snap = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters()}

    def cancel(stage: str, done: int, total: int) -> None:
        if stage == "solve" and done == 1:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        compute_memit(tiny_llama, FACTS[:1], cache, overrides=TINY, progress=cancel)
    for n, p in tiny_llama.model.named_parameters():
        assert torch.equal(p, snap[n]), f"{n} changed"


def test_each_method_checks_its_own_hparam_names(tiny_llama: LoadedModel) -> None:
    """A request's hparams are checked by the method that runs it, before any work is admitted."""
    from rome_engine.errors import InvalidRequest
    from rome_engine.methods import work_hparams

    assert work_hparams("memit", tiny_llama, {"n_layers": 2, "v_lr": 0.1}).v_lr == 0.1
    assert work_hparams("rome", tiny_llama, {"v_lr": 0.2}).v_lr == 0.2
    bad_names = (("rome", "n_layers"), ("memit", "ft_lr"), ("projected", "bogus"), ("ft", "nullspace_threshold"))
    for method, bad in bad_names:
        with pytest.raises(InvalidRequest, match=bad):
            work_hparams(method, tiny_llama, {bad: 1.0})
    with pytest.raises(InvalidRequest, match="unknown method"):
        work_hparams("sgd", tiny_llama, {})


def test_rome_as_a_method_is_its_rank_one_update(tiny_llama: LoadedModel, cache: RomeCache) -> None:
    shared = ("mom2_n_tokens", "mom2_seq_len", "mom2_batch_size", "ctx_n_short", "ctx_n_long", "ctx_len_long")
    overrides = {**{k: TINY[k] for k in shared}, "layer": 1, "v_num_grad_steps": 3}
    result = compute_method("rome", tiny_llama, FACTS[:1], cache, overrides=overrides)
    (f,) = result.factors
    assert result.method == "rome" and result.layers == (1,) and f.param == tiny_llama.spec.mlp_out_weight_name(1)
    assert f.u.shape == (64, 1) and f.v.shape == (128, 1)
    k = result.keys[f.param]
    assert k.shape == (128, 1)
    assert float(f.v[:, 0] @ k[:, 0]) == pytest.approx(1.0, rel=1e-4)  # ROME writes its whole delta at k*


def test_the_auto_default_is_rome_on_a_model_without_an_evaluated_range(tiny_llama: LoadedModel) -> None:
    """"auto" picks the projected mode only where a layer range was evaluated (the embedded model:
    tests/server/test_edits.py); a tiny model of unknown depth keeps ROME."""
    assert default_method(tiny_llama) == "rome"


def test_an_unknown_server_default_method_is_refused_at_start(tiny_llama: LoadedModel) -> None:
    from rome_engine.engine import Engine, EngineLimits

    with pytest.raises(ValueError, match="edit_method must be auto or one of rome, memit, projected, ft"):
        Engine(tiny_llama, EngineLimits(edit_method="alphaedit"))
    engine = Engine(tiny_llama, EngineLimits())
    try:
        assert engine.info().default_edit_method == "rome"
    finally:
        engine.close()
