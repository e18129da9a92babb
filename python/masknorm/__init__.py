"""masknorm: padding-aware BatchNorm, LayerNorm and RMSNorm for PyTorch.

``padding_mask`` follows ``src_key_padding_mask``: a bool tensor, True marks
padding. Padded positions never reach statistics, outputs (exactly 0) or
gradients (exactly 0). The ops are ``torch.ops.masknorm.*``; this package adds
modules and a functional API on top.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.masknorm.*)
from . import _ops  # noqa: F401  (fake kernels for torch.compile / torch.export)
from . import functional
from .masks import padding_mask_from_lengths
from .modules import MaskedBatchNorm1d, MaskedLayerNorm, MaskedRMSNorm

__version__ = _C.__version__

__all__ = [
    "MaskedBatchNorm1d",
    "MaskedLayerNorm",
    "MaskedRMSNorm",
    "functional",
    "padding_mask_from_lengths",
]
