"""MaskedSyncBatchNorm: masked batch norm with its batch statistics computed
over every rank of a process group (torch.distributed), as nn.SyncBatchNorm
does for nn.BatchNorm1d/2d/3d, skipping padding. Input of higher rank is
flattened to (N, C, L) or (N, L, C) first (_layouts.flatten_spatial, as the
functional batch norm does), outside the autograd Function.

Built from the batch-norm stage ops (csrc/ops/batch_norm.cpp), in the shape of
torch's own SyncBatchNorm (torch/nn/modules/_functions.py):

    forward:  batch_norm_stats (local masked mean, M2, count)
              -> one all_gather of the packed (mean, m2, count) of every rank
              -> batch_norm_merge_stats (Chan's merge; ranks with count 0 are
                 skipped in the kernel; running statistics updated)
              -> batch_norm_elemt
    backward: batch_norm_backward_reduce (local sum(dy), sum(dy * xhat))
              -> one all_reduce of the two sums
              -> batch_norm_backward_elemt with the global valid count

Weight and bias gradients are the local sums, left to DDP's gradient
averaging as nn.SyncBatchNorm leaves them.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from . import _layouts
from . import padding_context as _padding
from ._ops import _opmath_dtype
from ._replace import replace_modules, uses_forward_of
from .modules import MaskedBatchNorm1d, MaskedBatchNorm2d, MaskedBatchNorm3d

try:  # torch builds without distributed support have no ProcessGroup
    from torch.distributed import ProcessGroup
except ImportError:  # pragma: no cover
    ProcessGroup = Any  # type: ignore[misc,assignment]

__all__ = ["MaskedSyncBatchNorm"]

_NAME = "MaskedSyncBatchNorm"


def _gathers_into_tensor(group: ProcessGroup) -> bool:
    """Whether to use all_gather_into_tensor (one output buffer, NCCL's fast
    path) rather than all_gather into a list: gloo lacks it in older torch."""
    return dist.get_backend(group) != "gloo"


def _all_gather(packed: Tensor, group: ProcessGroup, world_size: int) -> Tensor:
    """(world_size, packed.numel()): every rank's 1-D ``packed``, in rank order. One collective."""
    if _gathers_into_tensor(group):
        out = packed.new_empty(world_size * packed.numel())
        dist.all_gather_into_tensor(out, packed, group=group)
        return out.view(world_size, packed.numel())
    parts = [torch.empty_like(packed) for _ in range(world_size)]
    dist.all_gather(parts, packed, group=group)
    return torch.stack(parts)


class _MaskedSyncBatchNormFunction(torch.autograd.Function):
    """Training-mode synchronized masked batch norm (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        input: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        padding_mask: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        num_batches_tracked: Optional[Tensor],
        momentum: Optional[float],
        eps: float,
        channels_last: bool,
        num_features: int,
        group: ProcessGroup,
        world_size: int,
        input_error: Optional[Exception],
    ) -> Tensor:
        C = num_features
        # Local statistics. An error here (bad input on this rank), or one
        # found before (`input_error`: flattening the input and its mask),
        # must not leave the other ranks waiting in the all_gather: this rank
        # sends a count of -1 instead, raises its own error after the
        # exchange, and the others raise too (below).
        error: Optional[Exception] = None
        try:
            if input_error is not None:
                raise input_error
            if input.dim() not in (2, 3):
                raise ValueError(f"{_NAME}: expected 2D or 3D input after flattening (got {input.dim()}D input)")
            channels = input.shape[-1] if channels_last and input.dim() == 3 else input.shape[1]
            if channels != C:
                raise ValueError(
                    f"{_NAME}: expected input with {C} channels (num_features), but got {channels} "
                    f"(input shape {tuple(input.shape)}, channels_last={channels_last})"
                )
            mean, m2, count = torch.ops.masknorm.batch_norm_stats(input, padding_mask, channels_last)
            # count as a float in the statistics dtype: exact up to 2**24 valid positions per rank in float32
            packed = torch.cat([mean, m2, count.to(mean.dtype).reshape(1)])
        except Exception as e:  # noqa: BLE001  (re-raised after the exchange)
            error = e
            packed = torch.zeros(2 * C + 1, dtype=_opmath_dtype(input.dtype), device=input.device)
            packed[-1] = -1

        gathered = _all_gather(packed, group, world_size)
        if error is not None:
            raise error

        mean_all, m2_all, count_all = gathered[:, :C], gathered[:, C : 2 * C], gathered[:, 2 * C]
        # A rank that failed sent count -1. Without reading that on the host
        # (no device sync), the counts are replaced by a global count of 1, so
        # that the merge op's own host check raises; only then is the flag read,
        # to say what happened. Ranks with count 0 are skipped by the merge op.
        failed = count_all < 0
        any_failed = failed.any()
        count_one = torch.zeros_like(count_all)
        count_one[0] = 1
        counts = torch.where(any_failed, count_one, count_all.clamp_min(0))
        try:
            mean, invstd, total = torch.ops.masknorm.batch_norm_merge_stats(
                mean_all, m2_all, counts, running_mean, running_var, num_batches_tracked, momentum, eps
            )
        except ValueError:
            if bool(any_failed):
                ranks = [dist.get_global_rank(group, r) for r in failed.nonzero().flatten().tolist()]
                raise RuntimeError(
                    f"{_NAME}: the forward failed on rank(s) {ranks} before the statistics exchange "
                    "(see the error raised there)"
                ) from None
            raise

        ctx.save_for_backward(input, padding_mask, weight, mean, invstd, total)
        ctx.channels_last = channels_last
        ctx.group = group
        ctx.num_features = C
        ctx.bias_dtype = None if bias is None else bias.dtype
        return torch.ops.masknorm.batch_norm_elemt(input, padding_mask, weight, bias, mean, invstd, channels_last)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> Tuple[Optional[Tensor], ...]:  # type: ignore[override]
        input, padding_mask, weight, mean, invstd, total = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        if need_input or need_weight or need_bias:
            sum_dy, sum_dy_xhat = torch.ops.masknorm.batch_norm_backward_reduce(
                grad_output, input, padding_mask, mean, invstd, ctx.channels_last
            )
            if need_weight:
                grad_weight = sum_dy_xhat.to(weight.dtype)
            if need_bias:
                grad_bias = sum_dy.to(ctx.bias_dtype)
            if need_input:
                # Every rank's input needs a gradient or none does (the same
                # program on every rank), so every rank takes part.
                combined = torch.cat([sum_dy, sum_dy_xhat])
                dist.all_reduce(combined, dist.ReduceOp.SUM, group=ctx.group)
                sum_dy, sum_dy_xhat = combined.split(ctx.num_features)
                grad_input = torch.ops.masknorm.batch_norm_backward_elemt(
                    grad_output, input, padding_mask, weight, mean, invstd, sum_dy, sum_dy_xhat, total,
                    ctx.channels_last,
                )
        return (grad_input, grad_weight, grad_bias) + (None,) * 11


class MaskedSyncBatchNorm(MaskedBatchNorm1d):
    """Masked batch norm whose batch statistics cover every rank of a process
    group: padding-aware ``nn.SyncBatchNorm`` for (N, C) and (N, C, *spatial)
    input (in either memory format, as :class:`MaskedBatchNorm2d` and
    :class:`MaskedBatchNorm3d` take it), or (N, *spatial, C) with
    ``channels_last=True``, or a jagged NestedTensor (N, j, C) (statistics
    over every rank's tokens).

    In training, every rank's outputs, input gradients and running statistics
    are those of :class:`MaskedBatchNorm1d` (:class:`MaskedBatchNorm2d`,
    :class:`MaskedBatchNorm3d` for 4-D and 5-D input) applied to the
    concatenation of every rank's batch (valid positions only; ranks may have
    different batch sizes and lengths, all padding, or ``N = 0``; 4-D and 5-D
    ranks share C and may differ in every spatial size). Weight and bias
    gradients are each rank's share of that batch's gradients; DDP's gradient
    averaging then gives the concatenated batch's gradients divided by the
    world size, as with ``nn.SyncBatchNorm``. When every rank is all padding, the output
    is zeros, the parameter gradients are zero and the running statistics are
    left alone (``num_batches_tracked`` still counts the batch). A global
    count of one valid value raises the same ``ValueError`` on every rank.

    Communication, on ``process_group`` (default: the whole world), in
    training only: forward, one all_gather of each rank's masked
    ``(mean, M2, count)`` (2C + 1 numbers in the statistics dtype, float32, or
    float64 for float64 input; the count is exact up to 2**24 valid positions
    per rank in float32); backward, one all_reduce of ``(sum(dy),
    sum(dy * xhat))`` over the valid positions. Ranks with no valid position
    are skipped inside the merge op, without a host sync. The first synced
    forward of a module on a group also all_gathers ``num_features`` (one
    extra small collective, once), so that a mismatch across ranks raises a
    clear ``ValueError`` on every rank instead of a collective of mismatched
    sizes. An error in a rank's input (wrong shape or channel count) raises
    there and a ``RuntimeError`` on the others (they learn of it through the
    merge op's host check of the count). That check runs on CPU tensors, and
    on accelerators only with :func:`masknorm.enable_device_data_checks`:
    without it (and always under CUDA graph capture) the other ranks carry on
    and the failing rank's missing collective ends in the process group's
    timeout.

    Without an initialized process group, with a group of one rank, or in
    eval mode, it computes exactly what :class:`MaskedBatchNorm1d` computes
    and does not communicate. All ranks must call it the same number of times
    in training, with inputs of the same dtype kind (float64 or not), as for
    ``nn.SyncBatchNorm``. Double backward is not supported.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device,
            dtype, bias, channels_last: as :class:`MaskedBatchNorm1d`.
        process_group: the group whose ranks share statistics (every rank
            must call ``torch.distributed.new_group`` for it); ``None`` is the
            default (world) group.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[ProcessGroup] = None,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            channels_last=channels_last, bias=bias,
        )
        self.process_group = process_group
        # id of the group whose ranks were checked to agree on num_features
        self._checked_group: Optional[int] = None

    def _sync_group(self) -> Optional[Tuple[ProcessGroup, int]]:
        """(group, world size) when this forward synchronizes, else None."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        world_size = dist.get_world_size(group)
        if world_size < 0:
            raise ValueError(
                f"{_NAME}: this process (global rank {dist.get_rank()}) is not a member of process_group"
            )
        return (group, world_size) if world_size > 1 else None

    def _check_input_dim(self, input: Tensor) -> None:
        """Any rank from 2 on, as nn.SyncBatchNorm takes."""
        if input.dim() < 2:
            raise ValueError(f"{_NAME}: expected at least 2D input (got {input.dim()}D input)")

    def _check_num_features(self, group: ProcessGroup, world_size: int, device: torch.device) -> None:
        """Once per group: every rank's num_features, gathered, must agree."""
        if self._checked_group == id(group):
            return
        mine = torch.tensor([self.num_features], dtype=torch.int64, device=device)
        sizes = _all_gather(mine, group, world_size).flatten().tolist()
        if len(set(sizes)) != 1:
            raise ValueError(
                f"{_NAME}: num_features differs across the ranks of process_group: {sizes} (in rank order); "
                "every rank's module must have the same num_features"
            )
        self._checked_group = id(group)

    def forward(self, input: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Normalizes ``input`` with the statistics of the valid positions of
        every rank's batch (training) or with the running statistics (eval);
        ``padding_mask`` (bool, True at padding) is (N,) for (N, C) input and
        (N, *spatial) for higher ranks, or covers only the trailing spatial
        dims (an (N, T) time mask of (N, C, F, T) input), broadcast. Padded
        outputs are 0."""
        padding_mask = _padding.mask_for(self, input, padding_mask)
        sync = self._sync_group()
        if sync is None:
            return super().forward(input, padding_mask)
        group, world_size = sync
        self._check_num_features(group, world_size, input.device)
        # (N, C, *spatial) as (N, C, L) or, in channels-last memory, (N, L, C),
        # and a jagged (N, j, C) as its tokens (T, C): views whose gradients
        # autograd carries back. A bad mask raises after the statistics
        # exchange, inside the Function, as its other input errors do.
        input_error: Optional[Exception] = None
        try:
            self._check_input_dim(input)
            if _layouts.is_jagged(input):
                layout = _layouts.jagged_tokens(input, padding_mask, "batch_norm")
            else:
                layout = _layouts.flatten_spatial(input, padding_mask, self.channels_last, "batch_norm")
        except Exception as e:  # noqa: BLE001  (raised after the exchange)
            input_error = e
            layout = _layouts.OpLayout(input, padding_mask, self.channels_last, _layouts.identity)
        track = self.track_running_stats
        return layout.restore(_MaskedSyncBatchNormFunction.apply(
            layout.input,
            self.weight,
            self.bias,
            layout.padding_mask,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.num_batches_tracked if track else None,
            self.momentum,
            self.eps,
            layout.channels_last,
            self.num_features,
            group,
            world_size,
            input_error,
        ))

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: Optional[ProcessGroup] = None
    ) -> torch.nn.Module:
        """Replaces every batch norm in ``module`` with a
        :class:`MaskedSyncBatchNorm` on ``process_group``, as
        ``nn.SyncBatchNorm.convert_sync_batchnorm`` does.

        Converted: ``nn.BatchNorm1d``, ``nn.BatchNorm2d``, ``nn.BatchNorm3d``
        and ``nn.SyncBatchNorm`` (to ``channels_last=False``: the same
        channels-first input, in either memory format),
        :class:`MaskedBatchNorm1d` (keeping ``channels_last``),
        :class:`MaskedBatchNorm2d`, :class:`MaskedBatchNorm3d` and
        ``MaskedSyncBatchNorm`` (moved to ``process_group``). Subclasses with
        their own ``forward`` and modules parametrized with
        ``torch.nn.utils.parametrize`` are left alone.

        As :func:`masknorm.convert_model`, the new modules take over the old
        ones' ``Parameter`` objects (an optimizer built before keeps training
        them), buffers, train/eval mode, hooks and other attributes; returns
        ``module`` converted in place, or the new module when ``module``
        itself is converted.
        """
        return replace_modules(module, lambda m: sync_counterpart(m, process_group))


def sync_counterpart(module: torch.nn.Module, process_group: Optional[ProcessGroup]) -> Optional[MaskedSyncBatchNorm]:
    """The MaskedSyncBatchNorm that replaces ``module`` (with its
    hyperparameters and ``channels_last``), or None when ``module`` is not a
    batch norm that convert_sync_batchnorm converts."""
    bases = (
        torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
        MaskedBatchNorm1d, MaskedBatchNorm2d, MaskedBatchNorm3d, MaskedSyncBatchNorm,
    )
    if not uses_forward_of(module, *bases):
        return None
    return MaskedSyncBatchNorm(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        process_group,
        channels_last=getattr(module, "channels_last", False),
        bias=module.bias is not None or not module.affine,
    )
