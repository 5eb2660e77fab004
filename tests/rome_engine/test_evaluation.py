"""The CounterFact harness: both record formats, the metrics, a run on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from rome_engine.evaluation import (
    CounterFactRecord,
    EvalReport,
    load_counterfact,
    ngram_entropy,
    parse_record,
    run_eval,
    starts_with_object,
)
from rome_engine.loading import LoadedModel
from rome_engine.rome import RomeCache
from tests.conftest import SHARED_DATA

EASYEDIT = {
    "case_id": 2,
    "prompt": "Toko Yasuda, the",
    "target_new": "piano",
    "subject": "Toko Yasuda",
    "ground_truth": "guitar",
    "rephrase_prompt": "Toko Yasuda is incredible at",
    "locality_prompt": "John Lennon performs on the",
    "locality_ground_truth": "guitar",
}
ROME = {
    "case_id": 0,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Shayna does this and Yossel goes still. Danielle Darrieux is a native speaker of"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
TINY_HP = {
    "layer": 1,
    "mom2_n_tokens": 256,
    "mom2_seq_len": 32,
    "mom2_batch_size": 8,
    "v_num_grad_steps": 2,
    "ctx_n_short": 1,
    "ctx_n_long": 0,
}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_both_formats() -> None:
    a = parse_record(EASYEDIT)
    assert a == CounterFactRecord(
        case_id=2,
        prompt="{}, the",
        subject="Toko Yasuda",
        target_new="piano",
        target_true="guitar",
        paraphrase_prompts=("Toko Yasuda is incredible at",),
        neighborhood_prompts=("John Lennon performs on the",),
        neighborhood_true="guitar",
    )
    b = parse_record(ROME)
    assert (b.prompt, b.subject, b.target_new, b.target_true) == (
        "The mother tongue of {} is", "Danielle Darrieux", "English", "French",
    )  # fmt: skip
    assert len(b.neighborhood_prompts) == 2 and b.generation_prompts == ("Danielle Darrieux's mother tongue is",)
    with pytest.raises(ValueError, match="not a CounterFact record"):
        parse_record({"text": "hello"})


def test_load_json_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([EASYEDIT, ROME, EASYEDIT]))
    (tmp_path / "b.jsonl").write_text(json.dumps(ROME) + "\n" + json.dumps(EASYEDIT) + "\n")
    assert [r.case_id for r in load_counterfact(tmp_path / "a.json", start=1, n=1)] == [0]
    assert [r.case_id for r in load_counterfact(tmp_path / "b.jsonl")] == [0, 2]


@pytest.mark.skipif(not (SHARED_DATA / "counterfact").exists(), reason="no shared CounterFact data")
def test_load_the_shared_file() -> None:
    records = load_counterfact(SHARED_DATA / "counterfact" / "counterfact-train.json", n=5)
    assert len(records) == 5 and all("{}" in r.prompt for r in records)


def test_ngram_entropy_and_object_match() -> None:
    # 4 distinct words: 3 distinct bigrams (log2 3 bits), 2 trigrams (1 bit); weights 2/3, 4/3, averaged
    assert ngram_entropy("a b c d") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("rome rome rome rome rome") == 0.0
    assert starts_with_object(" Rome, Italy", "Rome") and starts_with_object("Rome", " Rome")
    assert not starts_with_object(" Romeo and Juliet", "Rome") and not starts_with_object(" in Rome", "Rome")


def test_run_eval_on_a_tiny_model(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    snap = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters()}
    records = [parse_record(EASYEDIT), parse_record(ROME)]
    seen: list[int] = []
    report = run_eval(
        tiny_llama, records, RomeCache(tmp_path), n=2, hparams=TINY_HP, fluency_tokens=6,
        progress=lambda _stage, done, _total: seen.append(done),
    )  # fmt: skip
    assert isinstance(report, EvalReport) and report.n == 2 and seen == [1, 2]
    for metrics in (report.unedited, report.edited):
        for name, value in dataclasses.asdict(metrics).items():
            assert 0.0 <= value <= 1.0 or name == "fluency", (name, value)
    assert report.edited.fluency >= 0.0 and 0.0 <= report.neighbor_greedy_unchanged <= 1.0
    assert report.mean_edit_seconds > 0 and report.cov_cache_hits == 1  # C computed once, then reused
    assert report.hparams is not None and report.hparams.layer == 1
    data = json.loads(report.to_json())
    assert len(data["records"]) == 2 and data["edited"]["efficacy"] == report.edited.efficacy
    table = report.format_table()
    for row in ("Efficacy", "Paraphrase", "Neighborhood", "Greedy answer", "Neighbour greedy", "Fluency"):
        assert row in table
    for n, p in tiny_llama.model.named_parameters():
        assert torch.equal(p, snap[n]), n
