"""CounterFact evaluation of ROME edits: the paper's scores plus an operator's view.

For each record the edit is computed, applied, measured and removed again,
so every record sees the unedited model. Reads both CounterFact formats:

* the original ROME one (``requested_rewrite`` with a "{}" prompt, ``subject``,
  ``target_new.str``, ``target_true.str``; ``paraphrase_prompts``,
  ``neighborhood_prompts``, ``generation_prompts``), and
* EasyEdit's flat one (``prompt`` containing the subject, ``target_new``,
  ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``,
  ``locality_ground_truth``).

Scores (Meng et al. 2022, section 3.2; objects scored by their MEAN token
log-probability, so multi-token objects compete fairly), each also computed
for the unedited model:

* Efficacy: share of records with P(new) > P(true) on the edit prompt;
* Paraphrase: the same on the rephrased prompts (averaged per record);
* Neighborhood: share of neighbour prompts (other subjects, same true
  object) where P(true) > P(new) still holds;
* Score: their harmonic mean; Fluency: weighted bi/tri-gram entropy of a
  greedy generation from the record's generation prompt (the edit prompt
  when there is none).

Operator view (greedy decoding, which is what a client of the gateway sees):

* greedy efficacy: the greedy continuation of the edit prompt starts with
  the new object (as a whole word); greedy paraphrase: the same on the
  rephrasings; neighbour unchanged: the greedy continuation of a neighbour
  prompt is the same before and after the edit. The greedy window is the
  longer object's token count + 2 tokens.

    records = load_counterfact(Path("counterfact-train.json"))
    report = run_eval(loaded, records, RomeCache(cache_dir), n=100)
    print(report.format_table())
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .editing import fact_probabilities
from .errors import InvalidRequest
from .layers import LayerWeights
from .loading import LoadedModel
from .rome import EditRequest, RomeCache, RomeHParams, compute_edit
from .rome.compute import greedy_text
from .rome.request import needs_space, to_template
from .scoring import score_continuations, split_continuation

log = logging.getLogger(__name__)

# progress(stage, done, total), e.g. ("eval", 3, 100)
EvalProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CounterFactRecord:
    case_id: int
    prompt: str  # template with "{}" for the subject
    subject: str
    target_new: str  # as in the data (no leading space)
    target_true: str
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_true: str = ""  # what the neighbour prompts should still answer ("": target_true)
    generation_prompts: tuple[str, ...] = ()

    @property
    def filled_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)


def _as_tuple(x: object) -> tuple[str, ...]:
    if x is None:
        return ()
    if isinstance(x, str):
        return (x,)
    out = []
    for item in x:  # type: ignore[union-attr]
        out.append(item["prompt"] if isinstance(item, Mapping) else str(item))
    return tuple(out)


def _first_str(x: object) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, Mapping):
        return str(x.get("str", ""))
    if isinstance(x, Sequence) and x:
        return _first_str(x[0])
    return ""


def parse_record(obj: Mapping[str, object]) -> CounterFactRecord:
    """One record of either format; ValueError when it fits neither."""
    if "requested_rewrite" in obj:  # the original ROME format
        rw = obj["requested_rewrite"]
        assert isinstance(rw, Mapping)
        return CounterFactRecord(
            case_id=int(obj.get("case_id", -1)),  # type: ignore[arg-type]
            prompt=str(rw["prompt"]),
            subject=str(rw["subject"]),
            target_new=_first_str(rw["target_new"]),
            target_true=_first_str(rw["target_true"]),
            paraphrase_prompts=_as_tuple(obj.get("paraphrase_prompts")),
            neighborhood_prompts=_as_tuple(obj.get("neighborhood_prompts")),
            generation_prompts=_as_tuple(obj.get("generation_prompts")),
        )
    if {"prompt", "subject", "target_new"} <= set(obj):  # EasyEdit's flat format
        subject = str(obj["subject"])
        return CounterFactRecord(
            case_id=int(obj.get("case_id", -1)),  # type: ignore[arg-type]
            prompt=to_template(str(obj["prompt"]), subject),
            subject=subject,
            target_new=_first_str(obj["target_new"]),
            target_true=_first_str(obj.get("ground_truth", "")),
            paraphrase_prompts=_as_tuple(obj.get("rephrase_prompt")),
            neighborhood_prompts=_as_tuple(obj.get("locality_prompt")),
            neighborhood_true=_first_str(obj.get("locality_ground_truth", "")),
        )
    raise ValueError(f"not a CounterFact record (keys: {', '.join(sorted(map(str, obj)))})")


def load_counterfact(path: Path | str, *, start: int = 0, n: int | None = None) -> list[CounterFactRecord]:
    """Records ``start`` .. ``start + n`` of a JSON list or a JSONL file (records whose
    subject is missing from the prompt are skipped with a warning)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    raw = json.loads(text) if stripped.startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    stop = None if n is None else start + n
    records = []
    for obj in raw[start:stop]:
        try:
            records.append(parse_record(obj))
        except InvalidRequest as e:
            log.warning("skipping CounterFact case %s: %s", obj.get("case_id"), e)
    return records


# -- measuring ------------------------------------------------------------------


def _join(prompt: str, obj: str) -> tuple[str, str]:
    """``prompt`` and ``obj`` such that prompt + obj reads as text (the space goes on the object)."""
    obj = obj.strip()
    prompt = prompt.rstrip(" \t")
    return prompt, (" " + obj if needs_space(prompt, obj) else obj)


def prefers(loaded: LoadedModel, prompt: str, a: str, b: str) -> bool:
    """Whether the mean token log-prob of ``a`` after ``prompt`` beats that of ``b``."""
    p, a2 = _join(prompt, a)
    _, b2 = _join(prompt, b)
    sa, sb = score_continuations(loaded, p, [a2, b2])
    return sa.mean_logprob > sb.mean_logprob


def starts_with_object(text: str, obj: str) -> bool:
    """Whether ``text`` begins with ``obj`` as a whole word (leading spaces ignored)."""
    t, o = text.lstrip(), obj.strip()
    return t.startswith(o) and (len(t) == len(o) or not t[len(o)].isalnum())


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """Weighted n-gram entropy (bits) of a text, as in ROME's fluency metric:
    mean_n(w_n * H_n), H_n = -sum_g f(g) log2 f(g) over the word n-grams g."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    parts = []
    for n, w in zip(ns, weights, strict=True):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


@dataclass(frozen=True)
class FactScores:
    """One record's scores on one state of the model (unedited, or edited)."""

    efficacy: bool  # P(new) > P(true) on the edit prompt
    paraphrase: float  # share of paraphrases with P(new) > P(true)
    neighborhood: float  # share of neighbour prompts with P(true) > P(new)
    greedy_new: bool  # the greedy continuation of the edit prompt starts with the new object
    greedy_paraphrase: float  # share of paraphrases whose greedy continuation does
    neighbor_texts: tuple[str, ...]  # greedy continuations of the neighbour prompts
    fluency: float  # n-gram entropy of a greedy generation (NaN: not measured)
    edit_text: str  # greedy continuation of the edit prompt
    paraphrase_text: str  # greedy continuation of the first paraphrase


def _share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def _measure(loaded: LoadedModel, rec: CounterFactRecord, window: int, fluency_tokens: int) -> FactScores:
    new, true = rec.target_new, rec.target_true
    neigh_true = rec.neighborhood_true or true
    prompt = rec.filled_prompt
    edit_text = greedy_text(loaded, _join(prompt, new)[0], window)
    para_texts = [greedy_text(loaded, _join(p, new)[0], window) for p in rec.paraphrase_prompts]
    neighbor_texts = tuple(greedy_text(loaded, _join(p, new)[0], window) for p in rec.neighborhood_prompts)
    gen_prompts = rec.generation_prompts[:1] or (prompt,)
    fluency = [ngram_entropy(p + greedy_text(loaded, p, fluency_tokens)) for p in gen_prompts] if fluency_tokens else []
    return FactScores(
        efficacy=prefers(loaded, prompt, new, true),
        paraphrase=_share([prefers(loaded, p, new, true) for p in rec.paraphrase_prompts]),
        neighborhood=_share([prefers(loaded, p, neigh_true, new) for p in rec.neighborhood_prompts]),
        greedy_new=starts_with_object(edit_text, new),
        greedy_paraphrase=_share([starts_with_object(t, new) for t in para_texts]),
        neighbor_texts=neighbor_texts,
        fluency=sum(fluency) / len(fluency) if fluency else float("nan"),
        edit_text=edit_text,
        paraphrase_text=para_texts[0] if para_texts else "",
    )


@dataclass(frozen=True)
class RecordScores:
    """One record's scores before (``pre``) and after (``post``) its edit, and the edit's figures."""

    case_id: int
    subject: str
    target_new: str
    target_true: str
    pre: FactScores
    post: FactScores
    neighbor_unchanged: float  # share of neighbour prompts whose greedy continuation did not change
    edit_seconds: float
    cov_from_cache: bool
    layer: int
    target_after: float  # P(new | edit prompt) after the edit, whole object
    v_steps: int
    update_norm: float

    def to_dict(self) -> dict[str, object]:
        """The record of the JSON report: flat, each score "x" after the edit and "x_pre" before."""
        pre, post = self.pre, self.post
        return {
            "case_id": self.case_id,
            "subject": self.subject,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "efficacy_pre": pre.efficacy,
            "efficacy": post.efficacy,
            "paraphrase_pre": pre.paraphrase,
            "paraphrase": post.paraphrase,
            "neighborhood_pre": pre.neighborhood,
            "neighborhood": post.neighborhood,
            "greedy_new_pre": pre.greedy_new,
            "greedy_new": post.greedy_new,
            "greedy_paraphrase_pre": pre.greedy_paraphrase,
            "greedy_paraphrase": post.greedy_paraphrase,
            "neighbor_unchanged": self.neighbor_unchanged,
            "fluency_pre": pre.fluency,
            "fluency": post.fluency,
            "edit_seconds": self.edit_seconds,
            "cov_from_cache": self.cov_from_cache,
            "layer": self.layer,
            "target_after": self.target_after,
            "v_steps": self.v_steps,
            "update_norm": self.update_norm,
            "edit_text_pre": pre.edit_text,
            "edit_text": post.edit_text,
            "paraphrase_text": post.paraphrase_text,  # after the edit only
            "neighbor_texts_pre": pre.neighbor_texts,
            "neighbor_texts": post.neighbor_texts,
        }


@dataclass(frozen=True)
class MeanScores:
    """The means over the records of one state of the model (unedited, or edited)."""

    efficacy: float
    paraphrase: float
    neighborhood: float
    score: float  # harmonic mean of the three
    greedy_efficacy: float
    greedy_paraphrase: float
    fluency: float


@dataclass(frozen=True)
class EvalReport:
    model_id: str
    n: int
    unedited: MeanScores
    edited: MeanScores
    neighbor_greedy_unchanged: float
    mean_edit_seconds: float
    cov_cache_hits: int
    seconds: float
    hparams: RomeHParams | None
    records: tuple[RecordScores, ...] = field(repr=False, default=())

    def to_json(self, *, with_records: bool = True) -> str:
        data = dataclasses.asdict(dataclasses.replace(self, records=()))
        if with_records:
            data["records"] = [r.to_dict() for r in self.records]
        else:
            data.pop("records")
        return json.dumps(data, indent=1, default=_json_default)

    def format_table(self) -> str:
        u, e = self.unedited, self.edited
        layer = f", layer {self.hparams.layer}" if self.hparams is not None else ""
        rows = [
            ("Efficacy (P new > P true)", u.efficacy, e.efficacy),
            ("Paraphrase (P new > P true)", u.paraphrase, e.paraphrase),
            ("Neighborhood (P true > P new)", u.neighborhood, e.neighborhood),
            ("Score (harmonic mean)", u.score, e.score),
            ("Greedy answer = new object", u.greedy_efficacy, e.greedy_efficacy),
            ("Greedy paraphrase = new object", u.greedy_paraphrase, e.greedy_paraphrase),
            ("Neighbour greedy unchanged", None, self.neighbor_greedy_unchanged),
        ]
        lines = [
            f"CounterFact eval of {self.model_id}: {self.n} records{layer}",
            f"{'metric':<34}{'unedited':>10}{'edited':>10}",
        ]
        for name, a, b in rows:
            lines.append(f"{name:<34}{_pct(a):>10}{_pct(b):>10}")
        lines.append(f"{'Fluency (n-gram entropy, bits)':<34}{u.fluency:>10.3f}{e.fluency:>10.3f}")
        lines.append(
            f"Mean edit time {self.mean_edit_seconds:.1f} s (C cached in {self.cov_cache_hits}/{self.n}); "
            f"total {self.seconds:.0f} s"
        )
        return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _json_default(x: object) -> object:
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _harmonic(xs: Sequence[float]) -> float:
    if any(math.isnan(x) for x in xs):
        return float("nan")
    return 0.0 if min(xs) <= 0 else len(xs) / sum(1 / x for x in xs)


def _means(scores: Sequence[FactScores]) -> MeanScores:
    eff = _mean([float(s.efficacy) for s in scores])
    para = _mean([s.paraphrase for s in scores])
    neigh = _mean([s.neighborhood for s in scores])
    return MeanScores(
        efficacy=eff,
        paraphrase=para,
        neighborhood=neigh,
        score=_harmonic([eff, para, neigh]),
        greedy_efficacy=_mean([float(s.greedy_new) for s in scores]),
        greedy_paraphrase=_mean([s.greedy_paraphrase for s in scores]),
        fluency=_mean([s.fluency for s in scores]),
    )


def evaluate_record(
    loaded: LoadedModel,
    rec: CounterFactRecord,
    cache: RomeCache,
    *,
    hparams: Mapping[str, float] | None = None,
    layer: int | None = None,
    fluency_tokens: int = 40,
) -> tuple[RecordScores, RomeHParams]:
    """Measure, edit, measure again, remove the edit (the model ends as it started)."""
    request = EditRequest(rec.prompt, rec.subject, rec.target_new, layer=layer, hparams=dict(hparams or {}))
    tok = loaded.tokenizer
    n_tok = max(
        len(split_continuation(tok, *_join(rec.filled_prompt, o))[1]) for o in (rec.target_new, rec.target_true)
    )
    window = n_tok + 2
    pre = _measure(loaded, rec, window, fluency_tokens)
    result = compute_edit(loaded, request, cache)
    target_after = fact_probabilities(loaded, request, result.factors).target_after
    weights = LayerWeights(loaded)  # applied as a served version is, and taken off bit for bit
    weights.materialize_factors(result.factors)
    try:
        post = _measure(loaded, rec, window, fluency_tokens)
    finally:
        weights.materialize_factors([])
    unchanged = [a == b for a, b in zip(pre.neighbor_texts, post.neighbor_texts, strict=True)]
    scores = RecordScores(
        case_id=rec.case_id,
        subject=rec.subject,
        target_new=rec.target_new,
        target_true=rec.target_true,
        pre=pre,
        post=post,
        neighbor_unchanged=_share(unchanged),
        edit_seconds=result.compute_seconds,
        cov_from_cache=result.cov_from_cache,
        layer=result.layer,
        target_after=target_after,
        v_steps=result.v_steps,
        update_norm=result.update_norm,
    )
    return scores, result.hparams


def run_eval(
    loaded: LoadedModel,
    records: Sequence[CounterFactRecord],
    cache: RomeCache,
    *,
    n: int | None = None,
    hparams: Mapping[str, float] | None = None,
    layer: int | None = None,
    fluency_tokens: int = 40,
    progress: EvalProgress | None = None,
) -> EvalReport:
    """Edit, measure and un-edit the first ``n`` records (all when None), one at a time."""
    t0 = time.perf_counter()
    chosen = list(records[:n] if n is not None else records)
    if not chosen:
        raise InvalidRequest("no CounterFact records to evaluate")
    scores: list[RecordScores] = []
    used: RomeHParams | None = None
    for i, rec in enumerate(chosen):
        s, used = evaluate_record(loaded, rec, cache, hparams=hparams, layer=layer, fluency_tokens=fluency_tokens)
        scores.append(s)
        log.info(
            "eval %d/%d case %d %r -> %r: eff %s para %.2f neigh %.2f greedy %s (%r) %.1f s",
            i + 1, len(chosen), rec.case_id, rec.subject, rec.target_new, s.post.efficacy, s.post.paraphrase,
            s.post.neighborhood, s.post.greedy_new, s.post.edit_text, s.edit_seconds,
        )  # fmt: skip
        if progress is not None:
            progress("eval", i + 1, len(chosen))
    return EvalReport(
        model_id=loaded.model_id,
        n=len(scores),
        unedited=_means([s.pre for s in scores]),
        edited=_means([s.post for s in scores]),
        neighbor_greedy_unchanged=_mean([s.neighbor_unchanged for s in scores]),
        mean_edit_seconds=_mean([s.edit_seconds for s in scores]),
        cov_cache_hits=sum(s.cov_from_cache for s in scores),
        seconds=time.perf_counter() - t0,
        hparams=used,
        records=tuple(scores),
    )
