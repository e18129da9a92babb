"""What the per-op sample modules share: the ``Sample`` record, seeded random
data, the mask vocabulary, and wrong-argument variants of a sample.

Masks (``MASKS``):
  None           no mask
  "none_padded"  an all-False mask (nothing padded)
  "padded"       padding whose first sequence (or row) is not full, with a
                 fully padded sequence (row) where the batch has three or more,
                 and at least three valid positions per channel where the
                 batch has them (training batch norm needs two; with two its
                 input gradient is pure cancellation)

Data is made on the CPU in float64 from a generator seeded by the sample's
name, then cast and moved: the same name gives the same values on every
device, in every dtype and in any test order.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import masknorm

MASKS = (None, "none_padded", "padded")
DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Sample:
    """One call of an op: ``op(*args, **kwargs)``.

    ``grad_args`` are the positions of the arguments a gradient test
    differentiates (empty for ops that are not differentiable by themselves).
    """

    name: str
    args: tuple
    kwargs: Dict[str, Any] = field(default_factory=dict)
    grad_args: Tuple[int, ...] = ()

    def __repr__(self) -> str:
        return self.name

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Sample":
        """The sample with ``fn`` applied to every tensor argument."""
        return dataclasses.replace(
            self, args=tuple(_map(fn, a) for a in self.args), kwargs={k: _map(fn, v) for k, v in self.kwargs.items()}
        )

    def to(self, device) -> "Sample":
        return self.map(lambda t: t.to(device))

    def clone(self) -> "Sample":
        """Fresh copies of every tensor (ops update running statistics in place)."""
        return self.map(lambda t: t.detach().clone())

    def with_grad(self) -> "Sample":
        """Copies whose ``grad_args`` tensors require grad (leaves)."""
        args = [_map(lambda t: t.detach().clone(), a) for a in self.args]
        for i in self.grad_args:
            if isinstance(args[i], torch.Tensor):
                args[i] = args[i].requires_grad_(True)
        return dataclasses.replace(self, args=tuple(args))

    def replace(self, name: str, **changes) -> "Sample":
        """The sample with arguments replaced by position (``a3=...``) or keyword."""
        args = list(self.args)
        kwargs = dict(self.kwargs)
        for key, value in changes.items():
            if key.startswith("a") and key[1:].isdigit():
                args[int(key[1:])] = value
            else:
                kwargs[key] = value
        return dataclasses.replace(self, name=name, args=tuple(args), kwargs=kwargs)

    def call(self, op):
        return op(*self.args, **self.kwargs)


def _map(fn, value):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_map(fn, v) for v in value)
    return value


def by_name(samples: Sequence[Sample], name: str) -> Sample:
    found = [s for s in samples if s.name == name]
    assert len(found) == 1, f"{len(found)} samples named {name!r}"
    return found[0]


# ------------------------------------------------------------------- random data


def generator(name: str) -> torch.Generator:
    """A CPU generator seeded by ``name``."""
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def randn(gen: torch.Generator, shape, *, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset


def uniform(gen: torch.Generator, shape, low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low


def cast(t: Optional[torch.Tensor], dtype, device="cpu") -> Optional[torch.Tensor]:
    return None if t is None else t.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------ masks


def lengths_mask(lengths: Sequence[int], L: Optional[int] = None) -> torch.Tensor:
    """(N, L) bool, True where position >= length (masknorm.padding_mask_from_lengths)."""
    return masknorm.padding_mask_from_lengths(torch.as_tensor(list(lengths), dtype=torch.long), L)


def padded_lengths(gen: Optional[torch.Generator], N: int, L: int) -> List[int]:
    """Lengths for a "padded" (N, L) mask (see the module docstring)."""
    lengths = torch.randint(0, L + 1, (N,), generator=gen).tolist()
    if N == 0:
        return lengths
    lengths[0] = int(torch.randint(max(L // 2, 1), L, (1,), generator=gen)) if L > 1 else 0
    if N >= 2:
        lengths[1] = L  # a full sequence
    if N >= 3:
        lengths[2] = 0  # a fully padded sequence
    # at least three valid positions where the batch has them
    for i in range(3, N):
        if sum(lengths) >= 3:
            break
        lengths[i] = L
    if N == 1 and L > 1:
        lengths[0] = max(lengths[0], min(3, L - 1))
    return lengths


def padded_rows(gen: Optional[torch.Generator], N: int) -> torch.Tensor:
    """(N,) bool for a "padded" row mask: row 0 padded, at least three rows
    valid when N >= 4, the others random."""
    mask = torch.rand(N, generator=gen) < 0.3
    if N:
        mask[0] = True
    mask[1:4] = False
    return mask


def make_mask(kind: Optional[str], batch_shape: Sequence[int], gen: Optional[torch.Generator] = None):
    """A mask of ``batch_shape`` (the input's leading, per-position dims) of
    kind ``kind`` (see MASKS), random from ``gen`` (default: torch's global
    generator, which the suite's ``seed`` fixture seeds)."""
    if kind is None:
        return None
    if kind == "none_padded":
        return torch.zeros(tuple(batch_shape), dtype=torch.bool)
    if kind != "padded":
        raise ValueError(kind)
    if len(batch_shape) == 1:
        return padded_rows(gen, batch_shape[0])
    if len(batch_shape) == 2:
        return lengths_mask(padded_lengths(gen, *batch_shape), batch_shape[1])
    mask = torch.rand(tuple(batch_shape), generator=gen) < 0.35
    flat = mask.view(-1)
    flat[0] = True
    flat[1:4] = False
    return mask


def noncanonical_bool(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as a bool view of uint8 bytes holding 2, 255 or 1 where it is
    True (cycling): what a uint8 mask viewed as bool, or a buffer from
    elsewhere, holds. torch reads any nonzero byte as True."""
    raw = mask.to(torch.uint8)
    n = int(mask.sum())
    raw[mask] = torch.tensor([2, 255, 1], dtype=torch.uint8, device=mask.device).repeat(n // 3 + 1)[:n]
    return raw.view(torch.bool)


def inputs(case, *, dtype=torch.float32, device="cpu", tag: str = "", scale: float = 2.0,
           offset: float = 0.5) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(x, padding_mask) of a case (anything with ``name``, ``shape``, ``mask``
    and ``mask_shape``): x ~ N(offset, scale^2); ``tag`` picks other values of
    the same case."""
    gen = generator(case.name + tag)
    x = randn(gen, case.shape, scale=scale, offset=offset)
    mask = make_mask(case.mask, case.mask_shape, gen)
    return cast(x, dtype, device), None if mask is None else mask.to(device)


# --------------------------------------------------------------- wrong arguments


def wrong_variants(sample: Sample, op, positions: Sequence[int]) -> Iterator[Tuple[str, str, Sample]]:
    """(argument name, what is wrong, sample) for each tensor argument at
    ``positions``: one size too many in its last dim, one dim too many, a
    wrong dtype (bool; uint8 for a bool mask) and another device ("meta", or
    "cpu" for meta tensors). Names come from the op's schema, so an error
    message can be checked against them."""
    schema = getattr(op, "default", op)._schema.arguments
    for i in positions:
        t = sample.args[i]
        if not isinstance(t, torch.Tensor):
            continue
        name = schema[i].name
        bigger = list(t.shape[:-1]) + [t.shape[-1] + 1] if t.dim() else [2]
        yield name, "size", sample.replace(f"{sample.name}-{name}-size", **{f"a{i}": t.new_zeros(bigger)})
        yield name, "dim", sample.replace(f"{sample.name}-{name}-dim", **{f"a{i}": t.new_zeros(tuple(t.shape) + (2,))})
        wrong = t.to(torch.uint8 if t.dtype == torch.bool else torch.bool)
        yield name, "dtype", sample.replace(f"{sample.name}-{name}-dtype", **{f"a{i}": wrong})
        other = "cpu" if t.device.type == "meta" else "meta"
        yield name, "device", sample.replace(f"{sample.name}-{name}-device", **{f"a{i}": t.to(other)})
