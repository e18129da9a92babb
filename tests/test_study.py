"""The padding study (examples/padding_study.py in the clone) runs in its quick
setting and writes a report and plots whose numbers are all finite; without
matplotlib or tqdm it stops at once, naming the extra that installs them. It
needs matplotlib and tqdm, which the test extra installs; without them it fails
rather than skips."""

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
SCRIPT = EXAMPLES / "padding_study.py"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SCRIPT.is_file(), reason="the study lives in the clone's examples/")]  # slow: trains the study's models

NUMBER = re.compile(r"^-?\d+\.\d+$")


def report_rows(text):
    """The report's table as {(norm, regime): [cells after norm and regime]}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, f"no table in the report:\n{text}"
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:2] == ["norm", "regime"], header
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        assert (cells[0], cells[1]) not in rows, f"duplicate row: {line}"
        rows[cells[0], cells[1]] = cells[2:]
    return header, rows


@pytest.fixture
def study(monkeypatch):
    # imported by name from examples/, so that the study's spawned worker
    # processes (--jobs 2) import the same module
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import padding_study

    return padding_study


def run_script(args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


def test_quick_study_writes_report_and_plots(study, tmp_path):
    result = study.main(["--quick", "--out", str(tmp_path), "--no-progress"])

    report = tmp_path / "report.md"
    assert report.is_file() and report.stat().st_size > 0
    for name in study.FIGURES:
        png = tmp_path / name
        assert png.is_file(), name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png.stat().st_size > 10_000, f"{name} looks empty"
    assert (tmp_path / "results.json").is_file()
    assert sorted(result["figures"]) == sorted(str(tmp_path / n) for n in study.FIGURES)

    text = report.read_text()
    assert "![padding study](padding_study.png)" in text
    header, rows = report_rows(text)
    assert set(rows) == {(n, r) for n in study.NORMS for r in study.REGIMES}
    drift_columns = [i for i, h in enumerate(header[2:]) if "drift" in h]
    assert len(drift_columns) == 2, header
    for (norm, regime), cells in rows.items():
        for i, cell in enumerate(cells):
            if cell == "n/a":
                # only LayerNorm has no running statistics to drift
                assert i in drift_columns and norm not in study.BATCH_NORMS, (norm, regime, header[2 + i])
                continue
            assert NUMBER.match(cell), (norm, regime, header[2 + i], cell)
            assert math.isfinite(float(cell)), (norm, regime, header[2 + i], cell)
        acc = [float(c) for h, c in zip(header[2:], cells) if h.startswith("acc")]
        assert len(acc) == 2 and all(0.0 <= a <= 100.0 for a in acc), (norm, regime, acc)
    # the raw curves behind the plots are finite too
    for run in result["runs"]:
        assert len(run["losses"]) > 0 and all(math.isfinite(v) for v in run["losses"])
        assert run["curve"]["step"] and all(math.isfinite(v) for v in run["curve"]["acc"])
        if run["norm"] in study.BATCH_NORMS:
            assert all(math.isfinite(v) for v in run["curve"]["mean_drift"] + run["curve"]["var_drift"])


def test_study_without_tqdm_runs_with_no_progress_into_an_untracked_folder(tmp_path):
    proc = run_script(["--quick", "--steps", "2", "--no-progress", "--jobs", "1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "masknorm_results" / "study"
    assert (out / "report.md").is_file() and (out / "padding_study.png").is_file()
    assert "python examples/padding_study.py --quick" in (out / "report.md").read_text()


@pytest.mark.parametrize("absent", ["matplotlib", "tqdm"])
def test_study_names_its_extra_when_a_package_is_missing(tmp_path, absent):
    code = (f"import runpy, sys; sys.modules[{absent!r}] = None; sys.argv = ['padding_study.py', '--quick']\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{absent} is not installed" in proc.stderr
    assert 'pip install "masknorm[study]"' in proc.stderr
    assert not (tmp_path / "masknorm_results").exists()  # stopped before training

