"""Builds masknorm and its C++ extension, masknorm._C.

Build against the torch already installed (`pip install --no-build-isolation .`):
the extension must match that torch's ABI, and build isolation would fetch
another torch.

What is compiled comes from build.json, which CMakeLists.txt reads too: the
ops, the CPU kernels (also once per x86-64 instruction set, as
masknorm._C_cpu_avx2 / _C_cpu_avx512, loaded at run time by
csrc/ops/cpu/isa_select.cpp), and the CUDA kernels when CUDA is built.

Environment:
  MASKNORM_CUDA=1 / 0   force the CUDA kernels in / out (default: in when torch
                        has CUDA and nvcc is found); TORCH_CUDA_ARCH_LIST picks
                        the GPU architectures, as for any torch extension
  MASKNORM_CPU_ISAS     instruction-set builds to make, comma-separated
                        (default: all of build.json's; empty: none)
  MASKNORM_DEBUG=1      -O0 -g
"""
import glob
import json
import os
import platform

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(ROOT, "build.json")) as f:
    BUILD = json.load(f)


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
    cxx = (["-O0", "-g"] if debug else ["-O3", "-g0"]) + BUILD["openmp_flags"] + BUILD["cxx_flags"]
    args = dict(
        include_dirs=[os.path.join(ROOT, d) for d in BUILD["include_dirs"]],
        define_macros=[
            ("MASKNORM_VERSION", f'"{BUILD["version"]}"'),
            ("MASKNORM_TORCH_VERSION", f'"{torch.__version__}"'),
            ("MASKNORM_ISA_LIBRARY_INFIX", f'"{BUILD["isa_library_infix"]}"'),
        ],
        extra_compile_args={"cxx": cxx},
        extra_link_args=list(BUILD["openmp_flags"]),
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


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, with each extension's objects in a folder of
    their own: the instruction-set builds compile the same sources with other
    flags, and shared object paths would make every build recompile them."""

    def build_extension(self, ext):
        build_temp = self.build_temp
        self.build_temp = os.path.join(build_temp, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = build_temp


setup(
    name="masknorm",
    version=BUILD["version"],
    package_dir={"": "python"},
    packages=find_packages("python"),
    package_data={"masknorm": ["py.typed"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
