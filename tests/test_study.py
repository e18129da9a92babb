"""The padding study (python -m masknorm.study) runs in its quick setting and
writes a report and plots whose numbers are all finite. It needs matplotlib and
tqdm, which the test extra installs; without them it fails rather than skips."""

import math
import re

import pytest

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


def test_quick_study_writes_report_and_plots(tmp_path):
    # imported here: an installed masknorm without the study fails this test, not the whole collection
    from masknorm import study  # matplotlib and tqdm: the test extra (pip install ".[test]")

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


def test_demo_study_flag_hands_over_to_the_study(capsys):
    from masknorm import demo

    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--study", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "python -m masknorm.demo --study" in out and "--quick" in out
