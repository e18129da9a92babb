"""Which kernels serve masknorm's ops, and the switches that change it.

Every op has one entry for all devices (csrc/ops/); it runs the CPU kernels
for CPU tensors (the build for this processor's instruction set), the fused
CUDA kernels for CUDA tensors when masknorm was built with them, and kernels
written with ATen ops (``"generic"``) on any other device torch supports.
"""
from __future__ import annotations

from typing import Union

import torch

from . import _C

__all__ = ["enable_device_data_checks", "kernels_for", "use_fused_cuda_kernels"]


def kernels_for(device: Union[str, torch.device]) -> str:
    """The kernels serving tensors on ``device``: a CPU build (``"avx512"``,
    ``"avx2"``, ``"default"``), ``"cuda"`` (the fused CUDA kernels) or
    ``"generic"`` (ATen ops: other devices, or CUDA with the fused kernels off)."""
    return _C._kernels_for(str(torch.device(device)))


def use_fused_cuda_kernels(on: bool = True) -> None:
    """Serves CUDA tensors from the fused CUDA kernels (the default where
    built) or, with ``on=False``, from the generic ATen-op kernels. The
    environment variable ``MASKNORM_CUDA_KERNELS=generic`` turns them off at
    start."""
    _C._use_fused_cuda_kernels(bool(on))


def enable_device_data_checks(on: bool = True) -> None:
    """Runs data-dependent checks on accelerators too: a batch with a single
    valid value per channel in training raises ``ValueError`` (as on the CPU,
    and as ``nn.BatchNorm1d``). Off by default on accelerators: the check reads
    the valid count back to the host, a synchronization per call. Never runs
    while a CUDA graph is being captured. ``MASKNORM_DEVICE_DATA_CHECKS=1``
    turns it on at start."""
    _C._enable_device_data_checks(bool(on))
