"""tools/mutate.py's list of mutants stays applicable (neighbours: the tests
that kill them, test_batch_norm.py, test_batch_norm_stages.py,
test_row_norm.py, test_gradcheck.py, test_fake_kernels.py, test_errors.py,
test_reliability.py; the last table in docs/reliability.md): every snippet
occurs exactly once in its file, under csrc/ or python/, and changes it. The
mutation run itself is long and on demand (python tools/mutate.py)."""

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


def test_every_snippet_occurs_once(mutate):
    assert mutate.check_snippets(str(ROOT), mutate.MUTANTS) == []


def test_mutants_are_named_once_and_change_sources(mutate):
    names = [m.name for m in mutate.MUTANTS]
    assert len(names) == len(set(names)) >= 15
    for m in mutate.MUTANTS:
        assert m.path.startswith(("csrc/", "python/")) and m.old != m.new and m.description, m.name


def test_rotten_snippet_is_reported(mutate, tmp_path):
    m = mutate.MUTANTS[0]
    (tmp_path / m.path).parent.mkdir(parents=True)
    (tmp_path / m.path).write_text(m.old + "\n" + m.old)
    assert mutate.check_snippets(str(tmp_path), [m]) == [f"{m.name}: snippet occurs 2 times in {m.path}: {m.old!r}"]
