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
        for impl in cases.implementations(
            norm, shape.padding > 0, compile_composites=False, stock_only=shape.inference or shape.small)
    }
    assert {(r["shape"], r["norm"], r["impl"]) for r in data["results"]} == expected
    assert any(r["inference"] for r in data["results"]) and not all(r["inference"] for r in data["results"])
    for r in data["results"]:
        keys = ("fwd", "fwd_pct_copy") if r["inference"] else ("fwd", "bwd", "fwd+bwd", "fwd_pct_copy", "bwd_pct_copy")
        for key in keys:
            assert math.isfinite(r[key]) and r[key] > 0, (r, key)
        assert r["inference"] or r["peak_bytes"] > 0
    report = (tmp_path / "results.md").read_text()
    training = [s for s in cases.QUICK_SHAPES if not s.inference]
    inference = [s for s in cases.QUICK_SHAPES if s.inference]
    assert report.count("| masknorm |") == sum(len(s.norms) for s in training)
    assert "## Inference" in report
    assert sum(report.count(f"| {s.name} |") for s in inference) == sum(len(s.norms) for s in inference)
    assert "## Bars" in report
    assert "inference vs stock" in report
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_per_call_breakdown_prints_every_layer():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.per_call", "--shape", "2", "8", "16", "--min-run-time", "0.01"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| masknorm") or line.startswith("| stock")]
    assert len(rows) == 9, proc.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert all(float(c) > 0 for c in cells if c), row


def test_batch_norm_bars_count_its_minimum_traffic():
    sys.path.insert(0, ROOT)
    from benchmarks import run

    shape = "N8 L1024 C1024 fp32 30% pad"
    row = {"shape": shape, "norm": "bn-NCL", "impl": "masknorm", "large": True, "fwd+bwd": 1.0, "fwd": 0.4,
           "fwd_pct_copy": 60.0, "bwd_pct_copy": 55.0, "fwd_pct_copy_bn_min": 90.0, "bwd_pct_copy_bn_min": 75.0,
           "peak_bytes": 1}
    bars = {bar: met for bar, _, _, _, met in run.check_bars([row])}
    assert bars["fwd % of copy bandwidth"] is False
    assert bars["BN fwd % of copy, BN minimum traffic"] is True
    assert bars["BN bwd % of copy, BN minimum traffic"] is False
    ln = dict(row, norm="ln")
    assert not any("BN minimum" in bar for bar, *_ in run.check_bars([ln]))
