"""bench/gpu.sh --cpu-dry-run: the GPU proof's every step with tiny shapes on the CPU, so that
the script the GPU machine runs cannot rot (its numbers mean nothing; no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.embedded  # the embedded model's tokenizer
def test_gpu_script_dry_run(tmp_path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu-dry-run"], capture_output=True, text=True,
                         timeout=900, cwd=ROOT, env=env)  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    tests = (tmp_path / "tests.log").read_text()
    assert " passed" in tests and "failed" not in tests and "skipped" not in tests  # the cuda subset ran, on the CPU
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["dry_run"] and set(results["shapes"]) == {"gpt2-xl", "gpt-j-6b"}
    for shape in results["shapes"].values():
        assert shape["rome"]["seconds"] > 0 and shape["rome"]["cov_from_cache"]  # C given, not computed
        assert shape["trace"]["tokens"] == 10 and shape["trace"]["max_abs_diff"] < 1e-2
    streams = results["shapes"]["gpt2-xl"]["streams"]
    assert [r["streams"] for r in streams["concurrent"]] == [1, 2, 4] and all(
        r["tokens"] == r["streams"] * streams["tokens"] for r in streams["concurrent"]
    )
    assert streams["memory"]["tokens_done"] == streams["memory"]["streams"] * streams["memory"]["tokens"]
    table = (tmp_path / "gpu.md").read_text()
    assert table.startswith("### GPU proof on the CPU") and "| gpt-j-6b: ROME edit" in table
