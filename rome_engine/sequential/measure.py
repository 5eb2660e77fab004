"""What the sequential evaluation measures on one state of the model.

Over the CounterFact records edited so far it computes what
``rome_engine.evaluation`` computes for one record (``FactScores``: the paper's
probability comparisons, the greedy answers, fluency), with the same
definitions but batched over the records: the greedy continuations through the
server's continuous-batching decoder (``batching.BatchScheduler``, whose greedy
output equals a stream decoded alone up to float rounding), the comparisons
as right-padded forward passes of many (prompt, object) rows. Hundreds of
records per checkpoint make this 5-10x faster than one record at a time.
Beside them, two measures of what the edits may break:

* retention of known facts: the facts of ``known_1000.json`` (Meng et al. 2022)
  whose greedy continuation starts with their attribute on the unedited model;
  after the edits, the share of those still answered so (the unedited model
  scores 100% by construction);
* perplexity of ``HELD_TEXT``, a fixed neutral text written for this harness
  (not taken from any data set): exp of the mean next-token NLL.

    scores = measure_records(loaded, records, windows, fluency_tokens=40)
    facts = load_known_answers(Path("known_1000.json"), n=200)
    right = known_answered(loaded, facts, [known_window(loaded, f) for f in facts])
    ppl = held_perplexity(loaded)
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..batching import BatchScheduler

# the CounterFact harness's definitions, shared rather than written twice
from ..evaluation import CounterFactRecord, FactScores, _join, _means, _share, ngram_entropy, starts_with_object
from ..generation import GenerationChunk, SamplingParams
from ..loading import LoadedModel
from ..scoring import encode_prompt, split_continuation

# A few hundred tokens of plain prose on no fact a CounterFact edit names (written for this harness).
HELD_TEXT = (
    "On most mornings the small market opens a little after sunrise. The first stalls to be ready are "
    "the ones that sell bread, because the bakers start their work long before anyone else is awake. "
    "By the time the light is full, there are crates of apples, onions and potatoes on the tables, and "
    "the smell of coffee drifts from a cart near the gate. People arrive slowly at first. Some of them "
    "know exactly what they want and leave within a few minutes; others walk from one end to the other, "
    "looking at everything before they decide. Children are usually the ones who notice the honey and "
    "the small cakes, and parents are usually the ones who say that they will come back for them later.\n\n"
    "Keeping a garden works in a similar rhythm. Seeds go into the ground when the soil is warm enough, "
    "and for several weeks nothing seems to happen. Then the first leaves appear, and the work changes "
    "from waiting to watering, weeding and watching the weather. A dry week can undo a month of care, "
    "and a late frost can do the same in a single night. Good gardeners learn to keep notes: when they "
    "planted, how much it rained, which rows did well and which did not. Over the years those notes "
    "become more useful than any book, because they describe one particular piece of ground.\n\n"
    "Cooking a simple soup is a good way to use what the garden and the market provide. Onions are "
    "softened slowly in a little oil, then the harder vegetables are added, and finally water or stock "
    "is poured over everything. The pot should simmer rather than boil, so that the flavours have time "
    "to mix. Salt is added near the end, a little at a time, tasting as you go. Served with fresh bread, "
    "a bowl of soup like this is enough for a quiet evening meal, and what is left over often tastes "
    "even better the next day."
)


@dataclass(frozen=True)
class KnownAnswer:
    """A fact the model may know: ``prompt`` should continue with ``attribute``."""

    known_id: int
    prompt: str  # e.g. "Vinson Massif is located in the continent of"
    attribute: str  # e.g. "Antarctica" (as in the data, no leading space)


def load_known_answers(path: Path | str, *, n: int | None = None) -> list[KnownAnswer]:
    """The first ``n`` records (all when None) of a ``known_1000.json`` file (prompt, attribute)."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    return [
        KnownAnswer(int(r.get("known_id", i)), str(r["prompt"]), str(r["attribute"])) for i, r in enumerate(raw[:n])
    ]


def known_window(loaded: LoadedModel, fact: KnownAnswer) -> int:
    """Greedy tokens to read for a known fact: the attribute's token count + 2."""
    return len(split_continuation(loaded.tokenizer, *_join(fact.prompt, fact.attribute))[1]) + 2


# progress(done, total) of the greedy continuations of one call, on the calling thread
Counted = Callable[[int, int], None]


def known_answered(
    loaded: LoadedModel, facts: Sequence[KnownAnswer], windows: Sequence[int], *, progress: Counted | None = None
) -> list[bool]:
    """Per fact: whether its greedy continuation starts with its attribute (as a whole word)."""
    texts = greedy_texts(loaded, list(zip((f.prompt for f in facts), windows, strict=True)), progress=progress)
    return [starts_with_object(t, f.attribute) for t, f in zip(texts, facts, strict=True)]


def record_window(loaded: LoadedModel, rec: CounterFactRecord) -> int:
    """Greedy tokens to read for a CounterFact record: the longer object's token count + 2
    (as ``evaluation.evaluate_record`` reads them)."""
    objects = (rec.target_new, rec.target_true)
    return max(len(split_continuation(loaded.tokenizer, *_join(rec.filled_prompt, o))[1]) for o in objects) + 2


@torch.inference_mode()
def held_perplexity(loaded: LoadedModel, text: str = HELD_TEXT) -> float:
    """exp(mean_t -log P(x_t | x_<t)) over the tokens of ``text`` after the first."""
    ids = torch.tensor([encode_prompt(loaded.tokenizer, text)], device=loaded.device)  # (1, T)
    logits = loaded.model(input_ids=ids).logits.float()  # (1, T, V)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])  # mean over T - 1 predictions
    return math.exp(float(nll))


# -- batched measuring ------------------------------------------------------------


def greedy_texts(
    loaded: LoadedModel, jobs: Sequence[tuple[str, int]], *, batch_size: int = 32, progress: Counted | None = None
) -> list[str]:
    """The greedy continuation of each (prompt, max new tokens), decoded together in batches."""
    if not jobs:
        return []
    texts: list[list[str]] = [[] for _ in jobs]
    errors: list[BaseException] = []
    left = [len(jobs)]
    done = threading.Condition()

    def emit(i: int, chunk: GenerationChunk | BaseException) -> None:  # on the scheduler's thread
        with done:
            if isinstance(chunk, BaseException):
                errors.append(chunk)
            else:
                texts[i].append(chunk.text)
            if isinstance(chunk, BaseException) or chunk.finish_reason is not None:
                left[0] -= 1
                done.notify()

    scheduler = BatchScheduler(loaded, max_batch_size=batch_size)
    try:
        for i, (prompt, n_tokens) in enumerate(jobs):
            ids = encode_prompt(loaded.tokenizer, prompt)
            params = SamplingParams(max_new_tokens=n_tokens)
            scheduler.submit(ids, params, emit=lambda c, i=i: emit(i, c), cancelled=lambda: False)
        with done:
            while not done.wait_for(lambda: left[0] == 0, timeout=1.0):
                if progress is not None:
                    progress(len(jobs) - left[0], len(jobs))
        if progress is not None:
            progress(len(jobs), len(jobs))
    finally:
        scheduler.close()
    if errors:
        raise errors[0]
    return ["".join(t) for t in texts]


@torch.inference_mode()
def mean_logprobs(loaded: LoadedModel, pairs: Sequence[tuple[str, str]], *, batch_size: int = 32) -> list[float]:
    """mean_t log P(c_t | prompt, c_<t) of each (prompt, continuation), as ``score_continuations``
    computes it, over right-padded batches of rows of similar prompt length; the vocabulary
    projection runs only at the positions that predict continuation tokens (``logits_to_keep``)."""
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    split = [split_continuation(tok, p, c) for p, c in pairs]
    order = sorted(range(len(split)), key=lambda j: len(split[j][0]))
    out = [0.0] * len(split)
    for at in range(0, len(order), batch_size):
        chunk = order[at : at + batch_size]
        width = max(len(split[j][0]) + len(split[j][1]) for j in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, j in enumerate(chunk):
            row = split[j][0] + split[j][1]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        # the token at position t is predicted by the logits at t - 1: keep positions lo .. width - 2
        lo = min(len(split[j][0]) for j in chunk) - 1
        keep = torch.arange(lo, width - 1, device=loaded.device)
        inputs = {"input_ids": ids.to(loaded.device), "attention_mask": mask.to(loaded.device)}
        logits = loaded.model(**inputs, logits_to_keep=keep).logits  # (B, width - 1 - lo, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for i, j in enumerate(chunk):
            p, c = split[j]
            at_t = torch.arange(len(p), len(p) + len(c)) - 1 - lo
            total = sum(logprobs[i, at_t, torch.tensor(c, dtype=torch.long)].tolist())
            out[j] = total / max(len(c), 1)
    return out


def measure_records(
    loaded: LoadedModel,
    records: Sequence[CounterFactRecord],
    windows: Sequence[int],
    *,
    fluency_tokens: int,
    progress: Counted | None = None,
) -> list[FactScores]:
    """Each record's ``FactScores`` on the live model, as ``evaluation._measure`` defines them
    (greedy windows per record; fluency from ``fluency_tokens`` greedy tokens, 0: NaN)."""
    greedy: list[tuple[str, int]] = []  # (prompt, tokens) of every greedy continuation, record after record
    compare: list[tuple[str, str, str]] = []  # (prompt, a, b): does the mean log-prob of a beat b's
    for rec, window in zip(records, windows, strict=True):
        new, true = rec.target_new, rec.target_true
        prompt = rec.filled_prompt
        asked = (prompt, *rec.paraphrase_prompts, *rec.neighborhood_prompts)
        greedy += [(_join(p, new)[0], window) for p in asked]
        if fluency_tokens:
            greedy.append(((rec.generation_prompts[:1] or (prompt,))[0], fluency_tokens))
        compare += [(p, new, true) for p in (prompt, *rec.paraphrase_prompts)]
        compare += [(p, rec.neighborhood_true or true, new) for p in rec.neighborhood_prompts]
    texts = iter(greedy_texts(loaded, greedy, progress=progress))
    rows = [pair for p, a, b in compare for pair in (_join(p, a), _join(p, b))]
    scores = iter(mean_logprobs(loaded, rows))
    wins = iter([a > b for a, b in zip(scores, scores, strict=True)])  # consecutive (a, b) rows
    out = []
    for rec in records:
        n_para, n_neigh = len(rec.paraphrase_prompts), len(rec.neighborhood_prompts)
        edit_text = next(texts)
        para_texts = [next(texts) for _ in range(n_para)]
        neighbor_texts = tuple(next(texts) for _ in range(n_neigh))
        gen_prompt = (rec.generation_prompts[:1] or (rec.filled_prompt,))[0]
        fluency = ngram_entropy(gen_prompt + next(texts)) if fluency_tokens else float("nan")
        efficacy = next(wins)
        para_wins = [next(wins) for _ in range(n_para)]
        neigh_wins = [next(wins) for _ in range(n_neigh)]
        out.append(
            FactScores(
                efficacy=efficacy,
                paraphrase=_share(para_wins),
                neighborhood=_share(neigh_wins),
                greedy_new=starts_with_object(edit_text, rec.target_new),
                greedy_paraphrase=_share([starts_with_object(t, rec.target_new) for t in para_texts]),
                neighbor_texts=neighbor_texts,
                fluency=fluency,
                edit_text=edit_text,
                paraphrase_text=para_texts[0] if para_texts else "",
            )
        )
    return out


@dataclass(frozen=True)
class Metrics:
    """One state of the model measured over the records edited so far (each a share in [0, 1]
    except fluency, in bits, and perplexity)."""

    efficacy: float  # records with P(new) > P(true) on the edit prompt (mean token log-prob)
    paraphrase: float  # the same on the paraphrases, averaged per record
    neighborhood: float  # neighbour prompts with P(true) > P(new)
    score: float  # harmonic mean of the three
    greedy_efficacy: float  # the greedy answer to the edit prompt is the new object
    greedy_paraphrase: float  # ... to the paraphrases
    neighbor_unchanged: float  # neighbour prompts whose greedy continuation is the unedited model's
    known_retention: float  # known facts answered right unedited that still are (NaN: none measured)
    fluency: float  # weighted bi/tri-gram entropy of greedy generations (NaN: not measured)
    perplexity: float  # of the held text
    known_excluded: int = 0  # known facts left out of known_retention: their subject was edited


def metrics_of(
    scores: Sequence[FactScores],
    unedited: Sequence[FactScores],
    *,
    known_retention: float,
    perplexity: float,
    known_excluded: int = 0,
) -> Metrics:
    """The means over the records; ``unedited`` are the same records' scores before any edit."""
    m = _means(scores)
    unchanged = [
        _share([a == b for a, b in zip(pre.neighbor_texts, post.neighbor_texts, strict=True)])
        for pre, post in zip(unedited, scores, strict=True)
    ]
    present = [x for x in unchanged if not math.isnan(x)]
    return Metrics(
        efficacy=m.efficacy,
        paraphrase=m.paraphrase,
        neighborhood=m.neighborhood,
        score=m.score,
        greedy_efficacy=m.greedy_efficacy,
        greedy_paraphrase=m.greedy_paraphrase,
        neighbor_unchanged=sum(present) / len(present) if present else float("nan"),
        known_retention=known_retention,
        fluency=m.fluency,
        perplexity=perplexity,
        known_excluded=known_excluded,
    )


def unrelated_known(
    known: Sequence[tuple[KnownAnswer, int]], subjects: Collection[str]
) -> list[tuple[KnownAnswer, int]]:
    """The known facts (with their windows) whose prompt names none of ``subjects``: retention is
    asked of facts the edits did not set out to change ("Trento is located in the country of" stays
    out once Trento's country was edited), as the neighbourhood prompts name other subjects."""
    return [(f, w) for f, w in known if not any(s and s in f.prompt for s in subjects)]
