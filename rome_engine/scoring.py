"""Log-probabilities of continuations of a prompt under the model.

    scores = score_continuations(loaded, "The Eiffel Tower is in", [" Paris", " Rome"])
    scores[0].total_logprob   # log P(" Paris" | prompt), natural log
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .loading import LoadedModel


@dataclass(frozen=True)
class TokenScore:
    """A token with its log-probability (natural log): in a scored continuation, and as one
    of a generated token's top alternatives (``generation.TokenAlternative``)."""

    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class ContinuationScore:
    continuation: str
    total_logprob: float
    mean_logprob: float
    tokens: tuple[TokenScore, ...]


def encode_prompt(tokenizer: object, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def split_continuation(tokenizer: object, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, continuation) such that prompt + continuation reads as one text.

    Tokenizing the joined text keeps merges across the boundary the way the
    model saw them in training; when the prompt's own tokens are not a prefix
    of the joined tokens (a merge crosses the boundary), the two are
    tokenized apart.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    joined = encode_prompt(tokenizer, prompt + continuation)
    if joined[: len(prompt_ids)] == prompt_ids and len(joined) > len(prompt_ids):
        return prompt_ids, joined[len(prompt_ids) :]
    return prompt_ids, list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def score_continuations(loaded: LoadedModel, prompt: str, continuations: list[str]) -> list[ContinuationScore]:
    """One batched forward pass over prompt + each continuation (right-padded)."""
    tok = loaded.tokenizer
    pairs = [split_continuation(tok, prompt, c) for c in continuations]
    rows = [p + c for p, c in pairs]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    logits = loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device)).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    results = []
    for i, ((p, c), text) in enumerate(zip(pairs, continuations, strict=True)):
        # the token at position t is predicted by the logits at t - 1
        positions = range(len(p), len(p) + len(c))
        tokens = tuple(
            TokenScore(tid, tok.decode([tid]), float(logprobs[i, t - 1, tid]))
            for t, tid in zip(positions, c, strict=True)
        )
        total = sum(s.logprob for s in tokens)
        results.append(ContinuationScore(text, total, total / max(len(tokens), 1), tokens))
    return results
