"""CLI commands that run the engine in-process: trace-summary over a facts file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from romegw_server.cli import main
from tests.conftest import make_tiny

FACTS = [
    {"subject": "The Eiffel Tower", "attribute": "Paris", "template": "{} is in", "prompt": "The Eiffel Tower is in",
     "relation_id": "P131"},
    {"subject": "Toyota", "attribute": "Japan", "template": "{} is from", "prompt": "Toyota is from",
     "relation_id": "P17"},
]


def test_trace_summary_cli(tokenizer, tmp_path, capsys) -> None:
    model_dir = tmp_path / "model"
    tiny = make_tiny("gpt2", tokenizer)
    tiny.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "facts.json"
    data.write_text(json.dumps(FACTS))
    out, js = tmp_path / "summary.png", tmp_path / "summary.json"
    rc = main(["trace-summary", "--model", str(model_dir), "--device", "cpu", "--data", str(data), "--n", "2",
               "--samples", "2", "--window", "2", "--min-prob", "0", "--out", str(out), "--json", str(js)])
    assert rc == 0
    assert out.stat().st_size > 1000
    summary = json.loads(js.read_text())
    assert summary["n_facts"] == 2 and len(summary["last_subject_effect"]) == 4
    printed = capsys.readouterr().out
    assert "peak at layer" in printed


def tiny_model_and_records(tokenizer, tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Llama saved as a checkpoint, and two CounterFact records (EasyEdit format) in a file."""
    model_dir = tmp_path / "model"
    tiny = make_tiny("llama", tokenizer)
    tiny.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    records = [
        {"case_id": i, "prompt": f"{s} is located in", "subject": s, "target_new": new, "ground_truth": old,
         "rephrase_prompt": f"Where is {s}? It is in", "locality_prompt": "Big Ben is located in",
         "locality_ground_truth": "London"}
        for i, (s, new, old) in enumerate([("The Louvre", "Rome", "Paris"), ("The Colosseum", "Paris", "Rome")])
    ]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    return model_dir, data


def test_eval_cli_on_two_records(tokenizer, tmp_path, capsys) -> None:
    model_dir, data = tiny_model_and_records(tokenizer, tmp_path)
    js = tmp_path / "report.json"
    rc = main(["eval", "--model", str(model_dir), "--device", "cpu", "--data", str(data), "--n", "2",
               "--cache-dir", str(tmp_path / "cache"), "--json", str(js),
               "--hparam", "v_num_grad_steps=3", "--hparam", "mom2_n_tokens=1000"])
    assert rc == 0
    report = json.loads(js.read_text())
    assert report["n"] == 2
    printed = capsys.readouterr().out
    assert "Efficacy" in printed or "efficacy" in printed


def test_eval_sequential_cli(tokenizer, tmp_path, capsys) -> None:
    model_dir, data = tiny_model_and_records(tokenizer, tmp_path)
    known = tmp_path / "known.json"
    known.write_text(json.dumps([{"known_id": 0, "subject": "Big Ben", "attribute": "London",
                                  "prompt": "Big Ben is located in"}]))
    js, png = tmp_path / "seq.json", tmp_path / "seq.png"
    common = ["eval", "--model", str(model_dir), "--device", "cpu", "--data", str(data), "--sequential", "2",
              "--cache-dir", str(tmp_path / "cache"), "--json", str(js), "--plot", str(png)]
    assert main([*common, "--checkpoints", "5"]) == 2  # past the 2 edits: refused before any work
    assert not js.exists()
    rc = main([*common, "--checkpoints", "1", "--method", "rome", "--known", str(known), "--fluency-tokens", "4",
               "--store", str(tmp_path / "stores"), "--layer", "1",
               *(f"--hparam={h}" for h in ("v_num_grad_steps=2", "mom2_n_tokens=256", "mom2_seq_len=32",
                                           "ctx_n_short=1", "ctx_n_long=0"))])
    assert rc == 0
    report = json.loads(js.read_text())
    assert report["complete"] and [c["n_edits"] for c in report["runs"][0]["checkpoints"]] == [1, 2]
    assert report["known_tried"] == 1 and (tmp_path / "stores" / "rome").is_dir()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "After 1 sequential edits" in printed and "After 2 sequential edits" in printed


@pytest.mark.parametrize("flag", ["--prestop-seconds=nan", "--grace-seconds=inf", "--max-update-norm-ratio=-1",
                                  "--max-concurrent-rpcs=-1", "--max-memory-in-flight-mb=-5"])
def test_serve_refuses_a_negative_or_non_finite_number(flag: str) -> None:
    from romegw_server.cli import build_parser, check_serve_numbers

    args = build_parser().parse_args(["serve", flag])
    with pytest.raises(SystemExit, match=flag.split("=")[0] + " must be a finite number >= 0"):
        check_serve_numbers(args)
    check_serve_numbers(build_parser().parse_args(["serve"]))  # the defaults pass


@pytest.mark.parametrize(("var", "value", "what"), [("ROMEGW_MAX_BATCH_SIZE", "abc", "an integer"),
                                                     ("ROMEGW_GRACE_SECONDS", "ten", "a number"),
                                                     ("ROMEGW_METRICS_PORT", "9o90", "an integer")])
def test_serve_names_an_environment_variable_that_is_not_a_number(var, value, what, monkeypatch) -> None:
    from romegw_server.cli import build_parser

    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit, match=rf"\${var} must be {what}, got '{value}'"):
        build_parser()
