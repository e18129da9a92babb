"""Fake kernels for the masknorm ops, so torch.compile and torch.export can
trace them (and tensors on the meta device run them). They check shapes,
dtypes and devices with ``torch._check`` as the C++ checks do
(csrc/ops/checks.cpp; symbolic sizes become guards) and return empty tensors
of the real results' shapes and dtypes.

Saved statistics are in the accumulation dtype: float32 for float16,
bfloat16 and float32 inputs, float64 for float64.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor


def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of ``dtype`` input, as the C++ opmath_dtype
    (csrc/ops/tensor_utils.h) and distributed.py use it."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_input(op: str, input: Tensor, min_dim: int) -> None:
    torch._check(
        input.dtype.is_floating_point,
        lambda: f"masknorm::{op}: expected input to be a floating-point tensor (float32, float64, bfloat16 "
        f"or float16), but got {input.dtype}",
    )
    torch._check(
        input.dim() >= min_dim,
        lambda: f"masknorm::{op}: expected input to have at least {min_dim} dimensions, but got {input.dim()} "
        f"(shape {tuple(input.shape)})",
    )


def _check_shape(op: str, name: str, t: Tensor, shape: Sequence, like: Tensor, what: str = "") -> None:
    torch._check(
        t.device == like.device,
        lambda: f"masknorm::{op}: expected {name} on input's device {like.device}, but got {t.device}",
    )
    torch._check(
        t.dim() == len(shape),
        lambda: f"masknorm::{op}: expected {name} of shape {tuple(shape)}{what}, but got {tuple(t.shape)}",
    )
    for have, want in zip(t.shape, shape):
        torch._check(
            have == want,
            lambda: f"masknorm::{op}: expected {name} of shape {tuple(shape)}{what}, but got {tuple(t.shape)}",
        )


def _check_mask(op: str, mask: Optional[Tensor], shape: Sequence, input: Tensor, rule: str) -> None:
    if mask is None:
        return
    torch._check(
        mask.dtype == torch.bool,
        lambda: f"masknorm::{op}: expected padding_mask to be a bool tensor (True marks padding), but got dtype "
        f"{mask.dtype}",
    )
    _check_shape(op, "padding_mask", mask, shape, input, f" ({rule}, input shape {tuple(input.shape)})")


def _check_features(op: str, shape: Sequence, like: Tensor, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        torch._check(
            t.dtype.is_floating_point,
            lambda: f"masknorm::{op}: expected {name} to be a floating-point tensor, but got {t.dtype}",
        )
        _check_shape(op, name, t, shape, like, f" (input shape {tuple(like.shape)})")


def _check_grad_output(op: str, grad_output: Tensor, input: Tensor) -> None:
    torch._check(
        grad_output.dtype.is_floating_point,
        lambda: f"masknorm::{op}: expected grad_output to be a floating-point tensor, but got {grad_output.dtype}",
    )
    _check_shape(op, "grad_output", grad_output, input.shape, input, " (input's shape)")


def _param_grad(weight: Optional[Tensor], input: Tensor, shape, wanted: bool) -> Optional[Tensor]:
    if not wanted:
        return None
    dtype = weight.dtype if weight is not None else input.dtype
    return input.new_empty(shape, dtype=dtype)


# ------------------------------------------------------------------ batch norm


def _check_batch_norm(op: str, input: Tensor, padding_mask: Optional[Tensor], channels_last: bool, **per_channel):
    """The checks of check_batch_norm_args; returns the channel count."""
    _check_input(op, input, 2)
    torch._check(
        input.dim() <= 3,
        lambda: f"masknorm::{op}: expected 2-D (N, C) or 3-D {'(N, L, C)' if channels_last else '(N, C, L)'} "
        f"input, but got {input.dim()}-D input of shape {tuple(input.shape)}",
    )
    if input.dim() == 2:
        _check_mask(op, padding_mask, (input.shape[0],), input, "(N,) for 2-D input")
        C = input.shape[1]
    else:
        L = input.shape[1] if channels_last else input.shape[2]
        _check_mask(op, padding_mask, (input.shape[0], L), input, "(N, L) for 3-D input")
        C = input.shape[2] if channels_last else input.shape[1]
    _check_features(op, (C,), input, **per_channel)
    return C


def _check_count(op: str, name: str, count: Tensor, shape: Sequence, like: Tensor) -> None:
    torch._check(
        not count.dtype.is_complex and count.dtype != torch.bool,
        lambda: f"masknorm::{op}: expected {name} to be an integer or floating-point tensor, but got {count.dtype}",
    )
    _check_shape(op, name, count, shape, like)


def _check_running_stats(
    op: str, running_mean: Optional[Tensor], running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
    like: Tensor,
) -> None:
    """running_mean and running_var given together; num_batches_tracked checked
    whenever given: a meta num_batches_tracked with CPU input sends the real
    call here, which must then raise rather than return uninitialized outputs."""
    torch._check(
        (running_mean is None) == (running_var is None),
        lambda: f"masknorm::{op}: expected running_mean and running_var both given or both None, but got only "
        f"{'running_var' if running_mean is None else 'running_mean'}",
    )
    if num_batches_tracked is None:
        return
    torch._check(
        num_batches_tracked.numel() == 1 and num_batches_tracked.dtype == torch.int64,
        lambda: f"masknorm::{op}: expected num_batches_tracked to be a one-element int64 tensor, but got dtype "
        f"{num_batches_tracked.dtype} and shape {tuple(num_batches_tracked.shape)}",
    )
    torch._check(
        num_batches_tracked.device == like.device,
        lambda: f"masknorm::{op}: expected num_batches_tracked on input's device {like.device}, but got "
        f"{num_batches_tracked.device}",
    )


def _check_running_stats_update(
    op: str, running_mean: Optional[Tensor], num_batches_tracked: Optional[Tensor], momentum: Optional[float]
) -> None:
    """Where running statistics are given and updated: momentum in [0, 1], or
    None with num_batches_tracked (the cumulative average)."""
    if running_mean is None:
        return
    if momentum is not None:
        torch._check_value(
            0.0 <= momentum <= 1.0, lambda: f"masknorm::{op}: expected momentum in [0, 1] or None, but got {momentum}"
        )
    else:
        torch._check_value(
            num_batches_tracked is not None,
            lambda: f"masknorm::{op}: momentum=None (cumulative moving average) needs num_batches_tracked, but got None",
        )


def _check_eps(op: str, eps: float, what: str, positive: bool = True) -> None:
    ok = math.isfinite(eps) and (eps > 0 if positive else eps >= 0)
    torch._check_value(
        ok,
        lambda: f"masknorm::{op}: expected eps to be finite and {'>' if positive else '>='} 0{' ' if what else ''}{what}, "
        f"but got {eps}",
    )


@torch.library.register_fake("masknorm::batch_norm")
def _batch_norm_fake(
    input, padding_mask, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
    channels_last,
):
    op = "batch_norm"
    C = _check_batch_norm(
        op, input, padding_mask, channels_last, weight=weight, bias=bias, running_mean=running_mean,
        running_var=running_var,
    )
    _check_running_stats(op, running_mean, running_var, num_batches_tracked, input)
    if training:
        _check_eps(op, eps, "when training")
        _check_running_stats_update(op, running_mean, num_batches_tracked, momentum)
    else:
        _check_eps(op, eps, "in eval", positive=False)
        torch._check(
            running_mean is not None,
            lambda: f"masknorm::{op}: expected running_mean and running_var when training=False, but got None",
        )
    stat = input.new_empty((C,), dtype=_opmath_dtype(input.dtype))
    return torch.empty_like(input, memory_format=torch.contiguous_format), stat, torch.empty_like(stat)


@torch.library.register_fake("masknorm::batch_norm_backward")
def _batch_norm_backward_fake(
    grad_output, input, padding_mask, weight, save_mean, save_invstd, training, channels_last, output_mask
):
    op = "batch_norm_backward"
    C = _check_batch_norm(
        op, input, padding_mask, channels_last, weight=weight, save_mean=save_mean, save_invstd=save_invstd
    )
    _check_grad_output(op, grad_output, input)
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else None,
        _param_grad(weight, input, (C,), output_mask[1]),
        _param_grad(weight, input, (C,), output_mask[2]),
    )


@torch.library.register_fake("masknorm::batch_norm_stats")
def _batch_norm_stats_fake(input, padding_mask, channels_last):
    C = _check_batch_norm("batch_norm_stats", input, padding_mask, channels_last)
    stat = input.new_empty((C,), dtype=_opmath_dtype(input.dtype))
    return stat, torch.empty_like(stat), input.new_empty((), dtype=torch.int64)


@torch.library.register_fake("masknorm::batch_norm_merge_stats")
def _batch_norm_merge_stats_fake(mean, m2, count, running_mean, running_var, num_batches_tracked, momentum, eps):
    op = "batch_norm_merge_stats"
    torch._check(
        mean.dim() == 2 and mean.dtype in (torch.float32, torch.float64),
        lambda: f"masknorm::{op}: expected mean to be a (parts, C) float32 or float64 tensor, but got dtype "
        f"{mean.dtype} and shape {tuple(mean.shape)}",
    )
    torch._check(
        m2.dtype.is_floating_point,
        lambda: f"masknorm::{op}: expected m2 to be a floating-point tensor, but got {m2.dtype}",
    )
    _check_shape(op, "m2", m2, mean.shape, mean, " (mean's shape)")
    _check_count(op, "count", count, (mean.shape[0],), mean)
    _check_features(op, (mean.shape[1],), mean, running_mean=running_mean, running_var=running_var)
    _check_eps(op, eps, "")
    _check_running_stats(op, running_mean, running_var, num_batches_tracked, mean)
    _check_running_stats_update(op, running_mean, num_batches_tracked, momentum)
    stat = mean.new_empty((mean.shape[1],))
    return stat, torch.empty_like(stat), mean.new_empty((), dtype=torch.int64)


@torch.library.register_fake("masknorm::batch_norm_elemt")
def _batch_norm_elemt_fake(input, padding_mask, weight, bias, mean, invstd, channels_last):
    _check_batch_norm(
        "batch_norm_elemt", input, padding_mask, channels_last, weight=weight, bias=bias, mean=mean, invstd=invstd
    )
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("masknorm::batch_norm_backward_reduce")
def _batch_norm_backward_reduce_fake(grad_output, input, padding_mask, mean, invstd, channels_last):
    op = "batch_norm_backward_reduce"
    C = _check_batch_norm(op, input, padding_mask, channels_last, mean=mean, invstd=invstd)
    _check_grad_output(op, grad_output, input)
    stat = input.new_empty((C,), dtype=_opmath_dtype(input.dtype))
    return stat, torch.empty_like(stat)


@torch.library.register_fake("masknorm::batch_norm_backward_elemt")
def _batch_norm_backward_elemt_fake(
    grad_output, input, padding_mask, weight, mean, invstd, sum_dy, sum_dy_xhat, count, channels_last
):
    op = "batch_norm_backward_elemt"
    _check_batch_norm(
        op, input, padding_mask, channels_last, weight=weight, mean=mean, invstd=invstd, sum_dy=sum_dy,
        sum_dy_xhat=sum_dy_xhat,
    )
    _check_grad_output(op, grad_output, input)
    torch._check(
        (sum_dy is None) == (sum_dy_xhat is None) == (count is None),
        lambda: f"masknorm::{op}: expected sum_dy, sum_dy_xhat and count all given (batch statistics) or all None "
        "(given statistics)",
    )
    if count is not None:
        _check_count(op, "count", count, (), input)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


# ------------------------------------------------------------ layer / RMS norm


def _check_row_norm(op: str, input: Tensor, normalized_shape: Sequence[int], padding_mask, **features) -> List:
    """The checks of check_row_norm_args; returns the leading (per-row) shape."""
    _check_input(op, input, 1)
    k = len(normalized_shape)
    torch._check(
        k >= 1,
        lambda: f"masknorm::{op}: expected normalized_shape to have at least one dimension, but got {list(normalized_shape)}",
    )
    for s in normalized_shape:
        torch._check(
            s > 0, lambda: f"masknorm::{op}: expected normalized_shape of positive sizes, but got {list(normalized_shape)}"
        )
    torch._check(
        input.dim() >= k,
        lambda: f"masknorm::{op}: expected input with trailing dimensions normalized_shape={list(normalized_shape)}, "
        f"but got input of shape {tuple(input.shape)}",
    )
    for have, want in zip(input.shape[input.dim() - k:], normalized_shape):
        torch._check(
            have == want,
            lambda: f"masknorm::{op}: expected input with trailing dimensions normalized_shape={list(normalized_shape)}, "
            f"but got input of shape {tuple(input.shape)}",
        )
    leading = list(input.shape[: input.dim() - k])
    _check_mask(op, padding_mask, leading, input, "input.shape[:-len(normalized_shape)]")
    _check_features(op, tuple(normalized_shape), input, **features)
    return leading


@torch.library.register_fake("masknorm::layer_norm")
def _layer_norm_fake(input, normalized_shape, padding_mask, weight, bias, eps):
    leading = _check_row_norm("layer_norm", input, normalized_shape, padding_mask, weight=weight, bias=bias)
    _check_eps("layer_norm", eps, "", positive=False)
    stat = input.new_empty(leading, dtype=_opmath_dtype(input.dtype))
    return torch.empty_like(input, memory_format=torch.contiguous_format), stat, torch.empty_like(stat)


@torch.library.register_fake("masknorm::layer_norm_backward")
def _layer_norm_backward_fake(grad_output, input, normalized_shape, padding_mask, mean, rstd, weight, output_mask):
    op = "layer_norm_backward"
    leading = _check_row_norm(op, input, normalized_shape, padding_mask, weight=weight)
    _check_grad_output(op, grad_output, input)
    _check_features(op, leading, input, mean=mean, rstd=rstd)
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else None,
        _param_grad(weight, input, tuple(normalized_shape), output_mask[1]),
        _param_grad(weight, input, tuple(normalized_shape), output_mask[2]),
    )


@torch.library.register_fake("masknorm::rms_norm")
def _rms_norm_fake(input, normalized_shape, padding_mask, weight, eps):
    leading = _check_row_norm("rms_norm", input, normalized_shape, padding_mask, weight=weight)
    if eps is not None:
        _check_eps("rms_norm", eps, "", positive=False)
    rstd = input.new_empty(leading, dtype=_opmath_dtype(input.dtype))
    return torch.empty_like(input, memory_format=torch.contiguous_format), rstd


@torch.library.register_fake("masknorm::rms_norm_backward")
def _rms_norm_backward_fake(grad_output, input, normalized_shape, padding_mask, rstd, weight, output_mask):
    op = "rms_norm_backward"
    leading = _check_row_norm(op, input, normalized_shape, padding_mask, weight=weight)
    _check_grad_output(op, grad_output, input)
    _check_features(op, leading, input, rstd=rstd)
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else None,
        _param_grad(weight, input, tuple(normalized_shape), output_mask[1]),
    )


# ------------------------------------------------------ group / instance norm


def _check_group_norm(op: str, input: Tensor, padding_mask, num_groups: int, channels_last: bool, **per_channel):
    """The checks of check_group_norm_args; returns the channel count."""
    C = _check_batch_norm(op, input, padding_mask, channels_last, **per_channel)
    torch._check_value(num_groups > 0, lambda: f"masknorm::{op}: expected num_groups to be positive, but got {num_groups}")
    torch._check_value(
        C % num_groups == 0,
        lambda: f"masknorm::{op}: expected the number of channels ({C}, input shape {tuple(input.shape)}) to be "
        f"divisible by num_groups, but got num_groups={num_groups}",
    )
    return C


def _group_norm_outputs(input: Tensor, groups) -> tuple:
    stat = input.new_empty((input.shape[0], groups), dtype=_opmath_dtype(input.dtype))
    return torch.empty_like(input, memory_format=torch.contiguous_format), stat, torch.empty_like(stat)


@torch.library.register_fake("masknorm::group_norm")
def _group_norm_fake(input, padding_mask, weight, bias, num_groups, eps, channels_last):
    _check_group_norm("group_norm", input, padding_mask, num_groups, channels_last, weight=weight, bias=bias)
    _check_eps("group_norm", eps, "", positive=False)
    return _group_norm_outputs(input, num_groups)


@torch.library.register_fake("masknorm::group_norm_backward")
def _group_norm_backward_fake(
    grad_output, input, padding_mask, weight, mean, rstd, num_groups, channels_last, output_mask
):
    op = "group_norm_backward"
    C = _check_group_norm(op, input, padding_mask, num_groups, channels_last, weight=weight)
    _check_grad_output(op, grad_output, input)
    _check_features(op, (input.shape[0], num_groups), input, mean=mean, rstd=rstd)
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else None,
        _param_grad(weight, input, (C,), output_mask[1]),
        _param_grad(weight, input, (C,), output_mask[2]),
    )


@torch.library.register_fake("masknorm::instance_norm")
def _instance_norm_fake(input, padding_mask, weight, bias, running_mean, running_var, momentum, eps, channels_last):
    op = "instance_norm"
    C = _check_batch_norm(op, input, padding_mask, channels_last)
    if padding_mask is None:
        L = 1 if input.dim() == 2 else input.shape[1 if channels_last else 2]
        torch._check_value(
            L != 1 or input.numel() == 0,
            lambda: f"masknorm::{op}: expected more than 1 spatial element per sample, but got input of shape "
            f"{tuple(input.shape)}",
        )
    _check_group_norm(
        op, input, padding_mask, C, channels_last, weight=weight, bias=bias, running_mean=running_mean,
        running_var=running_var,
    )
    _check_running_stats(op, running_mean, running_var, None, input)
    _check_running_stats_update(op, running_mean, None, momentum)
    _check_eps(op, eps, "", positive=False)
    return _group_norm_outputs(input, C)
