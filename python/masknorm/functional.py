"""Functional masked normalization: the same signatures as
torch.nn.functional.batch_norm / layer_norm / rms_norm plus a keyword-only
``padding_mask`` (bool, True marks padding).

These functions only shape arguments and call ``torch.ops.masknorm.*``; the
ops check every argument and raise errors that name it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["batch_norm", "layer_norm", "rms_norm"]

_shape_t = Union[int, Sequence[int], torch.Size]


def _as_shape(normalized_shape: _shape_t) -> List[int]:
    if isinstance(normalized_shape, int):
        return [normalized_shape]
    return [int(s) for s in normalized_shape]


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    padding_mask: Optional[Tensor] = None,
    channels_last: bool = False,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """Batch norm over the valid (non-padding) positions of ``input``.

    ``input`` is (N, C) or (N, C, L), or (N, L, C) with ``channels_last=True``;
    ``padding_mask`` is (N,) or (N, L). In training, statistics come from the
    valid positions only and, when given, ``running_mean``/``running_var`` are
    updated in place (unbiased variance) unless no position is valid;
    ``num_batches_tracked``, when given, is incremented (as
    nn.BatchNorm1d.forward does), and ``momentum=None`` takes the cumulative
    average, factor ``1 / num_batches_tracked``. Padded positions of the
    output are 0. One op call: ``torch.ops.masknorm.batch_norm``.
    """
    return torch.ops.masknorm.batch_norm(
        input, padding_mask, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
        channels_last,
    )[0]


def layer_norm(
    input: Tensor,
    normalized_shape: _shape_t,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Layer norm over the trailing ``normalized_shape`` dims of each valid row.

    ``padding_mask`` has shape ``input.shape[:-len(normalized_shape)]``; padded
    rows give 0 and are never read.
    """
    return torch.ops.masknorm.layer_norm(input, _as_shape(normalized_shape), padding_mask, weight, bias, eps)[0]


def rms_norm(
    input: Tensor,
    normalized_shape: _shape_t,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """RMS norm over the trailing ``normalized_shape`` dims of each valid row.

    ``eps=None`` uses the machine epsilon of the accumulation dtype, as
    torch.nn.functional.rms_norm does. Padded rows give 0 and are never read.
    """
    return torch.ops.masknorm.rms_norm(input, _as_shape(normalized_shape), padding_mask, weight, eps)[0]
