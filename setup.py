"""Builds masknorm and its C++ extension, masknorm._C.

Build against the torch already installed (`pip install --no-build-isolation .`):
the extension must match that torch's ABI, and build isolation would fetch
another torch.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def extension():
    sources = sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)
    )
    debug = os.environ.get("MASKNORM_DEBUG", "0") == "1"
    # -g0: Python's own CFLAGS add -g, which makes the module ~30x larger (36 MB against 1 MB).
    cxx_flags = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    return CppExtension(
        name="masknorm._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")],
        define_macros=[
            ("MASKNORM_VERSION", f'"{VERSION}"'),
            ("MASKNORM_TORCH_VERSION", f'"{torch.__version__}"'),
        ],
        extra_compile_args={"cxx": cxx_flags},
    )


setup(
    name="masknorm",
    version=VERSION,
    package_dir={"": "python"},
    packages=find_packages("python"),
    package_data={"masknorm": ["py.typed"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
