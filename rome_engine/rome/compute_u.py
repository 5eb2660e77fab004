"""The key side of ROME: k* and the update direction C^-1 k*.

k* is what the edited projection (the MLP's output/down projection) reads at
the subject's last token, averaged over the prompt behind each context
prefix. The update writes along ``right = C^-1 k* / (k*^T C^-1 k*)`` so that
``right . k* = 1`` and keys uncorrelated with k* under C are left alone.

    k_star = compute_key(loaded, layer, templates, request)   # (D_in,) float32
    right = right_vector(C, k_star, shrinkage=hp.cov_shrinkage)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InvalidRequest
from ..hooks import Trace, run_until_stopped, stop_after
from ..loading import LoadedModel
from .request import SLOT, EditRequest, fill


def subject_span(template: str, subject: str) -> tuple[int, int, str]:
    """(start, end) character span of the subject in the filled text, and the text."""
    at = template.index(SLOT)
    return at, at + len(subject), fill(template, subject)


def last_subject_token(tokenizer: object, text: str, start: int, end: int) -> tuple[list[int], int]:
    """Token ids of ``text`` and the index of the token holding the subject's last character.

    With a fast tokenizer the offsets say which token covers character
    ``end - 1`` (a token that also runs past the subject, as in "Paris" ->
    "Parisian", still counts). Without offsets, the text up to the subject's
    end is tokenized on its own and its last token is taken.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if hits:
            return ids, hits[-1]
    else:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        head = tokenizer(text[:end], add_special_tokens=True)["input_ids"]
        if 0 < len(head) <= len(ids):
            return ids, len(head) - 1
    raise InvalidRequest(f"could not find the tokens of subject {text[start:end]!r} in {text!r}")


def prompt_rows(tokenizer: object, templates: Sequence[str], request: EditRequest) -> list[tuple[list[int], int]]:
    """(token ids, last subject token index) of the request's prompt behind each template."""
    rows = []
    for t in templates:
        filled_template = fill(t, request.prompt)  # "{prefix}. The {} is in"
        start, end, text = subject_span(filled_template, request.subject)
        rows.append(last_subject_token(tokenizer, text, start, end))
    return rows


@torch.no_grad()
def compute_keys(
    loaded: LoadedModel, layer: int, templates: Sequence[str], request: EditRequest
) -> torch.Tensor:
    """The edited projection's input at the last subject token of each prompt: (N_templates, D_in) float32."""
    rows = prompt_rows(loaded.tokenizer, templates, request)
    name = loaded.spec.mlp_out_name(layer)
    width = max(len(ids) for ids, _ in rows)
    pad = loaded.tokenizer.pad_token_id or 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (r, _) in enumerate(rows):  # right padding: positions stay 0..len-1
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with Trace(loaded.model, [name], capture_input=True, capture_output=False) as tr, stop_after(
        loaded.model, name
    ):
        run_until_stopped(loaded.model, input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device))
    keys = tr[name].input  # (N, T, D_in)
    index = torch.tensor([j for _, j in rows], device=keys.device)
    return keys[torch.arange(len(rows), device=keys.device), index].float()  # (N, D_in)


def compute_key(
    loaded: LoadedModel, layer: int, templates: Sequence[str], request: EditRequest, identity_weight: float = 1.0
) -> torch.Tensor:
    """k* = weighted mean over the templates of the key at the last subject token: (D_in,) float32.

    templates[0] is the unprefixed prompt "{}"; its key weighs ``identity_weight``, the others 1.
    """
    return mean_key(compute_keys(loaded, layer, templates, request), identity_weight)


def mean_key(keys: torch.Tensor, identity_weight: float = 1.0) -> torch.Tensor:
    """k* from ``compute_keys``' rows (N, D_in): their mean, row 0 (the unprefixed prompt) weighing
    ``identity_weight`` and the others 1: (D_in,) float32."""
    w = torch.ones(keys.shape[0], device=keys.device)
    w[0] = identity_weight
    return (w.unsqueeze(1) * keys).sum(0) / w.sum()  # (D_in,)


def solve_cov(cov: torch.Tensor, k: torch.Tensor, shrinkage: float = 0.0) -> torch.Tensor:
    """C^-1 k in float64, with C shrunk towards its mean eigenvalue: C' = (1 - a) C + a (tr C / d) I.

    A relative ridge of 1e-8 always stays in, so a rank-deficient C (a few
    tokens in a test) still solves.
    """
    return torch.linalg.solve(shrunk_cov(cov, shrinkage), k.double())


def shrunk_cov(cov: torch.Tensor, shrinkage: float = 0.0) -> torch.Tensor:
    """C' = (1 - a) C + (a + 1e-8) (tr C / d) I in float64: the matrix ``solve_cov`` solves with."""
    c = cov.double()
    d = c.shape[0]
    mean_eig = torch.trace(c) / d
    a = max(float(shrinkage), 0.0)
    return (1.0 - a) * c + (a + 1e-8) * mean_eig * torch.eye(d, dtype=c.dtype, device=c.device)


def right_vector(cov: torch.Tensor, k_star: torch.Tensor, shrinkage: float = 0.0) -> torch.Tensor:
    """v = C^-1 k* / ((C^-1 k*)^T k*): (D_in,) float32, so that v . k* = 1 (the key side of the
    factor, ``delta.LowRankFactor.v`` as one column; the ROME code's ``left_vector``)."""
    cinv_k = solve_cov(cov, k_star, shrinkage)  # (D_in,)
    denom = torch.dot(cinv_k, k_star.double())
    if not torch.isfinite(denom) or denom.abs() < 1e-30:
        raise ValueError("k*^T C^-1 k* vanishes: the key is degenerate (all-zero input?)")
    return (cinv_k / denom).float()
