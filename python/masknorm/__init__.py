"""masknorm: padding-aware BatchNorm, LayerNorm, RMSNorm, GroupNorm and
InstanceNorm for PyTorch.

``padding_mask`` follows ``src_key_padding_mask``: a bool tensor, True marks
padding. Padded positions never reach statistics, outputs (exactly 0) or
gradients (exactly 0). The ops are ``torch.ops.masknorm.*``; this package adds
modules, a functional API and :func:`convert_model` on top.
"""
from typing import Any, Dict

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _build_check

# The extension loads only with the torch it was compiled against: check that
# first, and explain an undefined symbol as a torch mismatch.
_stamp = _build_check.check_before_loading()
try:
    from . import _C  # noqa: F401  (registers torch.ops.masknorm.*)
except ImportError as _error:
    _explained = _build_check.explain_load_error(_error, _stamp)
    if _explained is None:
        raise
    raise _explained from _error
from . import _ops  # noqa: F401  (fake kernels for torch.compile / torch.export)
from . import functional
from .convert import convert_model
from .distributed import MaskedSyncBatchNorm
from .kernels import enable_device_data_checks, kernels_for, use_fused_cuda_kernels
from .masks import padding_mask_from_lengths
from .padding_context import padding
from .modules import (
    MaskedBatchNorm1d,
    MaskedBatchNorm2d,
    MaskedBatchNorm3d,
    MaskedGroupNorm,
    MaskedInstanceNorm1d,
    MaskedInstanceNorm2d,
    MaskedInstanceNorm3d,
    MaskedLayerNorm,
    MaskedRMSNorm,
)

__version__: str = _C.__version__


def build_info() -> Dict[str, Any]:
    """How the C++ extension was built, and which kernels run:

    - ``version``: masknorm's version;
    - ``torch_version``: the torch it was compiled against (``import masknorm``
      fails with another);
    - ``torch_cuda``: that torch's CUDA version (``torch.version.cuda``), None
      for a CPU-only torch;
    - ``cxx11_abi``: that torch's C++ ABI (``torch._C._GLIBCXX_USE_CXX11_ABI``),
      None where the compiler has no such switch;
    - ``cuda``: whether masknorm's CUDA kernels are built in;
    - ``cpu_kernels``: which build of the CPU kernels runs (``"avx512"``,
      ``"avx2"`` or ``"default"``, the portable one);
    - ``cpu_kernels_note``: why a faster CPU kernel build is not used (``""``
      when the best one for this CPU runs).
    """
    return dict(_C.build_info())


__all__ = [
    "MaskedBatchNorm1d",
    "MaskedBatchNorm2d",
    "MaskedBatchNorm3d",
    "MaskedGroupNorm",
    "MaskedInstanceNorm1d",
    "MaskedInstanceNorm2d",
    "MaskedInstanceNorm3d",
    "MaskedLayerNorm",
    "MaskedRMSNorm",
    "MaskedSyncBatchNorm",
    "build_info",
    "convert_model",
    "enable_device_data_checks",
    "functional",
    "kernels_for",
    "padding",
    "padding_mask_from_lengths",
    "use_fused_cuda_kernels",
]
