"""A real Prometheus scrape over HTTP after real RPCs: the counters moved by the right amounts."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from romegw_client import Client, InvalidArgument

FAST = {"v_num_grad_steps": 2, "mom2_n_tokens": 1000, "ctx_n_short": 1, "ctx_n_long": 1}


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_scrape_after_rpcs(tiny_llama, serve) -> None:
    srv = serve(tiny_llama, edits=True, metrics_port=0)
    before = scrape(srv.metrics_url)
    with Client(srv.target, timeout=600) as c:
        out = [c.generate_text("Hello there", max_new_tokens=5) for _ in range(3)]
        with pytest.raises(InvalidArgument):
            c.generate_text("", max_new_tokens=5)
        c.score("Hello", [" world"])
        c.apply_edit("{} lives in", "Alice Smith", " Paris", hparams=FAST)
        c.revert_edit(to_version=0)
        c.trace_result("Alice Smith lives in", "Alice Smith", samples=2, noise=0.5)
    after = scrape(srv.metrics_url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("romegw_rpc_requests_total", method="Generate", code="OK") == 3
    assert delta("romegw_rpc_requests_total", method="Generate", code="INVALID_ARGUMENT") == 1
    assert delta("romegw_rpc_requests_total", method="Score", code="OK") == 1
    assert delta("romegw_rpc_requests_total", method="ApplyEdit", code="OK") == 1
    assert delta("romegw_rpc_duration_seconds_count", method="Generate") == 4
    generated = sum(o.completion_tokens for o in out)
    prompt = sum(o.prompt_tokens for o in out)
    assert delta("romegw_generation_tokens_total") == generated
    assert delta("romegw_prompt_tokens_total") == prompt
    assert delta("romegw_time_to_first_token_seconds_count") == 3
    assert delta("romegw_inter_token_latency_seconds_count") == generated - 3
    assert delta("romegw_e2e_request_latency_seconds_count") == 3
    assert delta("romegw_edits_applied_total") == 1
    assert delta("romegw_edits_reverted_total") == 1
    assert delta("romegw_edit_compute_seconds_count") == 1
    assert delta("romegw_covariance_stats_total", source="computed") == 1
    assert delta("romegw_trace_seconds_count") == 1
    assert delta("romegw_trace_forward_passes_total") > 0
    assert value(after, "romegw_edit_head_version") == 0
    assert value(after, "romegw_edit_active_layers") == 0
    assert value(after, "romegw_active_streams") == 0
    assert value(after, "romegw_process_resident_memory_bytes") > 50e6
    assert value(after, "romegw_build_info", model_id="tiny-llama", dtype="float32", device="cpu",
                 version="0.1.0") == 1
    assert value(after, "romegw_model_load_seconds") >= 0
    # no label carries a prompt or a token: every label value comes from a small fixed set
    for (_name, labels) in after:
        for key, _ in labels:
            assert key in {"method", "code", "source", "le", "model_id", "dtype", "device", "version"}
