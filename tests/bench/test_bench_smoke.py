"""The benchmark suite's smoke mode: every section runs (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.embedded
def test_bench_smoke(tmp_path) -> None:
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"machine", "load", "generate_single", "trace", "rome", "edits", "versions", "memory"} <= set(results)
    versions = results["versions"]
    assert versions["mixed"]["mixed_tps"] > 0 and versions["edit"]["stored_to_live_s"] > 0
    assert versions["version_cache_bytes"] <= versions["version_cache_bytes_max"]
    assert results["generate_single"]["gateway_tps"] > 0
    assert results["trace"]["mlp"]["max_abs_diff"] < 1e-4
    variants = results["rome"]["edit"]["variants"]
    assert len(variants) == 4 and len({v["v_steps"] for v in variants.values()}) == 1
    assert max(v["rel_diff_left"] for v in variants.values()) < 0.05  # the reuses change nothing but rounding
    assert results["memory"]["peak_rss_bytes"] > results["memory"]["weight_bytes"] > 0
    assert "| measure" in run.stdout
