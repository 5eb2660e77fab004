"""The value side of ROME: the delta that makes the model say the target.

A vector ``delta`` (D_out,) is added to the edited projection's output at the
subject's last token, in every context-prefixed prompt and in the KL prompt
"{subject} is a". It minimises (Meng et al. 2022, eq. 4)

    loss = mean_prompts( -mean_j log P(target_j | prefix + prompt + target_<j) )     # make the edit
         + kl_factor * KL( P_orig(. | "{subject} is a") || P_delta(. | ...) )         # keep the subject's essence
         + v_weight_decay * (||delta|| / ||W k*||)^2                                # stay small

by Adam in float32 (the model's own parameters get no gradients), stopping
early once the mean target probability reaches ``v_stop_prob`` (with ``v_stop_greedy``, or once
the target is the argmax of every prompt, MPES: Gupta et al. 2025, arXiv 2502.01636); after each
step ``||delta|| <= clamp_norm_factor * ||W k*||``. The target value is then
v* = W k* + delta (see ``apply.py`` for the solve).

Nothing before the subject's last token depends on delta, so the prompts'
tokens up to it run once, into a KV cache; each step runs only the tokens
from the subject's last token on (the left-padded cached part and the
right-padded live part share one attention mask). Nothing below the edited
layer depends on delta either: the blocks below it run once and are replayed
(``hooks.replay``). Each step stops at the loss layer, whose output goes
through the final norm and the unembedding only at the positions that are
scored.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..arch import get_module
from ..generation import cache_kwarg
from ..hooks import Trace, replay, run_until_stopped, stop_after
from ..loading import LoadedModel
from ..scoring import split_continuation
from .cache import ProgressFn
from .compute_u import last_subject_token, subject_span
from .hparams import RomeHParams
from .request import EditRequest, fill

log = logging.getLogger(__name__)

KL_TEMPLATE = "{} is a"


@dataclass(frozen=True)
class DeltaResult:
    delta: torch.Tensor  # (D_out,) float32: v* - W k*
    base_norm: float  # ||W k*||, the edited projection's output without the edit
    steps: int  # Adam steps taken
    target_prob: float  # mean over prompts of exp(mean log P(target token)) with the final delta
    nll: float
    kl: float


@dataclass
class _Row:
    ids: list[int]  # the whole input (prompt + target minus its last token)
    subject_at: int  # index of the subject's last token
    targets: list[tuple[int, int]]  # (position predicting it, target token id)


@dataclass
class _Batch:
    prefix_ids: torch.Tensor  # (B, P) left-padded: tokens before the subject's last token
    prefix_mask: torch.Tensor  # (B, P)
    prefix_pos: torch.Tensor  # (B, P)
    suffix_ids: torch.Tensor  # (B, S) right-padded: the subject's last token on
    suffix_mask: torch.Tensor  # (B, S)
    suffix_pos: torch.Tensor  # (B, S)
    target_rows: torch.Tensor  # (M,) row of each scored target token
    target_cols: torch.Tensor  # (M,) suffix column whose output predicts it
    target_ids: torch.Tensor  # (M,)
    kl_rows: torch.Tensor  # (K,) KL prompt rows
    kl_cols: torch.Tensor  # (K,) their last suffix column
    n_prompts: int  # rows 0..n_prompts-1 are the rewrite prompts


def build_rows(tokenizer: object, templates: Sequence[str], request: EditRequest) -> tuple[list[_Row], list[_Row]]:
    """(rewrite rows, KL rows) for the request behind each template."""
    rewrite: list[_Row] = []
    for t in templates:
        start, end, text = subject_span(fill(t, request.prompt), request.subject)
        prompt_ids, at = last_subject_token(tokenizer, text, start, end)
        p_ids, t_ids = split_continuation(tokenizer, text, request.target)
        if p_ids != prompt_ids or not t_ids:
            raise ValueError(f"inconsistent tokenization of {text!r} + {request.target!r}")
        full = p_ids + t_ids
        targets = [(len(p_ids) - 1 + j, tid) for j, tid in enumerate(t_ids)]
        rewrite.append(_Row(full[:-1], at, targets))
    start, end, text = subject_span(KL_TEMPLATE, request.subject)
    ids, at = last_subject_token(tokenizer, text, start, end)
    kl = [_Row(ids, at, [(len(ids) - 1, -1)])]
    return rewrite, kl


def build_batch(rewrite: list[_Row], kl: list[_Row], pad_id: int, device: torch.device) -> _Batch:
    rows = rewrite + kl
    prefix_len = max(r.subject_at for r in rows)
    suffix_len = max(len(r.ids) - r.subject_at for r in rows)
    b = len(rows)
    prefix_ids = torch.full((b, prefix_len), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros((b, prefix_len), dtype=torch.long)
    prefix_pos = torch.zeros((b, prefix_len), dtype=torch.long)
    suffix_ids = torch.full((b, suffix_len), pad_id, dtype=torch.long)
    suffix_mask = torch.zeros((b, suffix_len), dtype=torch.long)
    suffix_pos = torch.zeros((b, suffix_len), dtype=torch.long)
    t_rows, t_cols, t_ids, k_rows, k_cols = [], [], [], [], []
    for i, r in enumerate(rows):
        p, s = r.subject_at, len(r.ids) - r.subject_at
        if p:
            prefix_ids[i, prefix_len - p :] = torch.tensor(r.ids[:p])
            prefix_mask[i, prefix_len - p :] = 1
            prefix_pos[i, prefix_len - p :] = torch.arange(p)
        suffix_ids[i, :s] = torch.tensor(r.ids[p:])
        suffix_mask[i, :s] = 1
        suffix_pos[i] = p + torch.arange(suffix_len)  # positions continue the row's own prefix
        for pos, tid in r.targets:
            if i < len(rewrite):
                t_rows.append(i)
                t_cols.append(pos - p)
                t_ids.append(tid)
            else:
                k_rows.append(i)
                k_cols.append(pos - p)

    def t(x: object) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.long, device=device)

    return _Batch(
        t(prefix_ids), t(prefix_mask), t(prefix_pos), t(suffix_ids), t(suffix_mask), t(suffix_pos),
        t(t_rows), t(t_cols), t(t_ids), t(k_rows), t(k_cols), len(rewrite),
    )  # fmt: skip


class _DeltaForward:
    """Runs the live tokens with ``delta`` added at the subject's last token.

    Two reuses, each switchable for benchmarks (the result is the same):
    ``cache_prefix`` runs the tokens before the subject's last token once into
    a KV cache (else every step runs whole prompts); ``skip_lower`` records the
    output of the blocks below the edited layer once and replays it in every
    step (else every step runs them).
    """

    def __init__(
        self, loaded: LoadedModel, layer: int, loss_layer: int, batch: _Batch,
        *, cache_prefix: bool = True, skip_lower: bool = True,
    ) -> None:  # fmt: skip
        self.loaded, self.batch = loaded, batch
        spec, model = loaded.spec, loaded.model
        self.edit_name = spec.mlp_out_name(layer)
        self.loss_name = spec.block_name(loss_layer)
        self.final_norm = get_module(model, spec.final_norm)
        self.unembed = get_module(model, spec.unembed)
        self.cache_kw = cache_kwarg(model)
        self.past = None
        p = batch.prefix_ids.shape[1]
        if cache_prefix:
            self.offset = 0  # live column of the subject's last token
            self.ids, self.pos = batch.suffix_ids, batch.suffix_pos
            self.live = batch.suffix_mask
            if p > 0:
                with torch.no_grad():  # only the KV cache is wanted: the model without its head
                    out = model.base_model(
                        input_ids=batch.prefix_ids, attention_mask=batch.prefix_mask, position_ids=batch.prefix_pos,
                        use_cache=True,
                    )  # fmt: skip
                self.past = getattr(out, self.cache_kw)
        else:
            self.offset = p
            self.ids = torch.cat([batch.prefix_ids, batch.suffix_ids], dim=1)
            self.pos = torch.cat([batch.prefix_pos, batch.suffix_pos], dim=1)
            # the prefix gets no delta, as when it is cached before the edit is felt
            self.live = torch.cat([torch.zeros_like(batch.prefix_mask), batch.suffix_mask], dim=1)
        self.mask = torch.cat([batch.prefix_mask, batch.suffix_mask], dim=1)  # (B, P + S)
        self.at_subject = torch.zeros(self.ids.shape, dtype=torch.bool, device=loaded.device)
        self.at_subject[:, self.offset] = True  # (B, offset + S)
        self.lower: dict[str, object] = {}
        if skip_lower and layer > 0:
            below = spec.block_name(layer - 1)
            with torch.no_grad(), Trace(model, [below]) as tr, stop_after(model, below):
                run_until_stopped(model, **self._inputs())
            # every block below the edited one returns the recorded output of the last of them
            self.lower = {spec.block_name(i): tr[below].raw_output for i in range(layer)}

    def _inputs(self) -> dict[str, object]:
        kwargs: dict[str, object] = {
            "input_ids": self.ids, "attention_mask": self.mask, "position_ids": self.pos,
            "use_cache": self.past is not None,
        }  # fmt: skip
        if self.past is not None:
            kwargs[self.cache_kw] = copy.deepcopy(self.past)  # the forward appends to it
        return kwargs

    def logits(self, delta: torch.Tensor, right: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(target-position logits (M, V), KL-position logits (K, V)), float32.

        Without ``right``, delta is added at the subject's last token only (the
        paper's v* objective). With ``right`` (D_in,), the forward runs the
        actual rank-one update W + delta right^T: every live position t gets
        (right . k_t) delta, so each prompt feels the edit as strongly as it
        will after the solve.
        """
        b = self.batch
        mask = self.at_subject.unsqueeze(-1)  # (B, T, 1)

        def add_delta(name: str, out: torch.Tensor) -> torch.Tensor:
            if right is None:
                return out + mask * delta.to(out.dtype)  # (B, T, D_out)
            k = edit[name].input.float()  # (B, T, D_in)
            scale = (k @ right) * self.live  # (B, T): right . k_t
            return out + (scale.unsqueeze(-1) * delta).to(out.dtype)

        model = self.loaded.model
        with (
            replay(model, self.lower),
            Trace(model, [self.edit_name], capture_input=True, capture_output=False, edit_output=add_delta) as edit,
            Trace(model, [self.loss_name], detach=False) as tr,
            stop_after(model, self.loss_name),
        ):
            run_until_stopped(model, **self._inputs())
        h = tr[self.loss_name].output[:, self.offset :]  # (B, S, D)
        picked = torch.cat([h[b.target_rows, b.target_cols], h[b.kl_rows, b.kl_cols]])  # (M + K, D)
        logits = self.unembed(self.final_norm(picked)).float()  # (M + K, V)
        m = b.target_rows.shape[0]
        return logits[:m], logits[m:]


def compute_delta(
    loaded: LoadedModel,
    layer: int,
    hp: RomeHParams,
    templates: Sequence[str],
    request: EditRequest,
    base_value: torch.Tensor,
    right: torch.Tensor | None = None,
    *,
    progress: ProgressFn | None = None,
) -> DeltaResult:
    """Optimise delta (D_out,) for ``request`` at ``layer``; ``base_value`` = W k* (D_out,).

    With ``right`` (D_in,) the optimisation runs through the rank-one update
    itself (see ``_DeltaForward.logits``); without, the paper's objective.
    """
    tok = loaded.tokenizer
    rewrite, kl_rows = build_rows(tok, templates, request)
    batch = build_batch(rewrite, kl_rows, tok.pad_token_id or 0, loaded.device)
    fwd = _DeltaForward(
        loaded, layer, hp.loss_layer(loaded.num_layers), batch,
        cache_prefix=bool(hp.v_cache_prefix), skip_lower=bool(hp.v_skip_lower),
    )  # fmt: skip

    base_norm = float(base_value.float().norm())
    max_norm = hp.clamp_norm_factor * base_norm
    delta = torch.zeros_like(base_value, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    # which rewrite prompt each scored token belongs to, to average per prompt: (M,)
    owner = batch.target_rows
    n_tok = torch.bincount(owner, minlength=batch.n_prompts).clamp(min=1).float()  # (N,)

    with torch.no_grad():
        _, kl_logits0 = fwd.logits(delta, right)
        kl_ref = torch.log_softmax(kl_logits0, dim=-1)  # (K, V) the unedited next-token distribution

    steps, nll_v, kl_v, prob_v = 0, math.nan, 0.0, 0.0
    for step in range(hp.v_num_grad_steps + 1):
        target_logits, kl_logits = fwd.logits(delta, right)
        logp = torch.log_softmax(target_logits, dim=-1)  # (M, V)
        tok_logp = logp.gather(1, batch.target_ids.unsqueeze(1)).squeeze(1)  # (M,)
        prompt_logp = torch.zeros(batch.n_prompts, device=tok_logp.device).index_add(0, owner, tok_logp) / n_tok
        nll = -prompt_logp.mean()
        # KL(P_orig || P_delta) = sum P_orig (log P_orig - log P_delta)
        kl = torch.nn.functional.kl_div(
            torch.log_softmax(kl_logits, dim=-1), kl_ref, log_target=True, reduction="batchmean"
        )
        decay = (delta.norm() / max(base_norm, 1e-12)) ** 2
        loss = nll + hp.kl_factor * kl + hp.v_weight_decay * decay
        nll_v, kl_v = nll.item(), kl.item()
        probs = prompt_logp.detach().exp()  # (N,) per prompt; 0 is the unprefixed one
        prob_v = probs.mean().item()
        log.debug("v* step %d: loss %.3f nll %.3f kl %.4f |delta| %.3f P(target) %.3f (unprefixed %.3f)",
                  step, loss.item(), nll_v, kl_v, delta.norm().item(), prob_v, probs[0].item())  # fmt: skip
        if progress is not None:
            progress("optimize_v", step, hp.v_num_grad_steps)
        done = prob_v >= hp.v_stop_prob and probs[0].item() >= hp.v_stop_prob * hp.v_stop_identity
        if hp.v_stop_greedy and not done:  # most-probable early stopping: the target already wins everywhere
            done = bool((target_logits.argmax(dim=-1) == batch.target_ids).all())
        if done or step == hp.v_num_grad_steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        with torch.no_grad():  # ||delta|| <= clamp_norm_factor * ||W k*||
            norm = delta.norm()
            if norm > max_norm > 0:
                delta.mul_(max_norm / norm)

    log.info(
        "v* after %d steps: P(target) %.3f, nll %.3f, kl %.4f, |delta| / |W k*| = %.2f",
        steps, prob_v, nll_v, kl_v, delta.detach().norm().item() / max(base_norm, 1e-12),
    )  # fmt: skip
    return DeltaResult(delta.detach().clone(), base_norm, steps, prob_v, nll_v, kl_v)
