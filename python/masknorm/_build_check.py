"""Is masknorm's C++ extension built for the torch that is imported?

A torch extension loads only with the torch it was compiled against. With
another one it fails with an undefined symbol (or, worse, loads and crashes),
which says nothing about torch versions. So the extension carries the torch
version, CUDA version and C++ ABI it was compiled against as bytes of its file
(``masknorm_build_stamp`` in csrc/masknorm.cpp), read here before the file is
loaded and compared with the running torch; a mismatch, or an undefined symbol
when loading, raises :class:`TorchMismatchError`, naming both torches and the
command that rebuilds masknorm against the imported one.
"""
from __future__ import annotations

import importlib.util
import json
import mmap
import os
import shlex
import sys
from typing import Dict, Optional
from urllib.parse import unquote, urlparse

import torch

STAMP_MARKER = b"MASKNORM_BUILD_STAMP:"
FIELDS = ("torch_version", "torch_cuda", "cxx11_abi")


class TorchMismatchError(ImportError):
    """masknorm's C++ extension was built for another torch than the one imported."""


TorchMismatchError.__module__ = "masknorm"  # how tracebacks name it


def read_stamp(path: str) -> Optional[Dict[str, str]]:
    """The build stamp in the extension file at ``path`` (``torch_version``,
    ``torch_cuda``, ``cxx11_abi``, as strings; "" where none), or None when the
    file has none (built before stamps existed) or cannot be read."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start = data.find(STAMP_MARKER)
            if start < 0:
                return None
            start += len(STAMP_MARKER)
            end = data.find(b"\0", start)
            text = data[start:end].decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    fields = dict(item.split("=", 1) for item in text.split(";") if "=" in item)
    return fields if all(k in fields for k in FIELDS) else None


def running_torch() -> Dict[str, str]:
    """The imported torch, in the stamp's terms."""
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    return {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda or "",
        "cxx11_abi": "" if abi is None else str(int(abi)),
    }


def differences(built: Dict[str, str], running: Dict[str, str]) -> list:
    """The stamp fields that differ. An empty torch_cuda is a CPU-only torch;
    an empty cxx11_abi (a compiler without the switch) is no difference."""
    differing = [k for k in ("torch_version", "torch_cuda") if built.get(k) != running.get(k)]
    if built.get("cxx11_abi") and running.get("cxx11_abi") and built["cxx11_abi"] != running["cxx11_abi"]:
        differing.append("cxx11_abi")
    return differing


def describe(info: Dict[str, str], show_abi: bool = False) -> str:
    """'torch 2.13.0+cpu (CPU only)' and the like."""
    details = [f"CUDA {info['torch_cuda']}" if info.get("torch_cuda") else "CPU only"]
    if show_abi and info.get("cxx11_abi"):
        details.append(f"_GLIBCXX_USE_CXX11_ABI={info['cxx11_abi']}")
    return f"torch {info.get('torch_version') or 'unknown'} ({', '.join(details)})"


def _installed_from() -> Optional[tuple]:
    """(source folder or sdist, editable) that pip installed masknorm from,
    from its PEP 610 direct_url.json; None when unknown or a wheel (which
    holds the same build, so reinstalling it changes nothing)."""
    try:
        from importlib import metadata

        text = metadata.distribution("masknorm").read_text("direct_url.json")
        info = json.loads(text) if text else None
    except Exception:
        return None
    if not info or not str(info.get("url", "")).startswith("file:"):
        return None
    path = unquote(urlparse(info["url"]).path)
    if "dir_info" in info:
        return path, bool(info["dir_info"].get("editable"))
    if path.endswith((".tar.gz", ".zip")):
        return path, False
    return None


def reinstall_command() -> str:
    """The pip command that rebuilds masknorm against the imported torch and
    leaves that torch alone."""
    source = _installed_from()
    target = shlex.quote(source[0]) if source else "<masknorm clone or sdist>"
    editable = "-e " if source and source[1] else ""
    return (f"{shlex.quote(sys.executable)} -m pip install --no-build-isolation --no-deps --force-reinstall "
            f"{editable}{target}")


def message(built: Optional[Dict[str, str]], running: Dict[str, str], cause: str = "") -> str:
    """What went wrong, both torches, and how to fix it."""
    differing = differences(built, running) if built else []
    show_abi = "cxx11_abi" in differing
    here = f"{describe(running, show_abi)} from {os.path.dirname(torch.__file__)}"
    if built is None:
        first = f"masknorm's C++ extension was compiled against another torch (it does not record which) than {here}."
    elif not differing:
        first = (f"masknorm's C++ extension does not load with {here}, although it records the same release: "
                 "it was compiled against another build of it.")
    else:
        first = f"masknorm's C++ extension was compiled against {describe(built, show_abi)}, but this Python imports {here}."
    lines = [first]
    if cause:
        lines.append(f"Loading it failed: {cause}")
    lines += [
        "A torch extension only loads with the torch it was compiled against. Rebuild masknorm against the "
        "torch you have (--no-build-isolation: build against this torch, not one pip fetches for the build; "
        "--no-deps: keep this torch):",
        "",
        f"    {reinstall_command()}",
        "",
        "To use another torch instead, install that one first (https://pytorch.org/get-started/locally/), "
        "then run the same command.",
    ]
    return "\n".join(lines)


def extension_path(name: str = "masknorm._C") -> Optional[str]:
    """The file of the extension module, without loading it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and os.path.isfile(spec.origin) else None


def check_before_loading() -> Optional[Dict[str, str]]:
    """Raise TorchMismatchError if the extension's stamp names another torch;
    return the stamp (None where there is none)."""
    path = extension_path()
    built = read_stamp(path) if path else None
    if built is not None and differences(built, running_torch()):
        raise TorchMismatchError(message(built, running_torch()))
    return built


def explain_load_error(error: ImportError, built: Optional[Dict[str, str]]) -> Optional[TorchMismatchError]:
    """A TorchMismatchError for an extension that failed to load with an
    undefined symbol (a torch ABI mismatch); None for other import errors."""
    if "undefined symbol" not in str(error):
        return None
    return TorchMismatchError(message(built, running_torch(), cause=str(error)))
