"""The benchmark script runs and reports (its timings are not checked here:
speed lives in `python -m benchmarks`, never in test asserts)."""

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs the benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_writes_its_report(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    sys.path.insert(0, ROOT)
    from benchmarks import cases

    expected = {
        (shape.name, norm, impl)
        for shape in cases.QUICK_SHAPES
        for norm in shape.norms
        for impl in cases.implementations(norm, shape.padding > 0, compile_composites=False)
    }
    assert {(r["shape"], r["norm"], r["impl"]) for r in data["results"]} == expected
    for r in data["results"]:
        for key in ("fwd", "bwd", "fwd+bwd", "fwd_pct_copy", "bwd_pct_copy"):
            assert math.isfinite(r[key]) and r[key] > 0, (r, key)
        assert r["peak_bytes"] > 0
    report = (tmp_path / "results.md").read_text()
    assert report.count("| masknorm |") == sum(len(s.norms) for s in cases.QUICK_SHAPES)
    assert "## Bars" in report
    assert (tmp_path / "results.png").stat().st_size > 10_000
