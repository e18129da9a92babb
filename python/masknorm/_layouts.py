"""The inputs the functional API takes beyond the ops' own layouts.

The ops take (N, C), (N, C, L), or (N, L, C) with ``channels_last`` (and
LayerNorm/RMSNorm any leading shape). This module brings the rest to them
without copying the data where it can, and back:

* **(N, C, \\*spatial)** of any rank (BatchNorm2d/3d, GroupNorm on images):
  the spatial dims flattened to L, with a mask over (N, \\*spatial) or over
  trailing spatial dims only (time, say) broadcast to all of them. A
  channels-last memory format runs as the (N, L, C) layout, as a view.
* **jagged NestedTensors** (``torch.nested``, ``layout=torch.jagged``, shape
  (N, j, C)): the valid tokens are the values, so per-token norms and batch
  norm run on the values directly; per-sequence norms (group and instance
  norm) run on the padded tensor with the mask the offsets give.

Neighbours: functional.py (the callers), _ops.py (the ops' fake kernels).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor


class OpLayout(NamedTuple):
    """An input as an op takes it, and how to shape the op's output back."""

    input: Tensor
    padding_mask: Optional[Tensor]
    channels_last: bool
    restore: Callable[[Tensor], Tensor]


def identity(t: Tensor) -> Tensor:
    return t


def _spatial_mask(mask: Optional[Tensor], N: int, spatial: torch.Size, what: str, fn: str) -> Optional[Tensor]:
    """(N, prod(spatial)) from a mask over (N, *spatial) or (N, *trailing spatial dims)."""
    if mask is None:
        return None
    k = mask.dim() - 1
    trailing = tuple(spatial[len(spatial) - k:]) if 0 <= k <= len(spatial) else None
    if k < 0 or trailing is None or mask.shape[0] != N or tuple(mask.shape[1:]) != trailing:
        raise RuntimeError(
            f"masknorm.functional.{fn}: expected padding_mask of shape (N, *spatial) = {(N, *spatial)} or over "
            f"trailing spatial dims only (e.g. {(N, spatial[-1])}) for {what} input, but got {tuple(mask.shape)}"
        )
    view = (N,) + (1,) * (len(spatial) - k) + tuple(mask.shape[1:])
    return mask.reshape(view).expand((N, *spatial)).reshape(N, math.prod(spatial))


def flatten_spatial(input: Tensor, padding_mask: Optional[Tensor], channels_last: bool, fn: str) -> OpLayout:
    """``input`` of rank 2 or 3 as it is; of higher rank, (N, C, *spatial)
    (or (N, *spatial, C) with ``channels_last``) as (N, C, L) or (N, L, C)."""
    if input.dim() <= 3:
        return OpLayout(input, padding_mask, channels_last, identity)
    N = input.shape[0]
    shape = input.shape
    if channels_last:
        spatial = shape[1:-1]
        mask = _spatial_mask(padding_mask, N, spatial, "(N, *spatial, C)", fn)
        return OpLayout(input.reshape(N, math.prod(spatial), shape[-1]), mask, True, lambda out: out.view(shape))
    spatial = shape[2:]
    mask = _spatial_mask(padding_mask, N, spatial, "(N, C, *spatial)", fn)
    memory_format = {4: torch.channels_last, 5: torch.channels_last_3d}.get(input.dim())
    if memory_format is not None and not input.is_contiguous() and input.is_contiguous(memory_format=memory_format):
        # Channels-last memory: (N, *spatial, C) in memory, a view as (N, L, C).
        moved = input.movedim(1, -1)
        moved_shape = moved.shape
        return OpLayout(
            moved.reshape(N, math.prod(spatial), shape[1]), mask, True,
            lambda out: out.view(moved_shape).movedim(-1, 1),
        )
    # explicit sizes, not -1: an empty batch (N = 0) has no size to infer
    return OpLayout(input.reshape(N, shape[1], math.prod(spatial)), mask, False, lambda out: out.view(shape))


# ------------------------------------------------------------------- jagged


def is_jagged(t: Tensor) -> bool:
    return isinstance(t, Tensor) and t.is_nested and t.layout == torch.jagged


def check_jagged(input: Tensor, padding_mask: Optional[Tensor], fn: str) -> None:
    """A jagged (N, j, C) tensor, contiguous, without a padding_mask (its
    offsets say where each sequence ends)."""
    if padding_mask is not None:
        raise ValueError(
            f"masknorm.functional.{fn}: a jagged NestedTensor carries its lengths; expected padding_mask=None, "
            f"but got a tensor of shape {tuple(padding_mask.shape)}"
        )
    if input.dim() != 3 or input._ragged_idx != 1:
        raise ValueError(
            f"masknorm.functional.{fn}: expected a jagged NestedTensor of shape (N, j, C) (ragged dim 1), but got "
            f"shape {tuple(input.shape)} with ragged dim {input._ragged_idx}"
        )
    if input._lengths is not None:
        raise ValueError(
            f"masknorm.functional.{fn}: expected a contiguous jagged NestedTensor (offsets only), but got one "
            "with lengths (a narrowed view); call .contiguous() first"
        )


def like_jagged(values: Tensor, like: Tensor) -> Tensor:
    """A jagged tensor with ``like``'s structure (its offsets, and the
    sequence-length bounds it caches) and these values."""
    return torch.nested.nested_tensor_from_jagged(
        values, like.offsets(), min_seqlen=like._maybe_min_seqlen, max_seqlen=like._maybe_max_seqlen
    )


def _padded_rows(like: Tensor, max_len) -> Tensor:
    """For each token of a jagged (N, j, C) tensor, its row in the padded
    tensor viewed as (N * max_len, C): token t of sequence n sits at
    n * max_len + t - offsets[n]."""
    offsets = like.offsets()
    tokens = torch.arange(like.values().shape[0], device=offsets.device)
    sequence = torch.searchsorted(offsets[1:], tokens, right=True)
    return sequence * max_len + (tokens - offsets[sequence])


def jagged_to_padded(input: Tensor) -> tuple:
    """(padded (N, L, C), padding_mask (N, L), rows) of a jagged (N, j, C)
    tensor, L its longest sequence; ``rows`` for padded_to_jagged. The values
    are scattered (index_copy: its backward is a gather) into uninitialized
    memory: the ops never read padded positions, whatever they hold."""
    values = input.values()
    N, max_len = input.shape[0], input._get_max_seqlen()
    rows = _padded_rows(input, max_len)
    padded = values.new_empty((N * max_len, values.shape[1])).index_copy(0, rows, values)
    lengths = input.offsets().diff()
    positions = torch.arange(max_len, device=values.device)
    return padded.view(N, max_len, values.shape[1]), positions.unsqueeze(0) >= lengths.unsqueeze(1), rows


def padded_to_jagged(padded: Tensor, like: Tensor, rows: Tensor) -> Tensor:
    """The valid tokens of ``padded`` (N, L, C) as a jagged tensor with ``like``'s structure."""
    return like_jagged(padded.reshape(-1, padded.shape[-1]).index_select(0, rows), like)


def jagged_tokens(input: Tensor, padding_mask: Optional[Tensor], fn: str) -> OpLayout:
    """A jagged (N, j, C) tensor as its tokens (T, C) (``values()``, a view),
    the output shaped back into a jagged tensor of input's structure."""
    check_jagged(input, padding_mask, fn)
    return OpLayout(input.values(), None, False, lambda out: like_jagged(out, input))


def on_values(input: Tensor, padding_mask: Optional[Tensor], fn: str, norm: Callable[[Tensor], Tensor]) -> Tensor:
    """A norm of the tokens alone (batch norm over all of them, layer/RMS norm
    of each): ``norm(values)`` (T, C), as a jagged tensor of input's structure."""
    tokens = jagged_tokens(input, padding_mask, fn)
    return tokens.restore(norm(tokens.input))


def per_sequence(
    input: Tensor, padding_mask: Optional[Tensor], fn: str, norm: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """A norm of each sequence (group, instance norm): ``norm(padded, mask)``
    on the padded (N, L, C) tensor and its mask, back as a jagged tensor."""
    check_jagged(input, padding_mask, fn)
    padded, mask, rows = jagged_to_padded(input)
    return padded_to_jagged(norm(padded, mask), input, rows)
