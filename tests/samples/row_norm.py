"""Sample inputs for the row norms: layer_norm, rms_norm, layer_norm_backward
and rms_norm_backward (RMS norm is layer norm with the mean fixed at 0 and no
bias; both normalize each row over the trailing ``normalized_shape`` dims).

* ``Case``: an input shape, its ``normalized_shape`` and a mask kind (the
  mask has the leading dims, ``shape[:-len(normalized_shape)]``);
  ``inputs(case)`` makes it. ``PARITY_CASES`` have odd widths (not a multiple
  of 16), a 1-D, 2-D and 3-D mask and a 2-D ``normalized_shape``;
  ``EDGE_CASES`` width 1, a length-1 sequence, one sequence, an empty batch;
  ``SMALL_CASES`` are gradcheck-sized.
* ``SAMPLES[op](device, dtype)``: the op's samples over those cases, affine
  variants (weight and bias, weight only, none) and eps (eps=None for RMS).
* ``WRONG[op]``: the sample and argument positions error tests corrupt.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from samples.common import DTYPE_NAMES, MASKS, Sample, cast, generator, inputs, randn, uniform

ops = torch.ops.masknorm


class Case(NamedTuple):
    """A row-norm input: shape, normalized_shape and mask kind."""

    shape: Tuple[int, ...]
    ns: Tuple[int, ...]
    mask: Optional[str] = "padded"

    @property
    def name(self) -> str:
        dims = "x".join(map(str, self.shape))
        return f"{dims}_ns{'x'.join(map(str, self.ns))}_{self.mask or 'no_mask'}"

    @property
    def mask_shape(self) -> Tuple[int, ...]:
        return self.shape[: len(self.shape) - len(self.ns)]

    def __repr__(self) -> str:
        return self.name


# name -> (shape, normalized_shape): odd widths, masks of 1, 2 and 3 dims
PARITY_SHAPES = {
    "rows": ((7, 19), (19,)),
    "seq": ((5, 7, 19), (19,)),
    "ns2": ((3, 5, 3, 7), (3, 7)),
    "rows_ns2": ((6, 3, 7), (3, 7)),
    "mask3d": ((2, 3, 4, 19), (19,)),
}
PARITY_CASES = [Case(*PARITY_SHAPES[name], mask) for name in PARITY_SHAPES for mask in MASKS]
EDGE_CASES = [
    Case((5, 4, 1), (1,)), Case((6, 1, 19), (19,)), Case((1, 7, 19), (19,)), Case((0, 5, 19), (19,), None),
    Case((0, 5, 19), (19,), "none_padded"),
]
SMALL_SHAPES = {"rows": ((6, 5), (5,)), "seq": ((3, 4, 5), (5,)), "ns2": ((3, 4, 2, 3), (2, 3))}
SMALL_CASES = [Case(*SMALL_SHAPES[name], mask) for name in SMALL_SHAPES for mask in MASKS]


def parity_case(name: str, mask: Optional[str] = "padded") -> Case:
    return Case(*PARITY_SHAPES[name], mask)


def affine_params(ns, name: str, *, dtype=torch.float32, device="cpu"):
    """(weight, bias) of shape ``ns`` with reasonable values."""
    gen = generator("affine" + name)
    return cast(uniform(gen, ns, 0.5, 1.5), dtype, device), cast(uniform(gen, ns, -0.5, 0.5), dtype, device)


class Forward(NamedTuple):
    """A forward sample: affine is "affine" (weight, and bias for LN),
    "weight" or "none"; eps is LN's (RMS: None where ``rms_eps_none``);
    variants: its backward samples include input-only, parameters-only and
    double-backward ones."""

    name: str
    case: Case
    affine: str = "affine"
    eps: float = 1e-5
    rms_eps_none: bool = False
    variants: bool = False


_FORWARD = [Forward(c.name, c, rms_eps_none=c.mask == "padded", variants=c.mask == "padded" and len(c.ns) == 1)
            for c in SMALL_CASES] + [
    Forward("weight-only", Case(*SMALL_SHAPES["seq"]), "weight", rms_eps_none=True, variants=True),
    Forward("no-affine", Case(*SMALL_SHAPES["ns2"]), "none", eps=1e-3),
    Forward("width1", EDGE_CASES[0]),
    Forward("len1", EDGE_CASES[1], "weight"),
    Forward("empty", EDGE_CASES[3]),
    Forward("empty-masked", EDGE_CASES[4], rms_eps_none=True),
    Forward("mask3d", Case((2, 3, 2, 5), (5,))),
]


def _suffix(dtype) -> str:
    return DTYPE_NAMES[dtype]


def _forward_sample(norm: str, f: Forward, device, dtype) -> Sample:
    x, mask = inputs(f.case, dtype=dtype, device=device)
    w, b = affine_params(f.case.ns, f.name, dtype=dtype, device=device)
    w = w if f.affine != "none" else None
    ns = list(f.case.ns)
    name = f"{f.name}-{_suffix(dtype)}"
    if norm == "layer_norm":
        return Sample(name, (x, ns, mask, w, b if f.affine == "affine" else None, f.eps), grad_args=(0, 3, 4))
    eps = None if f.rms_eps_none else f.eps
    return Sample(name + ("-eps_none" if eps is None else ""), (x, ns, mask, w, eps), grad_args=(0, 3))


def layer_norm(device="cpu", dtype=torch.float32) -> List[Sample]:
    return [_forward_sample("layer_norm", f, device, dtype) for f in _FORWARD]


def rms_norm(device="cpu", dtype=torch.float32) -> List[Sample]:
    return [_forward_sample("rms_norm", f, device, dtype) for f in _FORWARD]


def _backward(norm: str, device, dtype) -> List[Sample]:
    """For the forward samples (but those with an all-False mask), all
    gradients; for some also input-only, parameters-only, and "double"
    (grad_output, input and weight require grad: the differentiable composite
    that double backward runs)."""
    out = []
    forward_op = getattr(ops, norm)
    for f in _FORWARD:
        if f.case.mask == "none_padded" and f.case.shape[0] and not f.variants:
            continue  # the all-False mask: the forward samples have it
        fwd = _forward_sample(norm, f, device, dtype)
        x, ns, mask, w = fwd.args[:4]
        stats = forward_op(*fwd.args)[1:]  # (mean, rstd) or (rstd,)
        g = cast(randn(generator("grad" + fwd.name), x.shape), dtype, device)
        has_bias = norm == "layer_norm" and fwd.args[4] is not None
        params = [w is not None] + ([has_bias] if norm == "layer_norm" else [])
        variants = {"all": [True] + params}
        if f.variants:
            variants.update(input_only=[True] + [False] * len(params), double=[True] + params)
            if w is not None:
                variants["params_only"] = [False] + params
        for variant, output_mask in variants.items():
            args = (g, x, ns, mask, *stats, w, output_mask)
            w_at = len(args) - 2
            sample = Sample(f"{fwd.name}-{variant}", args, grad_args=(0, 1, w_at))
            out.append(sample.with_grad() if variant == "double" else sample)
    return out


def layer_norm_backward(device="cpu", dtype=torch.float32) -> List[Sample]:
    return _backward("layer_norm", device, dtype)


def rms_norm_backward(device="cpu", dtype=torch.float32) -> List[Sample]:
    return _backward("rms_norm", device, dtype)


SAMPLES: Dict[str, Callable[..., List[Sample]]] = {
    "layer_norm": layer_norm,
    "layer_norm_backward": layer_norm_backward,
    "rms_norm": rms_norm,
    "rms_norm_backward": rms_norm_backward,
}

# op -> (the float32 sample whose arguments error tests corrupt, positions corrupted)
WRONG = {
    "layer_norm": ("3x4x5_ns5_padded-float32", (2, 3, 4)),
    "layer_norm_backward": ("3x4x5_ns5_padded-float32-all", (0, 3, 4, 5, 6)),
    "rms_norm": ("3x4x5_ns5_none_padded-float32", (2, 3)),
    "rms_norm_backward": ("3x4x5_ns5_padded-float32-eps_none-all", (0, 3, 4, 5)),
}
