"""Fake (meta) kernels for the masknorm ops, so torch.compile and torch.export
can trace them. Shapes and dtypes only; the kernels live in csrc/.

Saved statistics are in the accumulation dtype: float32 for float16,
bfloat16 and float32 inputs, float64 for float64.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor


def _check_devices(op: str, input: Tensor, **tensors: Optional[Tensor]) -> None:
    # The C++ kernels check devices, but a tensor on the meta device routes the
    # whole call here, so the same check must run here too.
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"masknorm::{op}: expected {name} on input's device {input.device}, but got {t.device}"
            )


def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channels(input: Tensor, channels_last: bool) -> int:
    return input.shape[2] if (channels_last and input.dim() == 3) else input.shape[1]


def _leading(input: Tensor, normalized_shape: Sequence[int]) -> List[int]:
    return list(input.shape[: input.dim() - len(normalized_shape)])


def _param_grad(weight: Optional[Tensor], input: Tensor, shape, wanted: bool) -> Optional[Tensor]:
    if not wanted:
        return None
    dtype = weight.dtype if weight is not None else input.dtype
    return input.new_empty(shape, dtype=dtype)


@torch.library.register_fake("masknorm::batch_norm")
def _batch_norm_fake(input, padding_mask, weight, bias, running_mean, running_var, training, eps, channels_last):
    _check_devices("batch_norm", input, padding_mask=padding_mask, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    C = _channels(input, channels_last)
    stat = input.new_empty((C,), dtype=_opmath_dtype(input.dtype))
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        stat,
        torch.empty_like(stat),
        input.new_empty((), dtype=torch.int64),
    )


@torch.library.register_fake("masknorm::batch_norm_backward")
def _batch_norm_backward_fake(
    grad_output, input, padding_mask, weight, save_mean, save_invstd, training, channels_last, output_mask
):
    _check_devices("batch_norm_backward", input, grad_output=grad_output, padding_mask=padding_mask, weight=weight, save_mean=save_mean, save_invstd=save_invstd)
    C = _channels(input, channels_last)
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else None,
        _param_grad(weight, input, (C,), output_mask[1]),
        _param_grad(weight, input, (C,), output_mask[2]),
    )


@torch.library.register_fake("masknorm::batch_norm_update_running_stats")
def _batch_norm_update_running_stats_fake(
    running_mean, running_var, save_mean, save_invstd, count, eps, momentum, num_batches_tracked
):
    _check_devices("batch_norm_update_running_stats", save_mean, running_mean=running_mean, running_var=running_var, save_invstd=save_invstd)
    return None


@torch.library.register_fake("masknorm::layer_norm")
def _layer_norm_fake(input, normalized_shape, padding_mask, weight, bias, eps):
    _check_devices("layer_norm", input, padding_mask=padding_mask, weight=weight, bias=bias)
    stat = input.new_empty(_leading(input, normalized_shape), dtype=_opmath_dtype(input.dtype))
    return torch.empty_like(input, memory_format=torch.contiguous_format), stat, torch.empty_like(stat)


@torch.library.register_fake("masknorm::layer_norm_backward")
def _layer_norm_backward_fake(grad_output, input, normalized_shape, padding_mask, mean, rstd, weight, output_mask):
    _check_devices("layer_norm_backward", input, grad_output=grad_output, padding_mask=padding_mask, mean=mean, rstd=rstd, weight=weight)
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else None,
        _param_grad(weight, input, tuple(normalized_shape), output_mask[1]),
        _param_grad(weight, input, tuple(normalized_shape), output_mask[2]),
    )


@torch.library.register_fake("masknorm::rms_norm")
def _rms_norm_fake(input, normalized_shape, padding_mask, weight, eps):
    _check_devices("rms_norm", input, padding_mask=padding_mask, weight=weight)
    rstd = input.new_empty(_leading(input, normalized_shape), dtype=_opmath_dtype(input.dtype))
    return torch.empty_like(input, memory_format=torch.contiguous_format), rstd


@torch.library.register_fake("masknorm::rms_norm_backward")
def _rms_norm_backward_fake(grad_output, input, normalized_shape, padding_mask, rstd, weight, output_mask):
    _check_devices("rms_norm_backward", input, grad_output=grad_output, padding_mask=padding_mask, rstd=rstd, weight=weight)
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else None,
        _param_grad(weight, input, tuple(normalized_shape), output_mask[1]),
    )
