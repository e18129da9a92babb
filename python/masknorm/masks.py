"""Building padding masks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def check_lengths(lengths: Tensor, where: str) -> None:
    """Raises unless ``lengths`` is a 1-D tensor of integers >= 0 (``where``
    names the caller in the message)."""
    if lengths.dim() != 1:
        raise ValueError(f"{where}: expected lengths of shape (N,), but got shape {list(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{where}: expected integer lengths, but got dtype {lengths.dtype}")
    if lengths.numel() and bool((lengths < 0).any()):
        raise ValueError(f"{where}: expected lengths >= 0, but got {lengths.tolist()}")


def padding_mask_from_lengths(lengths: Tensor, max_len: Optional[int] = None) -> Tensor:
    """Bool mask of shape ``(N, max_len)``, True at padding (position >= length).

    ``lengths`` is a 1-D integer tensor of sequence lengths; ``max_len``
    defaults to ``lengths.max()``. The result can be passed as ``padding_mask``
    here and as ``src_key_padding_mask`` to ``nn.TransformerEncoder``.
    """
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths)
    check_lengths(lengths, "padding_mask_from_lengths")
    longest = int(lengths.max()) if lengths.numel() else 0
    if max_len is None:
        max_len = longest
    elif max_len < longest:
        raise ValueError(f"padding_mask_from_lengths: max_len={max_len} is shorter than the longest length {longest}")
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) >= lengths.unsqueeze(1)
