"""Functional masked normalization: the same signatures as
torch.nn.functional.batch_norm / layer_norm / rms_norm / group_norm /
instance_norm plus a keyword-only ``padding_mask`` (bool, True marks padding).

These functions only shape arguments and call ``torch.ops.masknorm.*``; the
ops check every argument and raise errors that name it. Each also takes
(N, C, *spatial) input of any rank and a jagged NestedTensor (N, j, C) in
place of a padded tensor and mask (_layouts.py).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _layouts

__all__ = ["batch_norm", "group_norm", "instance_norm", "layer_norm", "rms_norm"]

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

    ``input`` is (N, C) or (N, C, *spatial) (BatchNorm1d/2d/3d), or
    (N, *spatial, C) with ``channels_last=True``; ``padding_mask`` is (N,),
    or (N, *spatial) or over trailing spatial dims only (e.g. (N, T) for
    (N, C, F, T)), broadcast. A jagged NestedTensor (N, j, C) takes the place
    of a padded tensor and mask: statistics over all its tokens. In training,
    statistics come from the valid positions only and, when given,
    ``running_mean``/``running_var`` are updated in place (unbiased variance)
    unless no position is valid; ``num_batches_tracked``, when given, is
    incremented (as nn.BatchNorm1d.forward does), and ``momentum=None`` takes
    the cumulative average, factor ``1 / num_batches_tracked``. Padded
    positions of the output are 0. One op call: ``torch.ops.masknorm.batch_norm``.
    """
    if _layouts.is_jagged(input):
        return _layouts.on_values(input, padding_mask, "batch_norm", lambda values: torch.ops.masknorm.batch_norm(
            values, None, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, False,
        )[0])
    x = _layouts.flatten_spatial(input, padding_mask, channels_last, "batch_norm")
    return x.restore(
        torch.ops.masknorm.batch_norm(
            x.input, x.padding_mask, weight, bias, running_mean, running_var, num_batches_tracked, training,
            momentum, eps, x.channels_last,
        )[0]
    )


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
    rows give 0 and are never read. A jagged NestedTensor (N, j, C) is
    normalized token by token (its values), with ``normalized_shape`` (C,).
    """
    if _layouts.is_jagged(input):
        return _layouts.on_values(input, padding_mask, "layer_norm", lambda values: torch.ops.masknorm.layer_norm(
            values, _as_shape(normalized_shape), None, weight, bias, eps)[0])
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
    A jagged NestedTensor (N, j, C) is normalized token by token (its values).
    """
    if _layouts.is_jagged(input):
        return _layouts.on_values(input, padding_mask, "rms_norm", lambda values: torch.ops.masknorm.rms_norm(
            values, _as_shape(normalized_shape), None, weight, eps)[0])
    return torch.ops.masknorm.rms_norm(input, _as_shape(normalized_shape), padding_mask, weight, eps)[0]


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    padding_mask: Optional[Tensor] = None,
    channels_last: bool = False,
) -> Tensor:
    """Group norm of each sample over its valid positions.

    ``input`` is (N, C, *spatial), or (N, *spatial, C) with
    ``channels_last=True``; statistics per (sample, group) over the group's
    C / num_groups channels at the sample's valid positions; ``padding_mask``
    as for :func:`batch_norm`. A sample without valid positions gives zeros.
    A jagged NestedTensor (N, j, C) is normalized sequence by sequence. One
    op call: ``torch.ops.masknorm.group_norm``.
    """
    if _layouts.is_jagged(input):
        def norm(padded: Tensor, mask: Tensor) -> Tensor:
            return torch.ops.masknorm.group_norm(padded, mask, weight, bias, num_groups, eps, True)[0]

        return _layouts.per_sequence(input, padding_mask, "group_norm", norm)
    x = _layouts.flatten_spatial(input, padding_mask, channels_last, "group_norm")
    return x.restore(
        torch.ops.masknorm.group_norm(x.input, x.padding_mask, weight, bias, num_groups, eps, x.channels_last)[0]
    )


def instance_norm(
    input: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    padding_mask: Optional[Tensor] = None,
    channels_last: bool = False,
) -> Tensor:
    """Instance norm of each sample and channel over its valid positions.

    ``input`` is (N, C, *spatial), or (N, *spatial, C) with
    ``channels_last=True``; ``padding_mask`` as for :func:`batch_norm`.
    With ``use_input_stats`` each (sample, channel) is normalized with its own
    statistics (``torch.ops.masknorm.instance_norm``), and
    ``running_mean``/``running_var``, when given, move by ``momentum`` towards
    the average over samples of their means and unbiased variances (samples
    with fewer than 2 valid positions left out). Without, the running
    statistics normalize (``torch.ops.masknorm.batch_norm`` in eval). A
    jagged NestedTensor (N, j, C) is normalized sequence by sequence.
    """
    if not use_input_stats:
        return batch_norm(
            input, running_mean, running_var, weight, bias, False, momentum, eps, padding_mask=padding_mask,
            channels_last=channels_last,
        )
    if _layouts.is_jagged(input):
        def norm(padded: Tensor, mask: Tensor) -> Tensor:
            return torch.ops.masknorm.instance_norm(
                padded, mask, weight, bias, running_mean, running_var, momentum, eps, True
            )[0]

        return _layouts.per_sequence(input, padding_mask, "instance_norm", norm)
    x = _layouts.flatten_spatial(input, padding_mask, channels_last, "instance_norm")
    return x.restore(
        torch.ops.masknorm.instance_norm(
            x.input, x.padding_mask, weight, bias, running_mean, running_var, momentum, eps, x.channels_last
        )[0]
    )
