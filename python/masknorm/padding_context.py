"""The ``masknorm.padding`` context: a padding mask for the masked norms
inside models whose ``forward`` does not pass one on. (The module has its own
name, so that ``masknorm.padding`` is the context manager itself.)

While a :func:`padding` context is active, a masked module called without
``padding_mask`` takes the mask of its input's time axis (:func:`mask_for`,
one call at the top of every masked module's ``forward``). The context holds
the valid lengths along the time axis of the model's input; convolutions
(``nn.Conv1d``, ``nn.ConvTranspose1d``, hooked by ``convert_model`` through
:func:`track_convolutions`) carry them through their length arithmetic and
zero padded frames at their input, so every time axis the model creates gets
its own lengths, keyed by its padded size.

Lengths stay tensors and are never read in Python, so nothing about them is
baked into a ``torch.compile`` graph. Dynamo cannot read a ``ContextVar``:
compiled code reaches the context through two custom ops
(``masknorm_padding::mask``, ``masknorm_padding::conv_mask``) that read it when
they run. The only Python value a graph depends on is whether any context is
active (``_any_active``), so batches with new lengths and the same padded shape
reuse the graph.

Neighbours: modules.py (the callers of :func:`mask_for`), convert.py
(attaches the convolution hooks), masks.py (masks from lengths, the lengths check).
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .masks import check_lengths

__all__ = ["mask_for", "padding", "track_convolutions"]

# A length map is a tuple of steps applied to the input's lengths, in order:
# (_ADD, c): L + c; (_DIV, s): floor(L / s); (_MUL, s): L * s. Two time axes
# with the same steps have equal lengths, so comparing steps needs no sync.
_ADD, _DIV, _MUL = 0, 1, 2
_Steps = Tuple[Tuple[int, int], ...]


def _append(steps: _Steps, op: int, value: int) -> _Steps:
    if op == _ADD:
        if value == 0:
            return steps
        if steps and steps[-1][0] == _ADD:
            total = steps[-1][1] + value
            return steps[:-1] + (((_ADD, total),) if total else ())
    elif value == 1:
        return steps
    return steps + ((op, value),)


def _apply(lengths: Tensor, steps: _Steps) -> Tensor:
    for op, value in steps:
        if op == _ADD:
            lengths = lengths + value
        elif op == _DIV:
            lengths = torch.div(lengths, value, rounding_mode="floor")
        else:
            lengths = lengths * value
    return lengths.clamp(min=0) if steps else lengths


class _State:
    """One active context: the input's lengths and the time axes derived from
    them, by padded size."""

    def __init__(
        self,
        lengths: Tensor,
        root_mask: Optional[Tensor],
        max_len: Optional[int],
        zero_conv_inputs: bool,
        unmatched: str,
    ) -> None:
        self.lengths = lengths
        self.zero_conv_inputs = zero_conv_inputs
        self.unmatched = unmatched
        self.steps: Dict[int, _Steps] = {} if max_len is None else {max_len: ()}
        self.ambiguous: Dict[int, List[_Steps]] = {}
        self.masks: Dict[int, Tensor] = {} if root_mask is None else {max_len: root_mask}
        self.lock = threading.Lock()

    def _bind_root(self, size: int) -> None:
        # lengths alone: the first time axis a masked norm or convolution sees
        # is the input's (the model's first layers see the input)
        longest = int(self.lengths.max()) if self.lengths.numel() else 0
        if longest > size:
            raise ValueError(
                f"masknorm.padding: the first time axis seen has {size} frames, fewer than the longest of "
                f"lengths ({longest}); lengths count frames of the model's input, whose padded size should "
                f"be the first time axis a masked norm or convolution sees (or pass max_len=)"
            )
        self.steps[size] = ()

    def mask(self, input: Tensor, dim: int, who: str) -> Optional[Tensor]:
        """The (N, T) mask for ``input``'s time axis ``dim``, or None where the
        context lets an unmatched axis run unmasked."""
        size, batch = int(input.shape[dim]), int(input.shape[0]) if input.dim() else 0
        with self.lock:
            cached = self.masks.get(size)
            if cached is not None and cached.shape[0] == batch:
                return cached
            if not self.steps:
                self._bind_root(size)
            if size in self.ambiguous:
                return self._unmatched(input, dim, who, "two different length computations give this size")
            steps = self.steps.get(size)
            if steps is None or batch != self.lengths.shape[0]:
                return self._unmatched(input, dim, who, None)
            lengths = _apply(self.lengths.to(input.device), steps)
            mask = torch.arange(size, device=input.device) >= lengths.unsqueeze(1)
            self.masks[size] = mask
            return mask

    def _unmatched(self, input: Tensor, dim: int, who: str, why: Optional[str]) -> None:
        if self.unmatched == "unmasked":
            return None
        known = sorted(self.steps)
        raise RuntimeError(
            f"masknorm.padding: {who} got input of shape {list(input.shape)}, whose time axis (dim {dim}) "
            f"has {input.shape[dim]} frames"
            + (f" ({why})" if why else "")
            + f", but the padding context knows lengths for batch size {self.lengths.shape[0]} and time "
            f"sizes {known} only (the input's, and those its convolutions made). Pass padding_mask to this "
            f"layer explicitly, hand the context lengths at this layer's level, or let such layers run "
            f"unmasked with masknorm.padding(..., unmatched='unmasked')"
        )

    def convolved(self, input: Tensor, out_size: int, steps: _Steps, who: str) -> Optional[Tensor]:
        """Records the lengths of a convolution's output time axis; returns
        the mask of its input (None: nothing to zero)."""
        mask = self.mask(input, input.dim() - 1, who)
        if mask is None:
            return None
        with self.lock:
            derived = self.steps[int(input.shape[-1])]
            for step in steps:
                derived = _append(derived, *step)
            previous = self.steps.setdefault(out_size, derived)
            if previous != derived:
                self.ambiguous.setdefault(out_size, [previous]).append(derived)
                self.masks.pop(out_size, None)
        return mask if self.zero_conv_inputs else None


_STATE: contextvars.ContextVar[Optional[_State]] = contextvars.ContextVar("masknorm_padding", default=None)
# Read by traced code instead of the ContextVar (Dynamo guards on its value):
# True while any thread is inside a context.
_any_active = False
_active_count = 0
_active_lock = threading.Lock()


def _check_lengths(lengths: Tensor) -> Tensor:
    if not isinstance(lengths, Tensor):
        raise TypeError(f"masknorm.padding: expected lengths to be a tensor, but got {type(lengths).__name__}")
    check_lengths(lengths, "masknorm.padding")
    return lengths.to(torch.int64)


def _lengths_from_mask(padding_mask: Tensor) -> Tensor:
    if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool or padding_mask.dim() != 2:
        what = f"shape {list(padding_mask.shape)}, dtype {padding_mask.dtype}" if isinstance(padding_mask, Tensor) else type(padding_mask).__name__
        raise ValueError(f"masknorm.padding: expected padding_mask to be a bool tensor of shape (N, T), but got {what}")
    lengths = (~padding_mask).sum(1)
    right_padded = torch.arange(padding_mask.shape[1], device=padding_mask.device) >= lengths.unsqueeze(1)
    if not torch.equal(right_padded, padding_mask):
        rows = (right_padded != padding_mask).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"masknorm.padding: padding_mask must mark right padding only (each row valid frames, then "
            f"padding), but rows {rows} have padding before a valid frame; convolution length arithmetic has "
            f"no meaning for left padding or holes"
        )
    return lengths


@contextlib.contextmanager
def padding(
    lengths: Optional[Tensor] = None,
    *,
    padding_mask: Optional[Tensor] = None,
    max_len: Optional[int] = None,
    zero_conv_inputs: bool = True,
    unmatched: str = "raise",
) -> Iterator[None]:
    """Masks the masked norms of a converted model whose ``forward`` does not
    pass ``padding_mask`` on::

        model = masknorm.convert_model(model)
        with masknorm.padding(lengths=lengths):
            out = model(x)

    Args:
        lengths: (N,) integer tensor, the valid (right-padded) lengths along
            the time axis of the model's input. Never read in Python inside
            the model, so ``torch.compile`` does not specialize on it.
        padding_mask: instead of ``lengths``, an (N, T) bool mask of the
            input's time axis, True at padding; right padding only (a row
            with padding before a valid frame raises ValueError).
        max_len: the padded size T that ``lengths`` count along; default: the
            size of the first time axis a masked norm or hooked convolution
            sees in the context.
        zero_conv_inputs: zero the padded frames at the input of every hooked
            convolution whose kernel spans more than one frame, so padding
            never reaches a valid output frame through the kernel.
        unmatched: ``"raise"`` (default): a masked norm whose input's time
            axis has a size no known lengths belong to raises RuntimeError
            naming the sizes; ``"unmasked"``: such a norm runs without a mask.

    While active, a masked norm called without ``padding_mask`` uses the mask
    of its input's time axis: the last axis for batch, group and instance
    norm (the time axis of (N, C, T), and of (N, C, F, T)), axis 1 for
    ``channels_last`` modules and LayerNorm/RMSNorm on (N, T, C). Input
    without a time axis ((N, C), or (N, C) rows for LayerNorm) runs unmasked.
    An explicit ``padding_mask`` always wins. Contexts nest (the innermost
    applies) and are per thread and per asyncio task (contextvars).
    """
    if (lengths is None) == (padding_mask is None):
        raise ValueError("masknorm.padding: pass exactly one of lengths= and padding_mask=")
    if unmatched not in ("raise", "unmasked"):
        raise ValueError(f"masknorm.padding: expected unmatched='raise' or 'unmasked', but got {unmatched!r}")
    if padding_mask is not None:
        if max_len is not None and max_len != padding_mask.shape[-1]:
            raise ValueError(f"masknorm.padding: max_len={max_len} differs from padding_mask's {padding_mask.shape[-1]} frames")
        lengths = _lengths_from_mask(padding_mask)
        max_len = int(padding_mask.shape[1])
    else:
        lengths = _check_lengths(lengths)
        if max_len is not None:
            max_len = int(max_len)
            longest = int(lengths.max()) if lengths.numel() else 0
            if longest > max_len:
                raise ValueError(f"masknorm.padding: max_len={max_len} is shorter than the longest length {longest}")
    state = _State(lengths, padding_mask, max_len, zero_conv_inputs, unmatched)
    global _any_active, _active_count
    token = _STATE.set(state)
    with _active_lock:
        _active_count += 1
        _any_active = True
    try:
        yield
    finally:
        with _active_lock:
            _active_count -= 1
            _any_active = _active_count > 0
        _STATE.reset(token)


def _time_dim(module: nn.Module, input: Tensor) -> Optional[int]:
    """The time axis of a masked module's input, or None where it has none."""
    from . import _layouts  # noqa: PLC0415  (modules.py imports this module)

    if _layouts.is_jagged(input):
        return None  # its offsets are its mask
    normalized_shape = getattr(module, "normalized_shape", None)
    if normalized_shape is not None:  # LayerNorm, RMSNorm: (N, T, *normalized_shape)
        lead = input.dim() - len(normalized_shape)
        return 1 if lead >= 2 else None
    if input.dim() < 3 and not isinstance(module, nn.InstanceNorm1d):
        return None  # (N, C)
    return 1 if getattr(module, "channels_last", False) else input.dim() - 1


def mask_for(module: nn.Module, input: Tensor, padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """The mask a masked module's ``forward`` uses: ``padding_mask`` when
    given, else the active :func:`padding` context's mask for ``input``'s
    time axis, else None."""
    if padding_mask is not None or not _any_active:
        return padding_mask
    dim = _time_dim(module, input)
    if dim is None:
        return None
    if torch.compiler.is_compiling():
        mask = torch.ops.masknorm_padding.mask(input.detach(), dim, type(module).__name__)
        return _expand(mask, module, input, dim)
    state = _STATE.get()
    if state is None:
        return None
    return _expand(state.mask(input, dim, type(module).__name__), module, input, dim)


def _expand(mask: Optional[Tensor], module: nn.Module, input: Tensor, dim: int) -> Optional[Tensor]:
    # LayerNorm/RMSNorm over (N, T, X, *normalized_shape): one row per (n, t, x)
    normalized_shape = getattr(module, "normalized_shape", None)
    if mask is None or normalized_shape is None:
        return mask
    lead = input.shape[: input.dim() - len(normalized_shape)]
    if len(lead) == 2:
        return mask
    return mask.reshape(mask.shape + (1,) * (len(lead) - 2)).expand(lead)


@torch.library.custom_op("masknorm_padding::mask", mutates_args=())
def _mask_op(input: Tensor, dim: int, who: str) -> Tensor:
    """The active context's mask for ``input``'s time axis ``dim``, read when
    the op runs (compiled code cannot read the context)."""
    state = _STATE.get()
    mask = None if state is None else state.mask(input, dim, who)
    if mask is None:  # no context in this thread, or an unmatched axis let run unmasked
        return torch.zeros(input.shape[0], input.shape[dim], dtype=torch.bool, device=input.device)
    return mask.clone()


@_mask_op.register_fake
def _mask_fake(input: Tensor, dim: int, who: str) -> Tensor:
    return input.new_empty((input.shape[0], input.shape[dim]), dtype=torch.bool)


@torch.library.custom_op("masknorm_padding::conv_mask", mutates_args=())
def _conv_mask_op(input: Tensor, out_size: int, steps: List[int], who: str) -> Tensor:
    """Records the lengths of a convolution's output (``steps`` flattened)
    in the active context; returns the mask of padded frames to zero at its
    input (all False when there is nothing to zero)."""
    state = _STATE.get()
    pairs = tuple(zip(steps[0::2], steps[1::2]))
    mask = None if state is None else state.convolved(input, out_size, pairs, who)
    if mask is None:
        return torch.zeros(input.shape[0], input.shape[-1], dtype=torch.bool, device=input.device)
    return mask.clone()


@_conv_mask_op.register_fake
def _conv_mask_fake(input: Tensor, out_size: int, steps: List[int], who: str) -> Tensor:
    return input.new_empty((input.shape[0], input.shape[-1]), dtype=torch.bool)


def _conv_steps(conv: nn.Module, size: int) -> Optional[Tuple[int, _Steps, bool]]:
    """(output size, length steps, whether padded input frames can reach a
    valid output) of a 1-D convolution, or None when it leaves lengths and
    frames alone."""
    (k,), (s,), (d,) = conv.kernel_size, conv.stride, conv.dilation
    span = d * (k - 1)
    transposed = isinstance(conv, nn.ConvTranspose1d)
    if conv.padding == "valid":
        p = 0
    elif conv.padding == "same":
        if span == 0:
            return None
        if conv.padding_mode != "zeros":
            _refuse_padding_mode(conv)
        return size, (), True
    else:
        (p,) = conv.padding
    if p and conv.padding_mode != "zeros":
        _refuse_padding_mode(conv)
    if transposed:
        (extra,) = conv.output_padding
        out = (size - 1) * s - 2 * p + span + extra + 1
        steps = _append(_append(_append((), _ADD, -1), _MUL, s), _ADD, -2 * p + span + extra + 1)
        return out, steps, True
    if span == 0 and s == 1 and p == 0:
        return None
    out = (size + 2 * p - span - 1) // s + 1
    steps = _append(_append(_append((), _ADD, 2 * p - span - 1), _DIV, s), _ADD, 1)
    # without padding, a valid output frame's window lies within valid frames
    return out, steps, p > 0


def _refuse_padding_mode(conv: nn.Module) -> None:
    raise RuntimeError(
        f"masknorm.padding: {type(conv).__name__} with padding_mode={conv.padding_mode!r} pads a sequence at "
        f"its own end when run alone and at the batch's end when padded, so lengths cannot be carried "
        f"through it; only padding_mode='zeros' works inside masknorm.padding"
    )


def _conv_pre_hook(conv: nn.Module, args: tuple) -> Optional[tuple]:
    if not _any_active or not args:
        return None
    input = args[0]
    if not isinstance(input, Tensor) or input.dim() != 3:
        return None  # unbatched (C, T): no batch to take lengths from
    spec = _conv_steps(conv, int(input.shape[-1]))
    if spec is None:
        return None
    out_size, steps, reaches = spec
    who = type(conv).__name__
    if torch.compiler.is_compiling():
        flat = [v for step in steps for v in step]
        mask = torch.ops.masknorm_padding.conv_mask(input.detach(), out_size, flat, who)
        # always applied (all False when not zeroing): the op's side effect,
        # recording the output's lengths, must not be dropped as dead code
        return (input.masked_fill(mask.unsqueeze(1), 0),) + tuple(args[1:])
    state = _STATE.get()
    if state is None:
        return None
    mask = state.convolved(input, out_size, steps, who)
    if mask is None or not reaches:
        return None
    return (input.masked_fill(mask.unsqueeze(1), 0),) + tuple(args[1:])


# Convolutions already hooked, so converting twice hooks once.
_hooked: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


def track_convolutions(module: nn.Module) -> nn.Module:
    """Attaches a forward pre-hook to every ``nn.Conv1d`` and
    ``nn.ConvTranspose1d`` in ``module`` (``convert_model`` calls this), so
    that inside :func:`padding` they carry lengths to the time axes they make
    and zero padded input frames. Outside a context the hook returns at once.
    Parameters, buffers, ``state_dict`` keys and other hooks are untouched."""
    for sub in module.modules():
        if isinstance(sub, (nn.Conv1d, nn.ConvTranspose1d)) and sub not in _hooked:
            _hooked[sub] = sub.register_forward_pre_hook(_conv_pre_hook)
    return module
