"""The package imports on its own (without importing torch first)."""

import subprocess
import sys

import pytest


@pytest.mark.slow  # a child process
def test_import_masknorm_standalone():
    code = "import masknorm, torch; assert hasattr(torch.ops.masknorm, 'batch_norm'); print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok" in proc.stdout


def test_build_info_and_version():
    import masknorm

    info = masknorm.build_info()
    assert info == masknorm._C.build_info()
    assert info["version"] == masknorm.__version__
    assert info["torch_version"] == __import__("torch").__version__


def _relative_imports(path):
    """The masknorm modules that the module at ``path`` imports, anywhere in
    its body (``from . import x``, ``from .x import y``, ``import masknorm.x``)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update([node.module] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("masknorm."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("masknorm."))
    return {n.split(".")[0] for n in names}


def test_package_modules_import_without_cycles():
    import pathlib

    import masknorm

    package = pathlib.Path(masknorm.__file__).parent
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    graph = {m: _relative_imports(package / f"{m}.py") & modules for m in modules}
    assert graph["convert"] and graph["distributed"], graph  # the check sees imports at all

    def cycle_from(start, path):
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = cycle_from(start, path + [nxt])
                if found:
                    return found
        return None

    cycles = [c for c in (cycle_from(m, [m]) for m in sorted(modules)) if c]
    assert cycles == [], f"import cycles between masknorm's modules: {cycles}"
