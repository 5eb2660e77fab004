"""The sequential evaluation on a tiny model: edits through the ApplyEdit path, never reverted,
checkpoints over all edits so far, the JSON after each checkpoint, methods side by side."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import rome_engine.sequential.run as seq_run
from rome_engine.edit_store import EditStore
from rome_engine.editing import ComputeFn, method_compute
from rome_engine.errors import FailedPrecondition, InvalidRequest
from rome_engine.evaluation import CounterFactRecord, _measure, parse_record
from rome_engine.loading import LoadedModel
from rome_engine.rome.compute import first_answer, greedy_text
from rome_engine.sequential import (
    KnownAnswer,
    Metrics,
    SequentialConfig,
    SequentialReport,
    parse_checkpoints,
    run_sequential,
)
from rome_engine.sequential.measure import measure_records, record_window
from tests.rome_engine.test_evaluation import TINY_HP

FACTS = [("The Louvre", "Rome", "Paris"), ("The Colosseum", "Paris", "Rome"), ("Big Ben", "Berlin", "London"),
         ("The Brandenburg Gate", "London", "Berlin")]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def records() -> list[CounterFactRecord]:
    return [
        parse_record({
            "case_id": i, "prompt": f"{s} is located in", "subject": s, "target_new": new, "ground_truth": old,
            "rephrase_prompt": f"Where is {s}? It is in", "locality_prompt": "The Prado is located in",
            "locality_ground_truth": "Madrid",
        })  # fmt: skip
        for i, (s, new, old) in enumerate(FACTS)
    ]


def known_answers(loaded: LoadedModel) -> list[KnownAnswer]:
    """Facts the unedited tiny model "knows": whatever word its greedy continuation starts with."""
    prompts = ["The capital of Spain is", "Apples are usually", "The sky at night is", "My favourite tool is"]
    out = []
    for i, p in enumerate(prompts):
        word = first_answer(greedy_text(loaded, p, 4)).split()
        if word and word[0].isalnum():
            out.append(KnownAnswer(i, p, word[0]))
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ROME cache for the module: C and the prefixes are computed once."""
    return tmp_path_factory.mktemp("rome-cache")


def snapshot(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in loaded.model.named_parameters()}


def assert_unchanged(loaded: LoadedModel, snap: dict[str, torch.Tensor]) -> None:
    for n, p in loaded.model.named_parameters():
        assert torch.equal(p, snap[n]), n


def test_three_edits_in_a_row(tiny_llama: LoadedModel, cache_dir: Path, tmp_path: Path) -> None:
    snap = snapshot(tiny_llama)
    known = known_answers(tiny_llama)
    assert known, "the tiny model should continue some prompt with a word"
    out = tmp_path / "seq.json"
    seen: list[dict] = []

    def on_checkpoint(report: SequentialReport, cp: object) -> None:
        seen.append(json.loads(out.read_text()))  # what an interruption right now would leave

    config = SequentialConfig(checkpoints=(1, 3), hparams=TINY_HP, fluency_tokens=5)
    report = run_sequential(
        tiny_llama, records(), config, known=known, cache_dir=cache_dir, store_dir=tmp_path / "stores", out=out,
        on_checkpoint=on_checkpoint,
    )  # fmt: skip

    # the JSON was rewritten at each checkpoint, saying how far the run got
    progress = [(s["complete"], s["done"]["edits"], s["done"]["checkpoint"]) for s in seen]
    assert progress == [(False, 1, 1), (False, 3, 3)]
    assert [len(s["runs"][0]["checkpoints"]) for s in seen] == [1, 2]
    final = json.loads(out.read_text())
    assert final["complete"] and final["done"] == {"method": "rome", "edits": 3, "checkpoint": 3, "methods_done": 1}

    # every metric, edited and unedited, at every checkpoint
    names = {f.name for f in dataclasses.fields(Metrics)}
    run = final["runs"][0]
    assert [c["n_edits"] for c in run["checkpoints"]] == [1, 3]
    for cp in run["checkpoints"]:
        for state in ("edited", "unedited"):
            assert set(cp[state]) == names
            for name, value in cp[state].items():
                assert value is not None, (state, name)
                if name == "known_excluded":
                    assert isinstance(value, int) and 0 <= value <= len(known)
                elif name not in ("fluency", "perplexity"):
                    assert 0.0 <= value <= 1.0, (state, name, value)
        assert cp["unedited"]["neighbor_unchanged"] == 1.0 and cp["unedited"]["known_retention"] == 1.0
        assert cp["edited"]["perplexity"] > 0 and cp["times"]["median"] > 0 and cp["n_failed"] == 0
    assert final["known_correct"] == len(known) and final["case_ids"] == [0, 1, 2]

    # one stored version per edit, each on top of the last; nothing reverted
    assert [e.version for e in report.runs[0].edits] == [1, 2, 3]
    store = EditStore(Path(report.runs[0].store), tiny_llama.model_id)
    assert store.manifest.versions() == [0, 1, 2, 3]
    ids = list(store.manifest.apply_entries())
    assert [store.manifest.active_at(v) for v in (1, 2, 3)] == [ids[:1], ids[:2], ids]

    table = report.format_tables()
    assert "After 1 sequential edits" in table and "After 3 sequential edits" in table and "Known facts" in table
    curves = report.curves()
    assert set(curves) == {"unedited", "rome"} and [n for n, _ in curves["rome"]["efficacy"]] == [1, 3]
    assert_unchanged(tiny_llama, snap)  # the base weights again after the run


def test_methods_side_by_side_start_from_the_base(
    tiny_llama: LoadedModel, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unedited model is measured once; each method starts from the base weights, in its own store."""
    snap = snapshot(tiny_llama)
    param = tiny_llama.spec.mlp_out_weight_name(TINY_HP["layer"])
    seen: dict[str, list[torch.Tensor]] = {"a": [], "b": []}

    def recording(name: str):
        def factory(cache: Path | None, corpus: Path | None) -> ComputeFn:
            inner = method_compute(cache, corpus)

            def compute(loaded, requests, method, prior_keys, progress=None):  # the ComputeFn signature
                seen[name].append(loaded.model.get_parameter(param).detach().clone())  # what this edit starts from
                return inner(loaded, requests, "rome", prior_keys)

            return compute

        return factory

    baselines: list[int] = []
    measure_baseline = seq_run.measure_baseline
    monkeypatch.setattr(seq_run, "measure_baseline", lambda *a, **k: baselines.append(1) or measure_baseline(*a, **k))
    config = SequentialConfig(checkpoints=(2,), methods=("a", "b"), hparams=TINY_HP, fluency_tokens=0)
    report = run_sequential(
        tiny_llama, records(), config, cache_dir=cache_dir, store_dir=tmp_path,
        methods={"a": recording("a"), "b": recording("b")},
    )  # fmt: skip

    assert baselines == [1]
    base = snap[param]
    assert torch.equal(seen["a"][0], base) and not torch.equal(seen["a"][1], base)  # a's 2nd edit sees its 1st
    assert torch.equal(seen["b"][0], base) and not torch.equal(seen["b"][1], base)  # b starts from the base again
    for run in report.runs:
        store = EditStore(Path(run.store), tiny_llama.model_id)
        assert store.manifest.versions() == [0, 1, 2]  # its own store: its two edits only
    a, b = (r.checkpoints[0] for r in report.runs)
    assert repr(a.unedited) == repr(b.unedited)  # the same records, the same unedited measurement (NaN included)
    assert math.isnan(a.edited.fluency) and math.isnan(a.edited.known_retention)  # not asked for
    assert_unchanged(tiny_llama, snap)


def test_a_refused_edit_is_recorded_and_the_run_goes_on(
    tiny_llama: LoadedModel, cache_dir: Path, tmp_path: Path
) -> None:
    calls = []

    def refusing(cache: Path | None, corpus: Path | None) -> ComputeFn:
        inner = method_compute(cache, corpus)

        def compute(loaded, requests, method, prior_keys, progress=None):  # the ComputeFn signature
            calls.append(1)
            if len(calls) == 2:
                raise FailedPrecondition("the computed update holds NaN values")
            return inner(loaded, requests, "rome", prior_keys)

        return compute

    config = SequentialConfig(checkpoints=(3,), methods=("r",), hparams=TINY_HP, fluency_tokens=0)
    report = run_sequential(tiny_llama, records(), config, cache_dir=cache_dir, methods={"r": refusing})
    edits = report.runs[0].edits
    assert [e.version for e in edits] == [1, 0, 2] and "NaN" in edits[1].error and not edits[0].error
    assert report.runs[0].checkpoints[0].n_failed == 1


def test_batched_measure_matches_the_one_record_measure(tiny_llama: LoadedModel) -> None:
    recs = records()[:3]
    windows = [record_window(tiny_llama, r) for r in recs]
    batched = measure_records(tiny_llama, recs, windows, fluency_tokens=6)
    one_by_one = [_measure(tiny_llama, r, w, 6) for r, w in zip(recs, windows, strict=True)]
    for b, o in zip(batched, one_by_one, strict=True):
        assert dataclasses.replace(b, fluency=0.0) == dataclasses.replace(o, fluency=0.0)
        assert b.fluency == pytest.approx(o.fluency)


def test_checkpoints_and_config_are_checked(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    assert parse_checkpoints("10,100,300", 1000) == (10, 100, 300, 1000)
    assert parse_checkpoints("300,10", 300) == (10, 300)
    assert parse_checkpoints(None, 150) == (10, 100, 150)
    with pytest.raises(InvalidRequest, match="past the 20 edits"):
        parse_checkpoints("5,50", 20)
    with pytest.raises(InvalidRequest, match="edit counts"):
        parse_checkpoints("5,ten", 20)
    with pytest.raises(InvalidRequest, match="ascending"):
        SequentialConfig(checkpoints=(3, 2))
    with pytest.raises(InvalidRequest, match="unknown method"):
        run_sequential(tiny_llama, records(), SequentialConfig(checkpoints=(1,), methods=("nope",)))
    with pytest.raises(InvalidRequest, match="only 4 records"):
        run_sequential(tiny_llama, records(), SequentialConfig(checkpoints=(5,)))
    (tmp_path / "rome").mkdir()
    (tmp_path / "rome" / "manifest.json").write_text("{}")
    with pytest.raises(FailedPrecondition, match="not empty"):
        run_sequential(tiny_llama, records(), SequentialConfig(checkpoints=(1,)), store_dir=tmp_path)


def test_known_retention_leaves_out_the_facts_whose_subject_was_edited() -> None:
    from rome_engine.sequential.measure import unrelated_known

    trento = KnownAnswer(1, "Trento is located in the country of", "Italy")
    rhine = KnownAnswer(2, "Rhine belongs to the continent of", "Europe")
    known = [(trento, 3), (rhine, 3)]
    assert unrelated_known(known, {"Trento"}) == [(rhine, 3)]  # the edit of Trento set out to change it
    assert unrelated_known(known, {"Lake Victoria", ""}) == known  # an empty subject names nothing
