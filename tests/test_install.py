"""Installing and first use: the torch check at import, a quiet import, the
license and sdist, `python -m masknorm`, and what the benchmark needs and
writes."""

import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tarfile

import pytest
import torch

import masknorm
from masknorm import _build_check

pytestmark = pytest.mark.slow  # builds an sdist and starts fresh interpreters

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = pathlib.Path(masknorm.__file__).parent


def run_python(code, cwd, env_extra=None, timeout=300):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------
# the torch the extension was compiled against
# --------------------------------------------------------------------------


def test_extension_records_the_torch_it_was_compiled_against():
    stamp = _build_check.read_stamp(_build_check.extension_path())
    assert stamp == _build_check.running_torch()
    info = masknorm.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["torch_cuda"] == torch.version.cuda
    assert info["cxx11_abi"] == bool(torch._C._GLIBCXX_USE_CXX11_ABI)


def copy_package(tmp_path):
    """The installed masknorm package, copied to tmp_path/pkg/masknorm."""
    dest = tmp_path / "pkg" / "masknorm"
    shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest, pathlib.Path(_build_check.extension_path()).name


def other_version(version):
    """A torch version of the same length as `version` that differs from it."""
    return ("8" if version[0] == "9" else "9") + version[1:]


def test_extension_built_for_another_torch_is_reported_before_loading(tmp_path):
    dest, so_name = copy_package(tmp_path)
    so = dest / so_name
    data = so.read_bytes()
    marker = b"MASKNORM_BUILD_STAMP:torch_version=" + torch.__version__.encode()
    assert data.count(marker) == 1
    fake = other_version(torch.__version__)
    so.write_bytes(data.replace(marker, b"MASKNORM_BUILD_STAMP:torch_version=" + fake.encode()))

    proc = run_python("import masknorm", cwd=tmp_path, env_extra={"PYTHONPATH": str(tmp_path / "pkg")})
    assert proc.returncode != 0
    err = proc.stderr
    assert "TorchMismatchError" in err, err[-3000:]
    assert f"compiled against torch {fake}" in err, err[-3000:]
    assert f"imports torch {torch.__version__}" in err, err[-3000:]
    assert "-m pip install --no-build-isolation --no-deps --force-reinstall" in err, err[-3000:]
    assert "undefined symbol" not in err  # checked before loading the file


C_COMPILER = shutil.which("cc") or shutil.which("gcc")


@pytest.mark.skipif(C_COMPILER is None, reason="needs a C compiler")
def test_undefined_symbol_on_loading_is_reported_as_a_torch_mismatch(tmp_path):
    """A build whose stamp matches (or that has none) but which does not link
    against this torch: the loader's undefined-symbol error becomes the same
    explanation, with the loader's message in it."""
    dest, so_name = copy_package(tmp_path)
    running = _build_check.running_torch()
    source = tmp_path / "fake.c"
    source.write_text(
        "extern void masknorm_test_symbol_not_in_this_torch(void);\n"
        f'const char masknorm_build_stamp[] = "MASKNORM_BUILD_STAMP:torch_version={running["torch_version"]};'
        f'torch_cuda={running["torch_cuda"]};cxx11_abi={running["cxx11_abi"]};";\n'
        "void PyInit__C(void) { masknorm_test_symbol_not_in_this_torch(); }\n"
    )
    subprocess.run([C_COMPILER, "-shared", "-fPIC", "-o", str(dest / so_name), str(source)], check=True)

    proc = run_python("import masknorm", cwd=tmp_path, env_extra={"PYTHONPATH": str(tmp_path / "pkg")})
    assert proc.returncode != 0
    err = proc.stderr
    assert "TorchMismatchError" in err, err[-3000:]
    assert "undefined symbol: masknorm_test_symbol_not_in_this_torch" in err, err[-3000:]
    assert f"does not load with torch {torch.__version__}" in err, err[-3000:]
    assert "--no-build-isolation" in err, err[-3000:]


def test_mismatch_message_names_both_torches_and_the_command():
    built = {"torch_version": "2.14.1", "torch_cuda": "13.0", "cxx11_abi": "1"}
    running = {"torch_version": "2.13.0+cpu", "torch_cuda": "", "cxx11_abi": "1"}
    assert _build_check.differences(built, running) == ["torch_version", "torch_cuda"]
    text = _build_check.message(built, running)
    assert "compiled against torch 2.14.1 (CUDA 13.0)" in text
    assert "imports torch 2.13.0+cpu (CPU only)" in text
    assert f"{sys.executable} -m pip install --no-build-isolation --no-deps --force-reinstall" in text
    # an ABI difference alone is one too, and is named
    abi = dict(running, cxx11_abi="0")
    assert _build_check.differences(abi, running) == ["cxx11_abi"]
    assert "_GLIBCXX_USE_CXX11_ABI=0" in _build_check.message(abi, running)
    # the CPU and a CUDA build of one release differ too
    cuda = dict(running, torch_version="2.13.0", torch_cuda="12.8")
    assert _build_check.differences(cuda, dict(running, torch_version="2.13.0")) == ["torch_cuda"]
    assert _build_check.differences(running, dict(running)) == []


def test_reinstall_command_names_where_masknorm_was_installed_from():
    direct_url = importlib.metadata.distribution("masknorm").read_text("direct_url.json")
    info = json.loads(direct_url) if direct_url else {}
    command = _build_check.reinstall_command()
    if "dir_info" in info:  # pip install <folder>
        assert command.endswith(info["url"][len("file://"):]), command
    else:
        assert command.endswith("<masknorm clone or sdist>") or command.endswith((".tar.gz", ".zip")), command


# --------------------------------------------------------------------------
# a quiet import, the package's metadata
# --------------------------------------------------------------------------


def test_import_prints_nothing(tmp_path):
    proc = run_python("import masknorm", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "" and proc.stderr == "", proc.stderr[-3000:]


def test_numpy_is_a_dependency():
    """torch warns "Failed to initialize NumPy" on import without numpy."""
    requires = importlib.metadata.requires("masknorm") or []
    names = {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in requires}
    assert {"torch", "numpy"} <= names, requires


def test_license_is_shipped_and_declared():
    meta = importlib.metadata.metadata("masknorm")
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert "LICENSE" in (meta.get_all("License-File") or [])
    dist = importlib.metadata.distribution("masknorm")
    shipped = [f for f in dist.files or [] if f.name == "LICENSE"]
    assert shipped, "no LICENSE among the installed files"
    text = shipped[0].read_text()
    assert "BSD 3-Clause License" in text and "masknorm contributors" in text


def tracked_files():
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        return None
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    return set(out.stdout.split()) if out.returncode == 0 else None


@pytest.mark.skipif(tracked_files() is None, reason="needs a git clone (an sdist has no git)")
def test_sdist_holds_every_file_a_build_and_the_tests_need(tmp_path):
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = proc.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if m.isfile()}
    not_needed = {".ci/run", ".gitignore"}
    missing = sorted(tracked_files() - members - not_needed)
    assert not missing, f"tracked files missing from the sdist: {missing}"
    assert {"LICENSE", "build.json", "CMakeLists.txt", "setup.py", "pyproject.toml", "MANIFEST.in"} <= members
    assert not [m for m in members if m.endswith(".so") or "__pycache__" in m]


# --------------------------------------------------------------------------
# python -m masknorm; the benchmark: extras and output folder (the study's: test_study.py)
# --------------------------------------------------------------------------


def test_python_m_masknorm_runs_the_demo(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "masknorm", "--batches", "5"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("== Worked examples")
    assert "largest running-mean error: BatchNorm1d" in proc.stdout
    usage = subprocess.run([sys.executable, "-m", "masknorm", "--help"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: python -m masknorm "), usage.stdout


BENCHMARKS = ROOT / "benchmarks"
needs_clone = pytest.mark.skipif(not (BENCHMARKS / "run.py").is_file(), reason="the benchmarks live in the clone")


@needs_clone
def test_benchmark_names_its_extra_when_a_package_is_missing(tmp_path):
    code = ("import sys; sys.modules['tqdm'] = None\n"
            "from benchmarks.run import main\nmain(['--quick'])\n")
    proc = run_python(code, cwd=tmp_path, env_extra={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert "tqdm is not installed" in proc.stderr
    assert 'pip install "masknorm[bench]"' in proc.stderr


@needs_clone
def test_benchmark_writes_to_an_untracked_folder_by_default(tmp_path):
    committed = BENCHMARKS / "results" / "results.md"
    before = committed.read_bytes()
    code = ("import sys; from benchmarks.run import main\n"
            f"main(['--from-json', {str(BENCHMARKS / 'results' / 'results.json')!r}])\n")
    proc = run_python(code, cwd=tmp_path, env_extra={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "masknorm_results" / "benchmarks"
    assert (out / "results.md").is_file() and (out / "results.png").is_file()
    assert committed.read_bytes() == before


def test_default_output_folder_is_ignored_by_git():
    gitignore = ROOT / ".gitignore"
    if not gitignore.is_file():
        pytest.skip("needs the clone's .gitignore")
    assert "masknorm_results/" in gitignore.read_text().splitlines()


# --------------------------------------------------------------------------
# the extension modules' file names, for the tests above
# --------------------------------------------------------------------------


def test_extension_path_is_the_loaded_module():
    assert _build_check.extension_path() == masknorm._C.__file__
    assert masknorm._C.__file__.endswith(sysconfig.get_config_var("EXT_SUFFIX"))
