"""Builds masknorm and its C++ extension, masknorm._C.

The extension is compiled against the torch installed in the environment it
is installed into, and only loads with that torch (masknorm/__init__.py checks
it at import). `pip install --no-build-isolation .` is the plain way; a plain
`pip install .` (build isolation) builds against that same torch too, found
beside the interpreter pip runs, rather than a torch fetched for the build.
Without an installed torch there is nothing to build against, and the build
stops saying so before anything is downloaded or compiled.

What is compiled comes from build.json, which CMakeLists.txt reads too: the
ops, the CPU kernels (also once per x86-64 instruction set, as
masknorm._C_cpu_avx2 / _C_cpu_avx512, loaded at run time by
csrc/ops/cpu/isa_select.cpp), and the CUDA kernels when CUDA is built. Each
extension keeps its objects in a build folder of its own (build/temp.*/<name>),
so rebuilding an unchanged tree compiles nothing. torch's build runs the
compiler through ccache (or sccache) when one is on the PATH, which then serves
objects compiled before (after `rm -rf build`, or switching branches back);
TORCH_NO_COMPILER_WRAPPER=1 turns that off.

Environment:
  MASKNORM_CUDA=1 / 0   force the CUDA kernels in / out (default: in when torch
                        has CUDA and nvcc is found); TORCH_CUDA_ARCH_LIST picks
                        the GPU architectures, as for any torch extension
  MASKNORM_CPU_ISAS     instruction-set builds to make, comma-separated
                        (default: all of build.json's; empty: none)
  MASKNORM_DEBUG=1      -O0 -g
  MASKNORM_SANITIZE=1   AddressSanitizer + UndefinedBehaviorSanitizer (build.json's
                        sanitize_flags; run Python with the runtimes preloaded,
                        README "Reliability")
  MAX_JOBS              parallel compile jobs (torch's ninja builds)
"""
import glob
import importlib.util
import json
import os
import platform
import site
import subprocess
import sys

import setuptools
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(ROOT, "build.json")) as f:
    BUILD = json.load(f)

# The setup.py commands that compile.
COMPILING_COMMANDS = {"build", "build_ext", "bdist", "bdist_wheel", "bdist_egg", "install", "develop", "editable_wheel"}
NO_TORCH = """
masknorm is a C++ extension compiled against the torch you will import,
and no torch is installed for {python}.

Install torch first, the build you want (CPU only or CUDA), as
https://pytorch.org/get-started/locally/ says; for example, CPU only:

    pip install torch --index-url https://download.pytorch.org/whl/cpu

then build masknorm against it, from the clone or unpacked sdist:

    pip install ninja && pip install --no-build-isolation .
"""


def setuptools_version():
    return tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())


def locate_installed_torch():
    """Make the torch of the environment being installed into importable;
    False when it has none.

    In an isolated build (a plain `pip install .`), pip runs this script with
    the target environment's interpreter but hides its site-packages behind a
    temporary one. Building against a torch fetched into that (gigabytes, and
    whatever version pip picks) gives an extension that does not load with the
    torch the user imports; so look for the target environment's torch, as
    that interpreter finds it without pip's PYTHONPATH, and build against it.
    """
    if importlib.util.find_spec("torch") is not None:
        return True
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = "import importlib.util as u; s = u.find_spec('torch'); print(s.submodule_search_locations[0] if s else '')"
    try:
        found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    torch_dir = found.stdout.strip()
    if found.returncode != 0 or not torch_dir:
        return False
    # After the build environment's own paths: its setuptools and ninja stay in charge.
    site.addsitedir(os.path.dirname(torch_dir))
    return importlib.util.find_spec("torch") is not None


def commands():
    return {arg for arg in sys.argv[1:] if not arg.startswith("-")}


if setuptools_version() < (77, 0):
    # pyproject.toml's SPDX `license` string needs setuptools 77; with
    # --no-build-isolation the environment's setuptools builds.
    sys.exit(f"masknorm needs setuptools>=77 to build, this environment has {setuptools.__version__}: "
             "pip install 'setuptools>=77'")

# Compiling needs torch. So does the wheel's metadata (dist_info), not for
# itself but so that pip stops there, before it fetches torch as a dependency
# (gigabytes) only to find that the build has none to compile against. An
# sdist (egg_info, sdist) needs none.
if commands() & (COMPILING_COMMANDS | {"dist_info"}) and not locate_installed_torch():
    sys.exit(NO_TORCH.format(python=sys.executable))
if commands() & COMPILING_COMMANDS:  # imported only here: seconds
    import torch
    from torch.utils import cpp_extension
else:
    torch = None


def sources(*groups):
    found = set()
    for group in groups:
        for pattern in BUILD[group]:
            found.update(glob.glob(os.path.join(ROOT, pattern)))
    return sorted(os.path.relpath(p, ROOT) for p in found)


def with_cuda():
    forced = os.environ.get("MASKNORM_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def common_args(cuda):
    debug = os.environ.get("MASKNORM_DEBUG", "0") == "1"
    # -g0: Python's own CFLAGS add -g, which makes the module ~30x larger.
    # OpenMP: at::parallel_for is inline and runs its loop through OpenMP;
    # without the flag it runs on one thread. The runtime is torch's
    # (libgomp.so.1, already loaded with torch).
    sanitize = BUILD["sanitize_flags"] if os.environ.get("MASKNORM_SANITIZE", "0") == "1" else []
    cxx = (["-O0", "-g"] if debug else ["-O3", "-g0"]) + BUILD["openmp_flags"] + BUILD["cxx_flags"] + sanitize
    args = dict(
        include_dirs=[os.path.join(ROOT, d) for d in BUILD["include_dirs"]],
        define_macros=[
            ("MASKNORM_VERSION", f'"{BUILD["version"]}"'),
            # The torch compiled against, which masknorm/__init__.py compares
            # with the one imported (also read back by masknorm.build_info()).
            ("MASKNORM_TORCH_VERSION", f'"{torch.__version__}"'),
            ("MASKNORM_TORCH_CUDA", f'"{torch.version.cuda or ""}"'),
            ("MASKNORM_ISA_LIBRARY_INFIX", f'"{BUILD["isa_library_infix"]}"'),
        ],
        extra_compile_args={"cxx": cxx},
        extra_link_args=BUILD["openmp_flags"] + sanitize,
        # libstdc++ ahead of torch's libraries (cpp_extension appends c10,
        # torch, ...): libc10 exports weak copies of some std:: functions
        # (std::ostringstream's constructor, stringbuf::str), and the linker
        # resolves each symbol against the first library defining it. Against
        # libc10 the reference is unversioned and binds to libc10's copy at
        # run time, while the rest of the stream's functions bind to the
        # system libstdc++: one object, two implementations. Against
        # libstdc++ every std:: reference carries its GLIBCXX version.
        libraries=["stdc++"],
    )
    if cuda:
        args["extra_compile_args"]["nvcc"] = list(BUILD["nvcc_flags"])
        args["define_macros"].append(("MASKNORM_WITH_CUDA", "1"))
    return args


def cpu_isas():
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    requested = os.environ.get("MASKNORM_CPU_ISAS", ",".join(BUILD["cpu_isas"]))
    return [isa for isa in requested.split(",") if isa]


def extensions():
    cuda = with_cuda()
    main_sources = sources("ops", "cpu_kernels", "python_module") + (sources("cuda_kernels") if cuda else [])
    Extension = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    exts = [Extension(name="masknorm._C", sources=main_sources, **common_args(cuda))]
    for isa in cpu_isas():
        args = common_args(cuda=False)
        # Hidden visibility: the library exports only its kernel table.
        args["extra_compile_args"]["cxx"] += BUILD["cpu_isas"][isa] + ["-fvisibility=hidden", f'-DMASKNORM_CPU_ISA="{isa}"']
        exts.append(cpp_extension.CppExtension(
            name=f"masknorm._C{BUILD['isa_library_infix']}{isa}", sources=sources("cpu_kernels"), **args))
    return exts


if torch is not None:

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, with each extension's objects in a folder of
        their own: the instruction-set builds compile the same sources with
        other flags, and shared object paths would make every build recompile
        them."""

        def build_extension(self, ext):
            build_temp = self.build_temp
            self.build_temp = os.path.join(build_temp, ext.name)
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = build_temp

    EXT_MODULES = extensions()
    CMDCLASS = {"build_ext": BuildExtension.with_options(use_ninja=True)}
else:  # sdist and metadata only
    EXT_MODULES, CMDCLASS = [], {}


setup(
    name="masknorm",
    version=BUILD["version"],
    package_dir={"": "python"},
    packages=find_packages("python"),
    package_data={"masknorm": ["py.typed"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
