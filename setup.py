"""Builds masknorm and its C++ extension, masknorm._C.

Build against the torch already installed (`pip install --no-build-isolation .`):
the extension must match that torch's ABI, and build isolation would fetch
another torch.

On x86-64 the CPU kernels are also built once per instruction set, as
masknorm._C_cpu_avx2 and masknorm._C_cpu_avx512; the extension loads the best
one the CPU runs (csrc/ops/cpu/dispatch.cpp) and falls back to its own portable
kernels. MASKNORM_CPU_ISAS=avx2 (or empty) builds fewer, for quicker builds.
"""
import glob
import os
import platform

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))

# The flags torch itself compiles its AVX2 / AVX512 kernels with.
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ],
}


def sources(*patterns):
    found = set()
    for pattern in patterns:
        found.update(glob.glob(os.path.join(ROOT, pattern), recursive=True))
    return sorted(os.path.relpath(p, ROOT) for p in found)


def common_args():
    debug = os.environ.get("MASKNORM_DEBUG", "0") == "1"
    # -g0: Python's own CFLAGS add -g, which makes the module ~30x larger.
    # -fopenmp: at::parallel_for is inline and runs its loop through OpenMP;
    # without the flag it runs on one thread. The OpenMP runtime is torch's
    # (libgomp.so.1, already loaded with torch).
    # -Wno-unknown-pragmas: with -fopenmp, GCC reports torch headers' `#pragma unroll`.
    cxx = (["-O0", "-g"] if debug else ["-O3", "-g0"]) + ["-fopenmp", "-Wno-unknown-pragmas"]
    return dict(
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")],
        define_macros=[
            ("MASKNORM_VERSION", f'"{VERSION}"'),
            ("MASKNORM_TORCH_VERSION", f'"{torch.__version__}"'),
        ],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


def cpu_isas():
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    requested = os.environ.get("MASKNORM_CPU_ISAS", ",".join(ISA_FLAGS))
    return [isa for isa in requested.split(",") if isa]


def extensions():
    exts = [CppExtension(name="masknorm._C", sources=sources("csrc/**/*.cpp"), **common_args())]
    # What one instruction-set build of the kernels needs: kernels, their table, argument checks.
    kernel_sources = sources("csrc/ops/cpu/*_kernel.cpp", "csrc/ops/cpu/kernel_table.cpp", "csrc/ops/checks.cpp")
    for isa in cpu_isas():
        args = common_args()
        # Hidden visibility: the library exports only its kernel table.
        args["extra_compile_args"]["cxx"] += ISA_FLAGS[isa] + ["-fvisibility=hidden", f'-DMASKNORM_CPU_ISA="{isa}"']
        exts.append(CppExtension(name=f"masknorm._C_cpu_{isa}", sources=kernel_sources, **args))
    return exts


setup(
    name="masknorm",
    version=VERSION,
    package_dir={"": "python"},
    packages=find_packages("python"),
    package_data={"masknorm": ["py.typed"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
