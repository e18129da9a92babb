"""Sample inputs for group_norm, group_norm_backward and instance_norm
(instance norm: group norm with one group per channel, plus running
statistics).

* ``Case``: a batch-norm layout (``NC``, ``NCL``, ``NLC``), N, C, L and a
  mask kind; ``inputs(case)`` makes it. Masks come from ``sample_lengths``:
  lengths with a full sequence, a fully padded one and none of length 1
  (instance norm raises for one valid position, as torch does for one
  spatial element).
* ``SAMPLES[op](device, dtype)``: the op's samples over the layouts, groups
  (1, some, one per channel), affine variants and masks.
* ``WRONG[op]``: the sample and argument positions error tests corrupt.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from samples.common import DTYPE_NAMES, Sample, cast, generator, randn, uniform

ops = torch.ops.masknorm


class Case(NamedTuple):
    """A group-norm input: layout, sizes, mask kind (None, "none_padded", "padded")."""

    layout: str
    N: int
    C: int
    L: int = 1
    mask: Optional[str] = "padded"

    @property
    def channels_last(self) -> bool:
        return self.layout == "NLC"

    @property
    def shape(self) -> Tuple[int, ...]:
        return {"NC": (self.N, self.C), "NCL": (self.N, self.C, self.L), "NLC": (self.N, self.L, self.C)}[self.layout]

    @property
    def name(self) -> str:
        return f"{self.layout}_{'x'.join(map(str, self.shape))}_{self.mask or 'no_mask'}"


def sample_lengths(N: int, L: int) -> List[int]:
    """Valid lengths: one short of full, full, empty, then about half; never 1."""
    cycle = [max(L - 1, 2), L, 0, max(L // 2, 2)]
    return [min(cycle[i % 4], L) if cycle[i % 4] != 1 else 2 for i in range(N)]


def make_mask(case: Case) -> Optional[torch.Tensor]:
    if case.mask is None:
        return None
    if case.layout == "NC":
        mask = torch.zeros(case.N, dtype=torch.bool)
        if case.mask == "padded":
            mask[::3] = True
        return mask
    if case.mask == "none_padded":
        return torch.zeros(case.N, case.L, dtype=torch.bool)
    lengths = torch.tensor(sample_lengths(case.N, case.L))
    return torch.arange(case.L).unsqueeze(0) >= lengths.unsqueeze(1)


def inputs(case: Case, *, dtype=torch.float32, device="cpu", tag: str = ""):
    """(x, padding_mask): x ~ N(0.5, 2^2), seeded by the case's name."""
    x = randn(generator(case.name + tag), case.shape, scale=2.0, offset=0.5)
    mask = make_mask(case)
    return cast(x, dtype, device), None if mask is None else mask.to(device)


def affine_params(C: int, name: str, *, dtype=torch.float32, device="cpu"):
    gen = generator("affine" + name)
    return cast(uniform(gen, (C,), 0.5, 1.5), dtype, device), cast(uniform(gen, (C,), -0.5, 0.5), dtype, device)


class Forward(NamedTuple):
    name: str
    case: Case
    groups: int  # 0: one per channel
    affine: bool = True
    variants: bool = False  # backward: input-only, params-only and double samples too


_GROUP_NORM = [
    Forward("NCL-g3", Case("NCL", 4, 6, 7), 3, variants=True),
    Forward("NLC-g2", Case("NLC", 4, 6, 7), 2, variants=True),
    Forward("NC-g2", Case("NC", 5, 6), 2),
    Forward("NCL-g1-none_padded", Case("NCL", 3, 4, 5, "none_padded"), 1),
    Forward("NLC-gC-no_mask", Case("NLC", 3, 5, 4, None), 0),
    Forward("NCL-gC-no_affine", Case("NCL", 5, 4, 6), 0, affine=False),
    Forward("NLC-g1-L1", Case("NLC", 3, 4, 1, None), 1),
    Forward("empty", Case("NCL", 0, 4, 5, None), 2),
]

_INSTANCE_NORM = [
    ("NCL", Case("NCL", 4, 5, 7), True, True),
    ("NLC", Case("NLC", 4, 5, 7), True, True),
    ("NCL-no_running", Case("NCL", 5, 3, 6), False, False),
    ("NLC-no_mask", Case("NLC", 3, 4, 5, None), True, False),
    ("NCL-none_padded", Case("NCL", 3, 4, 5, "none_padded"), False, True),
]


def _dt(dtype) -> str:
    return DTYPE_NAMES[dtype]


def _group_norm_sample(f: Forward, device, dtype) -> Sample:
    x, mask = inputs(f.case, dtype=dtype, device=device)
    w, b = affine_params(f.case.C, f.name, dtype=dtype, device=device) if f.affine else (None, None)
    groups = f.groups or f.case.C
    return Sample(
        f"{f.name}-{_dt(dtype)}", (x, mask, w, b, groups, 1e-5, f.case.channels_last), grad_args=(0, 2, 3)
    )


def group_norm(device="cpu", dtype=torch.float32) -> List[Sample]:
    return [_group_norm_sample(f, device, dtype) for f in _GROUP_NORM]


def group_norm_backward(device="cpu", dtype=torch.float32) -> List[Sample]:
    """All gradients for every forward sample; input-only, params-only and
    "double" (grad_output, input and weight require grad: the differentiable
    composite) for some."""
    out = []
    for f in _GROUP_NORM:
        fwd = _group_norm_sample(f, device, dtype)
        x, mask, w, b, groups, eps, channels_last = fwd.args
        _, mean, rstd = ops.group_norm(*fwd.args)
        g = cast(randn(generator("grad" + fwd.name), x.shape), dtype, device)
        variants = {"all": [True, w is not None, b is not None]}
        if f.variants:
            variants.update(input_only=[True, False, False], params_only=[False, True, True], double=[True, True, True])
        for variant, output_mask in variants.items():
            sample = Sample(
                f"{fwd.name}-{variant}", (g, x, mask, w, mean, rstd, groups, channels_last, output_mask),
                grad_args=(0, 1, 3),
            )
            out.append(sample.with_grad() if variant == "double" else sample)
    return out


def instance_norm(device="cpu", dtype=torch.float32) -> List[Sample]:
    out = []
    for name, case, affine, running in _INSTANCE_NORM:
        x, mask = inputs(case, dtype=dtype, device=device)
        w, b = affine_params(case.C, name, dtype=dtype, device=device) if affine else (None, None)
        rm, rv = (None, None)
        if running:
            gen = generator("running" + name)
            rm = cast(randn(gen, (case.C,), scale=0.1), torch.float32, device)
            rv = cast(uniform(gen, (case.C,), 0.5, 1.5), torch.float32, device)
        out.append(Sample(
            f"{name}-{_dt(dtype)}", (x, mask, w, b, rm, rv, 0.1, 1e-5, case.channels_last), grad_args=(0, 2, 3)
        ))
    return out


SAMPLES: Dict[str, Callable[..., List[Sample]]] = {
    "group_norm": group_norm,
    "group_norm_backward": group_norm_backward,
    "instance_norm": instance_norm,
}

WRONG = {
    "group_norm": ("NCL-g3-float32", (1, 2, 3)),
    "group_norm_backward": ("NCL-g3-float32-all", (0, 2, 3, 4, 5)),
    "instance_norm": ("NCL-float32", (1, 2, 3, 4, 5)),
}
