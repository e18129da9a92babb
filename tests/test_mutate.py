"""tools/mutate.py checks its own list of mutants before it runs them: a
snippet that no longer occurs exactly once is reported, never silently
skipped (neighbours: the tests that kill the mutants, test_batch_norm.py,
test_batch_norm_stages.py, test_row_norm.py, test_gradcheck.py,
test_fake_kernels.py, test_errors.py, test_reliability.py; the last table in
docs/reliability.md). Whether the snippets match the current sources is
`python tools/mutate.py --check`, not this suite: a reformatting of the
sources must not fail the tests."""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "mutate.py"
pytestmark = pytest.mark.skipif(not SCRIPT.is_file(), reason="needs the clone's tools/")


@pytest.fixture(scope="module")
def mutate():
    spec = importlib.util.spec_from_file_location("mutate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutate"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["mutate"]


def test_mutants_are_named_once_and_change_sources(mutate):
    names = [m.name for m in mutate.MUTANTS]
    assert len(names) == len(set(names)) >= 15
    for m in mutate.MUTANTS:
        assert m.path.startswith(("csrc/", "python/")) and m.old != m.new and m.description, m.name


def _tree(tmp_path, m, text):
    (tmp_path / m.path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / m.path).write_text(text)


def test_rotten_snippet_is_reported(mutate, tmp_path):
    m = mutate.MUTANTS[0]
    _tree(tmp_path, m, m.old + "\n" + m.old)
    assert mutate.check_snippets(str(tmp_path), [m]) == [f"{m.name}: snippet occurs 2 times in {m.path}: {m.old!r}"]
    _tree(tmp_path, m, "reformatted")
    assert mutate.check_snippets(str(tmp_path), [m]) == [f"{m.name}: snippet occurs 0 times in {m.path}: {m.old!r}"]
    _tree(tmp_path, m, "before\n" + m.old + "\nafter")
    assert mutate.check_snippets(str(tmp_path), [m]) == []


def test_check_option_stops_before_building_on_a_rotten_snippet(mutate, monkeypatch, capsys):
    m = mutate.MUTANTS[0]
    monkeypatch.setattr(mutate, "MUTANTS", [mutate.Mutant(m.name, m.path, "no such snippet", "x", "rotten")])
    monkeypatch.setattr(mutate, "build", lambda *a: pytest.fail("built despite a rotten snippet"))
    assert mutate.main(["--check"]) == 2
    assert "no such snippet" in capsys.readouterr().err
