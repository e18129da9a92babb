"""Sample inputs for the batch-norm ops: batch_norm, batch_norm_backward and
the stages batch_norm_stats, batch_norm_merge_stats, batch_norm_elemt,
batch_norm_backward_reduce and batch_norm_backward_elemt.

* ``Case``: an input, by layout (helpers' NC / NCL / NLC), sizes and mask
  kind; ``inputs(case)`` makes it. ``PARITY_CASES`` have odd sizes and C not a
  multiple of 16, ``EDGE_CASES`` size-1 dims and empty batches, ``SMALL_CASES``
  are gradcheck-sized.
* ``SAMPLES[op](device, dtype)``: the op's samples (``Sample``) in ``dtype``,
  over the three layouts, the masks, affine on/off, training/eval, running
  statistics with momentum or cumulative average; the backward and stage
  samples are made from the same cases (their saved statistics by the ops).
* ``WRONG[op]``: the sample and argument positions that error tests corrupt.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from helpers import BN_LAYOUTS, bn_input_shape, bn_mask_shape, is_channels_last
from samples.common import DTYPE_NAMES, MASKS, Sample, cast, generator, inputs, randn, uniform

ops = torch.ops.masknorm
EPS = 1e-5


class Case(NamedTuple):
    """A batch-norm input: layout, sizes (L is 1 for NC) and mask kind."""

    layout: str
    N: int
    C: int
    L: int = 1
    mask: Optional[str] = "padded"

    @property
    def name(self) -> str:
        sizes = f"{self.N}x{self.C}" if self.layout == "NC" else f"{self.N}x{self.C}x{self.L}"
        return f"{self.layout}_{sizes}_{self.mask or 'no_mask'}"

    @property
    def shape(self) -> Tuple[int, ...]:
        return bn_input_shape(self.layout, self.N, self.C, self.L)

    @property
    def mask_shape(self) -> Tuple[int, ...]:
        return bn_mask_shape(self.layout, self.N, self.L)

    @property
    def channels_last(self) -> bool:
        return is_channels_last(self.layout)

    def __repr__(self) -> str:
        return self.name


# odd sizes, C not a multiple of 16 (vector tails)
PARITY_SIZES = {"NC": (13, 19, 1), "NCL": (5, 19, 7), "NLC": (5, 19, 7)}
PARITY_CASES = [Case(lay, *PARITY_SIZES[lay], mask) for lay in BN_LAYOUTS for mask in MASKS]
# size-1 dims and empty batches
EDGE_CASES = [
    Case("NC", 6, 1), Case("NCL", 4, 1, 6), Case("NLC", 6, 5, 1), Case("NCL", 1, 3, 9), Case("NLC", 1, 3, 9),
    Case("NC", 0, 3, 1, None), Case("NCL", 0, 3, 4, "none_padded"), Case("NLC", 0, 3, 4, None),
]
SMALL_SIZES = {"NC": (6, 3, 1), "NCL": (3, 3, 4), "NLC": (3, 3, 4)}
SMALL_CASES = [Case(lay, *SMALL_SIZES[lay], mask) for lay in BN_LAYOUTS for mask in MASKS]


def parity_case(layout: str, mask: Optional[str] = "padded") -> Case:
    return Case(layout, *PARITY_SIZES[layout], mask)


def small_case(layout: str, mask: Optional[str] = "padded") -> Case:
    return Case(layout, *SMALL_SIZES[layout], mask)


def features(C: int, name: str, *, dtype=torch.float32, device="cpu"):
    """(weight, bias, running_mean, running_var) with reasonable values."""
    gen = generator("features" + name)
    w, b = uniform(gen, C, 0.5, 1.5), uniform(gen, C, -0.5, 0.5)
    rm, rv = uniform(gen, C, -0.5, 0.5), uniform(gen, C, 0.5, 2.0)
    return tuple(cast(t, dtype, device) for t in (w, b, rm, rv))


def _suffix(dtype) -> str:
    return DTYPE_NAMES[dtype]


# ------------------------------------------------------------------ batch_norm

class Forward(NamedTuple):
    """A batch_norm sample: affine is "affine" (weight and bias), "weight" or
    "none"; running is None, "momentum" (0.1, num_batches_tracked given) or
    "cumulative" (momentum None); variants: its backward samples include
    input-only, parameters-only and double-backward ones."""

    name: str
    case: Case
    training: bool
    affine: str
    running: Optional[str]
    variants: bool = False


_FORWARD = [
    Forward(f"train-{c.name}", c, True, "affine", None, c.mask == "padded" and c.layout == "NCL") for c in SMALL_CASES
] + [
    Forward("train-running-NCL", small_case("NCL"), True, "affine", "momentum"),
    Forward("train-running-NC", small_case("NC", None), True, "weight", "momentum"),
    Forward("train-cumulative-NLC", small_case("NLC"), True, "weight", "cumulative", True),
    Forward("train-no-affine-NCL", small_case("NCL"), True, "none", "momentum"),
    Forward("eval-NC", small_case("NC"), False, "affine", "momentum", True),
    Forward("eval-NCL", small_case("NCL"), False, "weight", "momentum"),
    Forward("eval-NLC", small_case("NLC", None), False, "none", "momentum"),
    Forward("train-C1-NCL", Case("NCL", 4, 1, 6), True, "affine", "momentum"),
    Forward("train-L1-NLC", Case("NLC", 6, 5, 1), True, "affine", None),
    Forward("train-N1-NLC", Case("NLC", 1, 3, 9), True, "affine", "cumulative"),
    Forward("train-empty-NCL", Case("NCL", 0, 3, 4, "none_padded"), True, "affine", "momentum"),
    Forward("eval-empty-NLC", Case("NLC", 0, 3, 4, None), False, "affine", "momentum"),
]


def _forward_sample(f: Forward, device, dtype) -> Sample:
    x, mask = inputs(f.case, dtype=dtype, device=device)
    w, b, rm, rv = features(f.case.C, f.name, dtype=dtype, device=device)
    nbt = torch.tensor(2, device=device) if f.running else None
    momentum = None if f.running == "cumulative" else 0.1
    args = (
        x, mask, w if f.affine != "none" else None, b if f.affine == "affine" else None,
        rm if f.running else None, rv if f.running else None, nbt, f.training, momentum, EPS, f.case.channels_last,
    )
    return Sample(f"{f.name}-{_suffix(dtype)}", args, grad_args=(0, 2, 3))


def batch_norm(device="cpu", dtype=torch.float32) -> List[Sample]:
    return [_forward_sample(f, device, dtype) for f in _FORWARD]


def batch_norm_backward(device="cpu", dtype=torch.float32) -> List[Sample]:
    """For the forward samples (but those with an all-False mask), all
    gradients; for some also input-only, parameters-only, and "double"
    (grad_output, input and weight require grad: the differentiable composite
    that double backward runs)."""
    out = []
    for f in _FORWARD:
        if f.case.mask == "none_padded" and f.case.N and not f.variants:
            continue  # the all-False mask: the forward samples have it
        fwd = _forward_sample(f, device, dtype)
        x, mask, w, b, rm, rv, nbt, training, momentum, eps, cl = fwd.args
        _, save_mean, save_invstd = ops.batch_norm(x, mask, w, b, rm, rv, nbt, training, momentum, eps, cl)
        g = cast(randn(generator("grad" + fwd.name), x.shape), dtype, device)
        variants = {"all": [True, w is not None, b is not None]}
        if f.variants:
            variants.update(input_only=[True, False, False], double=[True, w is not None, b is not None])
            if w is not None:
                variants["params_only"] = [False, True, b is not None]
        for variant, output_mask in variants.items():
            args = (g, x, mask, w, save_mean, save_invstd, training, cl, output_mask)
            sample = Sample(f"{fwd.name}-{variant}", args, grad_args=(0, 1, 3))
            out.append(sample.with_grad() if variant == "double" else sample)
    return out


# ---------------------------------------------------------------------- stages

_STAGE_CASES = SMALL_CASES + [
    Case("NCL", 4, 1, 6), Case("NLC", 6, 5, 1), Case("NLC", 1, 3, 9), Case("NC", 0, 3, 1, None),
    Case("NCL", 0, 3, 4, "none_padded"),
]


def batch_norm_stats(device="cpu", dtype=torch.float32) -> List[Sample]:
    out = []
    for case in _STAGE_CASES:
        x, mask = inputs(case, dtype=dtype, device=device)
        out.append(Sample(f"{case.name}-{_suffix(dtype)}", (x, mask, case.channels_last)))
    return out


def parts_of(case: Case, splits: List[int], *, dtype=torch.float32, device="cpu"):
    """The input of ``case`` cut along N into parts of ``splits`` sequences,
    and each part's (mean, m2, count) from batch_norm_stats, stacked: (P, C),
    (P, C), (P,). Returns (x, mask, mean, m2, count)."""
    x, mask = inputs(case, dtype=dtype, device=device)
    masks = mask.split(splits) if mask is not None else [None] * len(splits)
    stats = [ops.batch_norm_stats(xp, mp, case.channels_last) for xp, mp in zip(x.split(splits), masks)]
    mean, m2, count = (torch.stack(t) for t in zip(*stats))
    return x, mask, mean, m2, count


MERGE_CASE = Case("NCL", 7, 5, 6)
MERGE_SPLITS = [2, 1, 2, 2]  # part 1 is the fully padded sequence: count 0


def with_empty_parts(mean, m2, count):
    """Copies where parts 1 and 3 have count 0, holding NaN (part 1) and
    garbage (part 3) as mean and m2."""
    mean, m2, count = mean.clone(), m2.clone(), count.clone()
    mean[1], m2[1], count[1] = float("nan"), float("nan"), 0
    mean[3], m2[3], count[3] = 1e30, -float("inf"), 0
    return mean, m2, count


def batch_norm_merge_stats(device="cpu", dtype=torch.float32) -> List[Sample]:
    """Parts of a padded NCL batch (one of them empty), with parts of count 0
    whose mean and m2 hold NaN or garbage, float counts, and running
    statistics of several kinds."""
    _, _, mean, m2, count = parts_of(MERGE_CASE, MERGE_SPLITS, dtype=dtype, device=device)
    assert int(count[1]) == 0 and int(count[3]) > 0, count
    _, _, rm, rv = features(MERGE_CASE.C, "merge", dtype=mean.dtype, device=device)
    nbt = torch.tensor(3, device=device)
    empty = with_empty_parts(mean, m2, count)
    nothing = torch.full_like(mean, float("nan")), torch.full_like(m2, float("nan")), torch.zeros_like(count)

    def s(name, *args):
        return Sample(f"{name}-{_suffix(dtype)}", tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))

    return [
        s("parts", mean, m2, count, None, None, None, 0.1, EPS),
        s("one_part", mean[:1], m2[:1], count[:1], None, None, None, 0.1, EPS),
        s("empty_parts", *empty, None, None, None, 0.1, EPS),
        s("float_counts", mean, m2, count.to(mean.dtype), None, None, None, 0.1, EPS),
        s("running_momentum", mean, m2, count, rm, rv, None, 0.3, EPS),
        s("running_empty_parts", *empty, rm, rv, nbt, 0.1, EPS),
        s("running_cumulative", mean, m2, count, rm, rv, nbt, None, EPS),
        s("running_total_zero", *nothing, rm, rv, nbt, 0.1, EPS),
        s("running_float16_strided", mean, m2, count.int(), rm.half(), torch.stack([rv, rv], 1)[:, 0], None, 0.1,
          EPS),
        s("nbt_only", mean, m2, count, None, None, nbt, None, EPS),
    ]


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stage_inputs(case: Case, dtype, device):
    """(grad_output, x, mask, mean, invstd, count, weight, bias) for the
    elementwise and backward stages: the batch's mean and count (from
    batch_norm_stats), an invstd and parameters of their own."""
    x, mask = inputs(case, dtype=dtype, device=device)
    mean, _, count = ops.batch_norm_stats(x, mask, case.channels_last)
    w, b, _, var = features(case.C, case.name, dtype=dtype, device=device)
    g = cast(randn(generator("grad" + case.name), x.shape), dtype, device)
    return g, x, mask, mean, var.rsqrt().to(_stat_dtype(dtype)), count, w, b


def batch_norm_elemt(device="cpu", dtype=torch.float32) -> List[Sample]:
    out = []
    for i, case in enumerate(_STAGE_CASES):
        _, x, mask, mean, invstd, _, w, b = _stage_inputs(case, dtype, device)
        affine = ("affine", "weight", "none")[i % 3]
        args = (x, mask, w if affine != "none" else None, b if affine == "affine" else None, mean, invstd,
                case.channels_last)
        out.append(Sample(f"{case.name}-{affine}-{_suffix(dtype)}", args))
    return out


def batch_norm_backward_reduce(device="cpu", dtype=torch.float32) -> List[Sample]:
    out = []
    for case in _STAGE_CASES:
        g, x, mask, mean, invstd, _, _, _ = _stage_inputs(case, dtype, device)
        out.append(Sample(f"{case.name}-{_suffix(dtype)}", (g, x, mask, mean, invstd, case.channels_last)))
    return out


def batch_norm_backward_elemt(device="cpu", dtype=torch.float32) -> List[Sample]:
    """With the sums and an int64 count (batch statistics), with a float
    count, and without (given statistics); with and without weight."""
    out = []
    for i, case in enumerate(_STAGE_CASES):
        g, x, mask, mean, invstd, count, w, _ = _stage_inputs(case, dtype, device)
        sum_dy, sum_dy_xhat = ops.batch_norm_backward_reduce(g, x, mask, mean, invstd, case.channels_last)
        kind = ("int_count", "float_count", "given_stats")[i % 3]
        sums = {"int_count": (sum_dy, sum_dy_xhat, count), "float_count": (sum_dy, sum_dy_xhat, count.double()),
                "given_stats": (None, None, None)}[kind]
        args = (g, x, mask, w if i % 2 == 0 else None, mean, invstd, *sums, case.channels_last)
        out.append(Sample(f"{case.name}-{kind}-{_suffix(dtype)}", args))
    return out


SAMPLES: Dict[str, Callable[..., List[Sample]]] = {
    "batch_norm": batch_norm,
    "batch_norm_backward": batch_norm_backward,
    "batch_norm_stats": batch_norm_stats,
    "batch_norm_merge_stats": batch_norm_merge_stats,
    "batch_norm_elemt": batch_norm_elemt,
    "batch_norm_backward_reduce": batch_norm_backward_reduce,
    "batch_norm_backward_elemt": batch_norm_backward_elemt,
}

# op -> (the float32 sample whose arguments error tests corrupt, positions corrupted)
WRONG = {
    "batch_norm": ("train-running-NCL-float32", (1, 2, 3, 4, 5, 6)),
    "batch_norm_backward": ("train-NCL_3x3x4_padded-float32-all", (0, 2, 3, 4, 5)),
    "batch_norm_stats": ("NCL_3x3x4_padded-float32", (1,)),
    "batch_norm_merge_stats": ("running_cumulative-float32", (1, 2, 3, 4, 5)),
    "batch_norm_elemt": ("NC_6x3_no_mask-affine-float32", (1, 2, 3, 4, 5)),
    "batch_norm_backward_reduce": ("NLC_3x3x4_padded-float32", (0, 2, 3, 4)),
    "batch_norm_backward_elemt": ("NC_6x3_no_mask-int_count-float32", (0, 2, 3, 4, 5, 6, 7, 8)),
}
