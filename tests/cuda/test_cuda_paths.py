"""The CUDA paths (issue #15): tiny models of each family on the GPU in float16 and bfloat16.

Marked ``cuda``. They run on ``$ROMEGW_TEST_DEVICE`` (default ``cuda``) and skip where that
device is missing: ``bash bench/gpu.sh`` runs them on the GPU machine, and its CPU dry run
(``bash bench/gpu.sh --cpu-dry-run``, which the suite runs in ``tests/bench/test_gpu_dry_run.py``)
runs them on the CPU so that they cannot rot.

What they hold, per family and half-precision dtype:
- the gateway's greedy tokens equal the float32 CPU model's wherever the float32 logits' top-two
  margin exceeds what half precision can flip (``MARGIN``);
- streams batched together produce the tokens each produces alone (same margin rule);
- a ROME edit computes C and v* in float32, makes the target likelier, and a revert gives the
  touched matrix back byte for byte;
- the batched causal-trace grid equals the per-position reference within ``TRACE_TOL``.
"""

from __future__ import annotations

import copy
import os
import threading

import pytest
import torch

from rome_engine.engine import EngineLimits
from rome_engine.loading import LoadedModel, wrap_model
from rome_engine.rome import EditRequest, RomeCache, compute_edit, hparams_for
from rome_engine.rome.covariance import layer_covariance
from rome_engine.tracing import TraceRequest, trace, trace_per_position
from romegw_client import Client
from tests.conftest import make_tiny

pytestmark = pytest.mark.cuda

FAMILIES = ["gpt2", "gptj", "llama"]
DTYPES = [torch.float16, torch.bfloat16]
PROMPTS = ["The Eiffel Tower is in", "Once upon a time, in a small village,", "The capital of Japan is"]
N_TOKENS = 12
# a half-precision forward pass of these tiny models moves a logit (|logit| < 1) by up to ~8e-4
# in float16 and ~6e-3 in bfloat16 (measured on the CPU); a top-two gap 6x wider cannot be flipped
MARGIN = {torch.float16: 0.005, torch.bfloat16: 0.04}
TRACE_TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}  # |batched - per-position| of probabilities
# a random tiny model hardly answers an edit (P(target) stays ~1e-5): these check the numbers' types
# and the weights' bytes, and let v* take long steps so that the update is far from zero
FAST = {"layer": 1, "mom2_n_tokens": 512, "mom2_seq_len": 32, "v_num_grad_steps": 10, "v_weight_decay": 0.0,
        "kl_factor": 0.0, "clamp_norm_factor": 50.0, "ctx_n_short": 1, "ctx_n_long": 1}


@pytest.fixture(scope="module")
def device() -> torch.device:
    name = os.environ.get("ROMEGW_TEST_DEVICE", "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(
            "no CUDA device here: `bash bench/gpu.sh` runs these on the GPU machine, "
            "`bash bench/gpu.sh --cpu-dry-run` (ROMEGW_TEST_DEVICE=cpu) on the CPU"
        )
    return torch.device(name)


def on(reference: LoadedModel, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The same weights as ``reference``, cast to ``dtype`` on ``device``."""
    model = copy.deepcopy(reference.model).to(device=device, dtype=dtype)
    return wrap_model(model, reference.tokenizer, model_id=f"{reference.model_id}-{dtype}", device=device)


def greedy_reference(loaded: LoadedModel, prompt: str, n: int) -> tuple[list[int], list[float]]:
    """float32 CPU greedy tokens and, at each step, the gap between the two best logits."""
    ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
    tokens, margins = [], []
    with torch.inference_mode():
        for _ in range(n):
            logits = loaded.model(input_ids=ids).logits[0, -1].float()
            top = torch.topk(logits, 2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
    return tokens, margins


def agree_while_decided(got: tuple[int, ...], want: list[int], margins: list[float], margin: float) -> int:
    """Asserts that the tokens agree at every step whose float32 margin decides it, and counts
    the steps compared: at a step too close to call, a different token ends the comparison (both
    continuations are right from there on), the same one lets it go on."""
    compared = 0
    for i, (g, w, m) in enumerate(zip(got, want, margins, strict=False)):
        if m < margin:
            if g != w:
                break
            continue
        assert g == w, f"token {i}: {g} != {w} although the float32 margin is {m:.3f}"
        compared += 1
    return compared


@pytest.fixture(scope="module", params=FAMILIES)
def reference(request, tokenizer) -> LoadedModel:
    return make_tiny(request.param, tokenizer, seed=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_greedy_tokens_equal_float32_and_batched_equals_alone(reference, dtype, device, serve) -> None:
    half = on(reference, device, dtype)
    srv = serve(half, EngineLimits(max_batch_size=8))
    compared = 0
    with Client(srv.target, timeout=300) as c:
        alone = [c.generate_text(p, max_new_tokens=N_TOKENS).token_ids for p in PROMPTS]
        for prompt, got in zip(PROMPTS, alone, strict=True):
            want, margins = greedy_reference(reference, prompt, N_TOKENS)
            compared += agree_while_decided(got, want, margins, MARGIN[dtype])
        together: list[tuple[int, ...] | None] = [None] * len(PROMPTS)
        barrier = threading.Barrier(len(PROMPTS))

        def one(i: int) -> None:
            with Client(srv.target, timeout=300) as ci:
                barrier.wait()
                together[i] = ci.generate_text(PROMPTS[i], max_new_tokens=N_TOKENS).token_ids

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for prompt, a, b in zip(PROMPTS, alone, together, strict=True):
            want, margins = greedy_reference(reference, prompt, N_TOKENS)
            assert b is not None and len(a) == len(b) == N_TOKENS
            agree_while_decided(b, want, margins, MARGIN[dtype])  # batched: the same rule as alone
    assert compared >= N_TOKENS // 2  # the margins left enough to compare (of 3 x 12 steps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rome_edit_in_float32_and_a_revert_is_byte_exact(reference, dtype, device, serve, tmp_path) -> None:
    half = on(reference, device, dtype)
    cache = RomeCache(tmp_path / "cache")
    cov, _ = layer_covariance(half, FAST["layer"], hparams_for(half).with_overrides(FAST), cache)
    assert cov.dtype == torch.float32 and cov.device.type == device.type  # C in float32 whatever the model's dtype
    edit = EditRequest("The Eiffel Tower is in", "The Eiffel Tower", " Rome", hparams=FAST)
    result = compute_edit(half, edit, cache)
    assert all(f.u.dtype == torch.float32 and f.v.dtype == torch.float32 for f in result.factors)  # v*, k* too
    assert torch.isfinite(result.factors[0].u).all() and torch.isfinite(result.factors[0].v).all()
    assert float(result.factors[0].u.norm()) > 0 and float(result.factors[0].v.norm()) > 0

    param = result.factors[0].param
    base = half.model.get_parameter(param).detach().clone()
    srv = serve(half, EngineLimits(max_update_norm_ratio=100.0), edits=True, edit_store=tmp_path / "edits",
                cache_dir=tmp_path / "cache")  # fmt: skip
    with Client(srv.target, timeout=600) as c:
        r = c.apply_edit(edit.prompt, edit.subject, edit.target, method="rome", hparams=FAST, min_target_prob=0.0,
                         force=True)  # fmt: skip
        assert r.edit.layers == (1,) and 0 <= r.edit.target_after <= 1
        touched = half.model.get_parameter(r.edit.matrices[0][0])
        assert touched.dtype == dtype and touched.device.type == device.type
        assert not torch.equal(touched.detach(), base)
        c.revert_edit(to_version=0)
        after = half.model.get_parameter(param).detach()
        assert after.view(torch.uint8).equal(base.view(torch.uint8))  # every byte of the base back


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_trace_grid_batched_equals_per_position(reference, dtype, device) -> None:
    half = on(reference, device, dtype)
    req = TraceRequest("The Eiffel Tower is in", "The Eiffel Tower", kind="hidden", samples=3, noise=1.0, seed=7)
    batched = trace(half, req, max_batch_rows=5)
    per_position = trace_per_position(half, req)
    assert batched.scores.shape == per_position.scores.shape
    diff = float((batched.scores.float() - per_position.scores.float()).abs().max())
    assert diff <= TRACE_TOL[dtype], f"batched vs per-position differ by {diff:.2e}"
