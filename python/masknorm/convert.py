"""Switching an existing model to the masked norms in one line."""
from __future__ import annotations

from typing import Optional

from torch import nn

from . import padding_context as _padding
from ._replace import replace_modules, uses_forward_of
from .distributed import ProcessGroup, sync_counterpart
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

__all__ = ["convert_model"]


def _masked_counterpart(
    module: nn.Module,
    batch_norm: bool,
    layer_norm: bool,
    rms_norm: bool,
    group_norm: bool,
    instance_norm: bool,
    sync: bool,
    process_group: Optional[ProcessGroup],
) -> Optional[nn.Module]:
    """A masked module with module's hyperparameters, or None to keep module."""
    if batch_norm and sync:
        new = sync_counterpart(module, process_group)
        if new is not None:
            return new
    if batch_norm and uses_forward_of(module, nn.BatchNorm1d):
        kwargs = {} if module.bias is not None or not module.affine else {"bias": False}
        return MaskedBatchNorm1d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            channels_last=False,
            **kwargs,
        )
    # bias=False is passed only for a weight without bias (older torch has no such argument)
    without_bias = {} if getattr(module, "bias", None) is not None or not getattr(module, "affine", True) else {
        "bias": False}
    # the norms whose constructors take torch's (num_features, eps, momentum, affine, track_running_stats)
    for wanted, torch_cls, masked_cls in (
        (batch_norm, nn.BatchNorm2d, MaskedBatchNorm2d), (batch_norm, nn.BatchNorm3d, MaskedBatchNorm3d),
        (instance_norm, nn.InstanceNorm1d, MaskedInstanceNorm1d),
        (instance_norm, nn.InstanceNorm2d, MaskedInstanceNorm2d),
        (instance_norm, nn.InstanceNorm3d, MaskedInstanceNorm3d),
    ):
        if wanted and uses_forward_of(module, torch_cls):
            return masked_cls(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                **without_bias,
            )
    if group_norm and uses_forward_of(module, nn.GroupNorm):
        return MaskedGroupNorm(module.num_groups, module.num_channels, module.eps, module.affine, **without_bias)
    if layer_norm and uses_forward_of(module, nn.LayerNorm):
        return MaskedLayerNorm(
            module.normalized_shape, module.eps, module.elementwise_affine, bias=module.bias is not None
        )
    if rms_norm and uses_forward_of(module, nn.RMSNorm):
        return MaskedRMSNorm(module.normalized_shape, module.eps, module.elementwise_affine)
    return None


def convert_model(
    module: nn.Module,
    *,
    batch_norm: bool = True,
    layer_norm: bool = True,
    rms_norm: bool = True,
    group_norm: bool = True,
    instance_norm: bool = True,
    sync_batch_norm: bool = False,
    process_group: Optional[ProcessGroup] = None,
    convolutions: bool = True,
) -> nn.Module:
    """Replaces every ``nn.BatchNorm1d/2d/3d``, ``nn.LayerNorm``, ``nn.RMSNorm``,
    ``nn.GroupNorm`` and ``nn.InstanceNorm1d/2d/3d`` in ``module`` with its masked
    counterpart, as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does for
    SyncBatchNorm.

    Args:
        module: a model, or a single norm module.
        batch_norm: convert ``nn.BatchNorm1d`` to :class:`MaskedBatchNorm1d`
            (``channels_last=False``: the same ``(N, C)`` / ``(N, C, L)`` input
            as before), ``nn.BatchNorm2d``/``3d`` to
            :class:`MaskedBatchNorm2d`/``3d``.
        layer_norm: convert ``nn.LayerNorm`` to :class:`MaskedLayerNorm`.
        rms_norm: convert ``nn.RMSNorm`` to :class:`MaskedRMSNorm`.
        group_norm: convert ``nn.GroupNorm`` to :class:`MaskedGroupNorm`
            (channels first, as before).
        instance_norm: convert ``nn.InstanceNorm1d/2d/3d`` to
            :class:`MaskedInstanceNorm1d`/``2d``/``3d`` (channels first, as
            before).
        sync_batch_norm: convert batch norms to :class:`MaskedSyncBatchNorm`
            (statistics shared by the ranks of ``process_group``) instead:
            ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and the masked
            batch norms, as :meth:`MaskedSyncBatchNorm.convert_sync_batchnorm`
            does. Needs ``batch_norm=True``.
        process_group: the group for ``sync_batch_norm`` (default: the world).
        convolutions: hook ``nn.Conv1d`` and ``nn.ConvTranspose1d`` for
            :func:`masknorm.padding` (a forward pre-hook that carries lengths
            through them and zeroes padded input frames inside the context,
            and returns at once outside it).

    Returns:
        ``module``, converted in place; when ``module`` itself is a norm that
        gets converted, the new masked module instead.

    The masked modules take over the original modules' state: the same
    ``Parameter`` objects (so an optimizer built before the conversion keeps
    training them) and buffer tensors (running statistics,
    ``num_batches_tracked``), hence the same device, dtype and
    ``requires_grad``; also the train/eval mode, hooks and other instance
    attributes. ``state_dict`` keys do not change. Subclasses with their own
    ``forward`` (masked modules among them) and modules parametrized with
    ``torch.nn.utils.parametrize`` are left as they are, and a module shared
    by several parents stays shared.

    Without a mask the converted modules compute what the originals computed.
    They skip padding when given ``padding_mask`` (bool, True marks padding),
    e.g. ``self.norm(x, padding_mask=src_key_padding_mask)``, or, with no
    edit to the model's code, inside ``with masknorm.padding(lengths=...)``.

    Example::

        >>> model = masknorm.convert_model(model)
        >>> optimizer = torch.optim.AdamW(model.parameters())
        >>> # data parallel: batch statistics over every rank's valid tokens
        >>> model = masknorm.convert_model(model, sync_batch_norm=True)
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """
    if sync_batch_norm and not batch_norm:
        raise ValueError("convert_model: sync_batch_norm=True converts batch norms, so it needs batch_norm=True")
    if process_group is not None and not sync_batch_norm:
        raise ValueError("convert_model: process_group is for sync_batch_norm=True, but sync_batch_norm is False")
    flags = (batch_norm, layer_norm, rms_norm, group_norm, instance_norm, sync_batch_norm, process_group)
    converted = replace_modules(module, lambda m: _masked_counterpart(m, *flags))
    return _padding.track_convolutions(converted) if convolutions else converted
