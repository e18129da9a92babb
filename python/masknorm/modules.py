"""Drop-in masked versions of nn.BatchNorm1d/2d/3d, nn.LayerNorm, nn.RMSNorm,
nn.GroupNorm and nn.InstanceNorm1d/2d/3d.

Each subclasses the torch module it replaces, so parameters, buffers,
state_dict keys, initialisation, ``repr`` and ``isinstance`` checks are
torch's own; only ``forward`` changes, taking an optional ``padding_mask``
(bool, True marks padding, like ``src_key_padding_mask``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from . import _layouts
from . import padding_context as _padding
from . import functional as F
from .functional import _shape_t

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
]


def _state(module: nn.Module, name: str) -> Any:
    """``module.<name>`` for a parameter or buffer, read from the module's own
    dicts: plain attribute access finds neither and falls back to
    nn.Module.__getattr__, a sizeable part of a call on small inputs.
    Anything else (a parametrization's property, a plain attribute) goes
    through getattr as usual."""
    params = module._parameters
    if name in params:
        return params[name]
    buffers = module._buffers
    if name in buffers:
        return buffers[name]
    return getattr(module, name)


def _check_channels_first(input: Tensor, num_features: int, channels_last: bool, name: str) -> None:
    """(N, L, C) input given to a channels-first module: say so, and how to fix it
    (the op's own error names only the shapes)."""
    if (
        channels_last
        or _layouts.is_jagged(input)
        or input.dim() != 3
        or input.shape[1] == num_features
        or input.shape[2] != num_features
    ):
        return
    raise RuntimeError(
        f"{name}({num_features}): expected (N, C, L) input with C={num_features} at dim 1, but got shape "
        f"{list(input.shape)}, which looks like (N, L, C); for the transformer layout (N, L, C) pass "
        f"channels_last=True: {name}({num_features}, channels_last=True)"
    )


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d whose statistics skip padding.

    In training, the output at valid positions, the gradients and the running
    statistics are those of nn.BatchNorm1d applied to the packed valid tokens;
    padded positions output 0. ``channels_last=True`` takes (N, L, C) input,
    the transformer layout, without a transpose copy. A batch without valid
    positions leaves the running statistics untouched (num_batches_tracked
    still counts it, as torch counts an empty batch).

    Shapes: input (N, C) with padding_mask (N,), (N, C, L) with (N, L), or
    (N, L, C) with (N, L) when ``channels_last``.

    Arguments are nn.BatchNorm1d's (``bias=False``, a weight without bias,
    needs a torch whose nn.BatchNorm1d takes it), plus keyword-only
    ``channels_last``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        channels_last: bool = False,
        bias: bool = True,
    ) -> None:
        """Same arguments as nn.BatchNorm1d: ``num_features`` C; ``eps``;
        ``momentum`` (None: cumulative average); ``affine`` (learnable weight
        and bias); ``track_running_stats``; ``device``, ``dtype``; plus,
        keyword-only, ``channels_last`` (3-D input is (N, L, C), the
        transformer layout, instead of (N, C, L)) and ``bias`` (False: a
        weight without bias, where torch's nn.BatchNorm1d takes it)."""
        # bias is passed only when False: older torch versions have no such argument
        kwargs = {} if bias else {"bias": False}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.channels_last = channels_last

    def extra_repr(self) -> str:
        """torch's BatchNorm1d ``extra_repr``, plus ``channels_last=True`` when set."""
        return super().extra_repr() + (", channels_last=True" if self.channels_last else "")

    def forward(self, input: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Normalizes ``input``; ``padding_mask`` (bool, True at padding) is
        (N,) for (N, C) input and (N, L) for 3-D input. Without a mask, the
        result is nn.BatchNorm1d's. In training mode the running statistics are
        updated from the valid positions."""
        padding_mask = _padding.mask_for(self, input, padding_mask)
        self._check_input_dim(input)
        _check_channels_first(input, self.num_features, self.channels_last, type(self).__name__)
        return _batch_norm_forward(self, input, padding_mask, self.channels_last)


def _batch_norm_forward(module: nn.modules.batchnorm._BatchNorm, input: Tensor, padding_mask, channels_last: bool):
    """torch.nn.modules.batchnorm._BatchNorm.forward with a mask; the op
    increments num_batches_tracked and updates the running statistics."""
    training, track_running_stats = module.training, module.track_running_stats
    running_mean, running_var = _state(module, "running_mean"), _state(module, "running_var")
    use_batch_stats = training or (running_mean is None and running_var is None)
    keep_running = not training or track_running_stats
    return F.batch_norm(
        input,
        running_mean if keep_running else None,
        running_var if keep_running else None,
        _state(module, "weight"),
        _state(module, "bias"),
        use_batch_stats,
        module.momentum,
        module.eps,
        padding_mask=padding_mask,
        channels_last=channels_last,
        num_batches_tracked=_state(module, "num_batches_tracked") if training and track_running_stats else None,
    )


def _spatial_norm_init(torch_name: str, torch_init: Callable[..., None], batch: bool):
    """The constructor of a masked nn.BatchNorm2d/3d (``batch``) or
    nn.InstanceNorm2d/3d: torch's own (``torch_init``, with torch's
    defaults), with ``bias`` passed on only when False (older torch has no
    such argument)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = batch,
        track_running_stats: bool = batch,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
    ) -> None:
        kwargs = {} if bias else {"bias": False}
        torch_init(self, num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)

    momentum_none = "cumulative average" if batch else "running statistics are not updated, as torch's"
    __init__.__doc__ = f"""Same arguments as {torch_name}: ``num_features`` C; ``eps``;
        ``momentum`` (None: {momentum_none}); ``affine``;
        ``track_running_stats``; ``device``, ``dtype``; ``bias`` (False: a
        weight without bias, where torch's {torch_name} takes it)."""
    return __init__


def _spatial_batch_norm_forward(self, input: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
    """Normalizes ``input`` over its valid positions (True in
    ``padding_mask`` marks padding)."""
    padding_mask = _padding.mask_for(self, input, padding_mask)
    self._check_input_dim(input)
    return _batch_norm_forward(self, input, padding_mask, False)


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose statistics skip padding: (N, C, H, W) input, the
    mask (N, H, W) or over trailing dims only ((N, W): padding in time for
    (N, C, F, T) spectrograms). In training, outputs, gradients and running
    statistics are nn.BatchNorm2d's on the valid positions; padded positions
    output 0. Channels-last memory format runs without a copy."""

    __init__ = _spatial_norm_init("nn.BatchNorm2d", nn.modules.batchnorm._BatchNorm.__init__, batch=True)
    forward = _spatial_batch_norm_forward


class MaskedBatchNorm3d(nn.BatchNorm3d):
    """nn.BatchNorm3d whose statistics skip padding: (N, C, D, H, W) input,
    the mask (N, D, H, W) or over trailing dims only. See MaskedBatchNorm2d."""

    __init__ = _spatial_norm_init("nn.BatchNorm3d", nn.modules.batchnorm._BatchNorm.__init__, batch=True)
    forward = _spatial_batch_norm_forward


class MaskedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose statistics come from each sample's valid positions.

    Input (N, C, *spatial), or (N, *spatial, C) with ``channels_last=True``;
    ``padding_mask`` (N, *spatial) or over trailing spatial dims only. Each
    sample's output, input and parameter gradients are nn.GroupNorm's on that
    sample cropped to its valid positions; padded positions output 0.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        channels_last: bool = False,
    ) -> None:
        """Same arguments as nn.GroupNorm: ``num_groups`` (dividing
        ``num_channels``); ``num_channels`` C; ``eps``; ``affine`` (learnable
        per-channel weight and bias); ``device``, ``dtype``; ``bias`` (False:
        a weight without bias, where torch's nn.GroupNorm takes it); plus,
        keyword-only, ``channels_last`` ((N, L, C) input)."""
        kwargs = {} if bias else {"bias": False}
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, **kwargs)
        self.channels_last = channels_last

    def extra_repr(self) -> str:
        """torch's GroupNorm ``extra_repr``, plus ``channels_last=True`` when set."""
        return super().extra_repr() + (", channels_last=True" if self.channels_last else "")

    def forward(self, input: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Normalizes each sample of ``input`` per group over its valid
        positions (True in ``padding_mask`` marks padding)."""
        padding_mask = _padding.mask_for(self, input, padding_mask)
        _check_channels_first(input, self.num_channels, self.channels_last, type(self).__name__)
        return F.group_norm(
            input, self.num_groups, _state(self, "weight"), _state(self, "bias"), self.eps, padding_mask=padding_mask,
            channels_last=self.channels_last,
        )


class MaskedInstanceNorm1d(nn.InstanceNorm1d):
    """nn.InstanceNorm1d whose statistics come from each sample's valid positions.

    Input (N, C, L) with ``padding_mask`` (N, L), (N, L, C) with
    ``channels_last=True``, or unbatched (C, L) with (L,). Each sample's
    output and gradients are nn.InstanceNorm1d's on the sample cropped to its
    valid positions; padded positions output 0. With
    ``track_running_stats``, training moves the running statistics towards
    the average over samples of their mean and unbiased variance (samples with
    fewer than 2 valid positions left out), and eval normalizes with them.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        channels_last: bool = False,
    ) -> None:
        """Same arguments as nn.InstanceNorm1d: ``num_features`` C; ``eps``;
        ``momentum`` (None: running statistics are not updated, as torch's);
        ``affine``; ``track_running_stats``; ``device``, ``dtype``; ``bias``
        (False: a weight without bias, where torch's nn.InstanceNorm1d takes
        it); plus, keyword-only, ``channels_last`` ((N, L, C) input)."""
        kwargs = {} if bias else {"bias": False}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.channels_last = channels_last

    def extra_repr(self) -> str:
        """torch's InstanceNorm1d ``extra_repr``, plus ``channels_last=True`` when set."""
        return super().extra_repr() + (", channels_last=True" if self.channels_last else "")

    def forward(self, input: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Normalizes each sample and channel of ``input`` over its valid
        positions (True in ``padding_mask`` marks padding)."""
        return _instance_norm_forward(self, input, padding_mask, self.channels_last)


def _instance_norm_forward(
    module: nn.modules.instancenorm._InstanceNorm, input: Tensor, padding_mask: Optional[Tensor], channels_last: bool
) -> Tensor:
    """The forward of the masked instance norms: torch's, with a mask
    (unbatched input as a batch of one)."""
    padding_mask = _padding.mask_for(module, input, padding_mask)
    module._check_input_dim(input)
    unbatched = not _layouts.is_jagged(input) and input.dim() == module._get_no_batch_dim()
    if unbatched:
        input = input.unsqueeze(0)
        padding_mask = None if padding_mask is None else padding_mask.unsqueeze(0)
    _check_channels_first(input, module.num_features, channels_last, type(module).__name__)
    out = F.instance_norm(
        input,
        _state(module, "running_mean"),
        _state(module, "running_var"),
        _state(module, "weight"),
        _state(module, "bias"),
        module.training or not module.track_running_stats,
        module.momentum if module.momentum is not None else 0.0,
        module.eps,
        padding_mask=padding_mask,
        channels_last=channels_last,
    )
    return out.squeeze(0) if unbatched else out


def _spatial_instance_norm_forward(self, input: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
    """Normalizes each sample and channel of ``input`` over its valid
    positions (True in ``padding_mask`` marks padding)."""
    return _instance_norm_forward(self, input, padding_mask, False)


class MaskedInstanceNorm2d(nn.InstanceNorm2d):
    """nn.InstanceNorm2d whose statistics come from each sample's valid
    positions: (N, C, H, W) input (or unbatched (C, H, W)), the mask
    (N, H, W) or over trailing dims only ((N, W): padding in time for
    (N, C, F, T) spectrograms). Each sample's output and gradients are
    nn.InstanceNorm2d's on its valid positions; padded positions output 0;
    running statistics as :class:`MaskedInstanceNorm1d`'s. Channels-last
    memory format runs without a copy."""

    __init__ = _spatial_norm_init("nn.InstanceNorm2d", nn.modules.instancenorm._InstanceNorm.__init__, batch=False)
    forward = _spatial_instance_norm_forward


class MaskedInstanceNorm3d(nn.InstanceNorm3d):
    """nn.InstanceNorm3d whose statistics come from each sample's valid
    positions: (N, C, D, H, W) input (or unbatched), the mask (N, D, H, W)
    or over trailing dims only. See MaskedInstanceNorm2d."""

    __init__ = _spatial_norm_init("nn.InstanceNorm3d", nn.modules.instancenorm._InstanceNorm.__init__, batch=False)
    forward = _spatial_instance_norm_forward


class MaskedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm that skips padded rows: they output 0 and get 0 gradient.

    ``padding_mask`` has shape ``input.shape[:-len(normalized_shape)]``.
    """

    def __init__(
        self,
        normalized_shape: _shape_t,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Same arguments as nn.LayerNorm: ``normalized_shape`` (the trailing
        dims normalized over, an int for the last one); ``eps``;
        ``elementwise_affine`` (learnable weight and bias); ``bias`` (False:
        the weight only); ``device``, ``dtype``."""
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)

    def forward(self, input: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Normalizes each valid row of ``input`` over ``normalized_shape``;
        padded rows (True in ``padding_mask``) output 0."""
        padding_mask = _padding.mask_for(self, input, padding_mask)
        return F.layer_norm(
            input, self.normalized_shape, _state(self, "weight"), _state(self, "bias"), self.eps,
            padding_mask=padding_mask,
        )


class MaskedRMSNorm(nn.RMSNorm):
    """nn.RMSNorm that skips padded rows: they output 0 and get 0 gradient.

    ``padding_mask`` has shape ``input.shape[:-len(normalized_shape)]``.
    """

    def __init__(
        self,
        normalized_shape: _shape_t,
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Same arguments as nn.RMSNorm: ``normalized_shape`` (the trailing
        dims normalized over, an int for the last one); ``eps`` (None: the
        machine epsilon of the accumulation dtype); ``elementwise_affine``
        (learnable weight); ``device``, ``dtype``."""
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)

    def forward(self, input: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """RMS-normalizes each valid row of ``input`` over ``normalized_shape``;
        padded rows (True in ``padding_mask``) output 0."""
        padding_mask = _padding.mask_for(self, input, padding_mask)
        return F.rms_norm(input, self.normalized_shape, _state(self, "weight"), self.eps, padding_mask=padding_mask)
