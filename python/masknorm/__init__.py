"""masknorm: padding-aware BatchNorm, LayerNorm and RMSNorm for PyTorch.

``padding_mask`` follows ``src_key_padding_mask``: a bool tensor, True marks
padding. Padded positions never reach statistics, outputs (exactly 0) or
gradients (exactly 0). The ops are ``torch.ops.masknorm.*``; this package adds
modules, a functional API and :func:`convert_model` on top.
"""
from typing import Any, Dict

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.masknorm.*)
from . import _ops  # noqa: F401  (fake kernels for torch.compile / torch.export)
from . import functional
from .convert import convert_model
from .distributed import MaskedSyncBatchNorm
from .masks import padding_mask_from_lengths
from .modules import MaskedBatchNorm1d, MaskedLayerNorm, MaskedRMSNorm

__version__: str = _C.__version__


def build_info() -> Dict[str, Any]:
    """How the C++ extension was built: ``version`` (masknorm's),
    ``torch_version`` (the torch it was compiled against) and ``cuda``
    (whether CUDA kernels are built in)."""
    return dict(_C.build_info())


__all__ = [
    "MaskedBatchNorm1d",
    "MaskedLayerNorm",
    "MaskedRMSNorm",
    "MaskedSyncBatchNorm",
    "build_info",
    "convert_model",
    "functional",
    "padding_mask_from_lengths",
]
