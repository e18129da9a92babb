"""Fuzz test of every raw op (torch.ops.masknorm.*, the batch-norm stage ops
included) with malformed arguments. Each case states what must happen:

* ``raises``: an exception whose message names the argument (the ops' own
  checks say ``masknorm::<op>: expected <argument> ...``; arguments of the
  wrong Python type are named by torch's argument parser), or
* an accepted call: the result of the same call on well-formed copies of the
  arguments (contiguous tensors with the same values), or of a reference the
  case names (torch's own functions, a float64 formula).

The cases (``fuzz_cases()``), built from each op's schema and the samples'
well-formed calls (``samples.WRONG``):

* every tensor argument: one size too many, one dim too many, a wrong dtype
  (``samples.wrong_cases``), on another device ("meta": a CPU-only machine's
  second device), None where a tensor is required, a Python list; masks
  holding bytes other than 0 and 1;
  broadcast (stride 0) and overlapping (``as_strided``) views of the inputs an
  op reads; expanded, shared or aliased tensors an op updates in place;
* the input of each op: integer, bool and complex dtypes, too few and too many dims;
* eps: NaN, +-inf, negative, 0, huge (1e300) and tiny (1e-30);
* momentum: negative, above 1, NaN, inf, and the edges 0 and 1;
* normalized_shape: empty, zero, negative, too long, huge, not the input's;
* counts: fractional, NaN, inf, negative, huge, overflowing totals;
* zero-size inputs (no channels, no positions, no rows) and NaN/inf values
  at valid positions (propagated as torch propagates them).

Every case runs here, in this process, with the native and the generic
kernels; those that do not depend on data values run through the fake kernels
on the meta device as well (same exception, or outputs of the real shapes and
dtypes). ``test_no_case_crashes_a_fresh_process`` runs all of them once more
in a child process (``python tests/test_fuzz.py``), so that a crash (a
segfault, an abort, a floating-point exception) fails the run with the case
that caused it, even where it would take this process down.
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # as a script: helpers, samples

import masknorm  # noqa: E402,F401  (registers the ops)
import samples  # noqa: E402
from samples.common import by_name, noncanonical_bool  # noqa: E402

pytestmark = pytest.mark.slow  # every raw op against 1,400 malformed calls, and again in a child process

ops = torch.ops.masknorm
ERR = (RuntimeError, ValueError, TypeError)
BAD_EPS = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf"), "negative": -1e-5}
BAD_MOMENTUM = {"negative": -0.1, "above_1": 1.5, "nan": float("nan"), "inf": float("inf")}
BAD_COUNTS = {"fraction": 2.5, "nan": float("nan"), "inf": float("inf"), "negative": -1, "huge": 1e30,
              "int64_max": 2**63 - 1}


@dataclasses.dataclass
class Fuzz:
    """One malformed call. ``raises``: a regex of what the error message must
    name (None: the call is accepted). ``reference``: the expected outputs of
    an accepted call (default: the call on well-formed copies of its
    arguments). ``meta``: also through the fake kernel (the case does not
    depend on data values)."""

    name: str
    op: str
    args: tuple
    raises: Optional[str] = None
    reference: Optional[Callable[[], Any]] = None
    meta: bool = True
    own_check: bool = True  # the error comes from masknorm's checks: "masknorm::<op>: expected ..."
    check: Optional[Callable[[tuple, tuple], None]] = None  # (arguments before, after the call): in-place updates

    def __repr__(self) -> str:
        return self.name

    def call(self, args=None):
        return getattr(ops, self.op)(*(self.args if args is None else args))


# ---------------------------------------------------------------------------
# building the cases
# ---------------------------------------------------------------------------


def schema(op: str):
    return getattr(ops, op).default._schema.arguments


def arg_names(op: str) -> List[str]:
    return [a.name for a in schema(op)]


def is_tensor_arg(op: str, i: int) -> bool:
    return "Tensor" in str(schema(op)[i].type)


def is_mutable_arg(op: str, i: int) -> bool:
    info = schema(op)[i].alias_info
    return info is not None and info.is_write


def is_optional_arg(op: str, i: int) -> bool:
    return isinstance(schema(op)[i].type, torch.OptionalType)


def main_input(op: str) -> str:
    """The op's input (the first argument of an op without one: merge_stats' mean)."""
    names = arg_names(op)
    return "input" if "input" in names else names[0]


def base_sample(op: str):
    """The op's well-formed float32 CPU call that samples.WRONG corrupts."""
    name, _ = samples.WRONG[op]
    return by_name(samples.SAMPLES[op](), name)


def fresh(args: Sequence) -> tuple:
    """Copies of the tensor arguments (an accepted call updating running
    statistics in place must not change the case for the next run). Views with
    internal overlap are read-only arguments here: kept as they are."""
    def copy(v):
        if isinstance(v, torch.Tensor) and v.device.type != "meta" and torch._debug_has_internal_overlap(v) == 0:
            return v.clone()
        return v
    return tuple(copy(v) for v in args)


def well_formed(args: Sequence) -> tuple:
    """The arguments with every tensor contiguous (same values, own memory),
    bool tensors holding only the bytes 0 and 1."""
    def form(v):
        if not isinstance(v, torch.Tensor) or v.device.type == "meta":
            return v
        if v.dtype == torch.bool:
            return v.contiguous().view(torch.uint8) != 0
        return v.contiguous().clone()
    return tuple(form(v) for v in args)


def replaced(args: Sequence, i: int, value) -> tuple:
    args = list(args)
    args[i] = value
    return tuple(args)


def broadcast_view(t: torch.Tensor) -> torch.Tensor:
    """A stride-0 view of t's shape: t's first slice along dim 0, expanded."""
    return t[:1].expand(t.shape)


def overlapping_view(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A view of t's shape and dtype whose elements overlap: every stride 1,
    over fresh values (element [i, j, k] is base[i + j + k])."""
    size = sum(n - 1 for n in t.shape) + 1
    if t.dtype == torch.bool:
        base = torch.rand(size, generator=gen) < 0.4
    elif t.dtype.is_floating_point:
        base = torch.randn(size, generator=gen, dtype=torch.float64).abs().add(0.5).to(t.dtype)
    else:
        base = torch.randint(0, 5, (size,), generator=gen).to(t.dtype)
    return base.as_strided(t.shape, (1,) * t.dim())


def _ref_bn_forward(args):
    """nn.functional.batch_norm on the packed valid tokens (masked batch norm's
    definition), with fresh copies of the running statistics."""
    x, mask, w, b, rm, rv, nbt, training, momentum, eps, cl = args
    rm = None if rm is None else rm.clone()
    rv = None if rv is None else rv.clone()
    rows = x if x.dim() == 2 or cl else x.transpose(1, 2)
    packed = rows.reshape(-1, rows.shape[-1]) if mask is None else rows[~mask]
    y = F.batch_norm(packed.double(), None if rm is None else rm.double(), None if rv is None else rv.double(),
                     None if w is None else w.double(), None if b is None else b.double(), training,
                     0.0 if momentum is None else momentum, eps)
    out = torch.zeros(rows.shape, dtype=torch.float64)
    if mask is None:
        out = y.reshape(rows.shape)
    else:
        out[~mask] = y
    return out if x.dim() == 2 or cl else out.transpose(1, 2)


def _ref_row_forward(args, centered):
    x, ns, mask = args[:3]
    if centered:
        w, b, eps = args[3:6]
        fn = lambda t: F.layer_norm(t, ns, None if w is None else w.double(), None if b is None else b.double(), eps)  # noqa
    else:
        w, eps = args[3:5]
        fn = lambda t: F.rms_norm(t, ns, None if w is None else w.double(), eps)  # noqa
    x = x.double()
    if mask is None:
        return fn(x)
    out = torch.zeros_like(x)
    out[~mask] = fn(x[~mask])
    return out


def _merge_reference(args):
    """(mean, invstd, count) of merged parts, in float64 from the formula."""
    mean, m2, count, _, _, _, _, eps = args
    n = count.double()
    keep = n > 0
    total = n.sum()
    mu = (mean.double() * n[:, None])[keep].sum(0) / total.clamp_min(1)
    m2_total = (m2.double() + n[:, None] * (mean.double() - mu) ** 2)[keep].sum(0)
    invstd = torch.where(total > 0, (m2_total / total.clamp_min(1) + eps).rsqrt(), torch.zeros(()))
    return mu, invstd, total.long()


FORWARD_REFERENCES: Dict[str, Callable] = {
    "batch_norm": lambda args: (_ref_bn_forward(args),),
    "layer_norm": lambda args: (_ref_row_forward(args, True),),
    "rms_norm": lambda args: (_ref_row_forward(args, False),),
    "batch_norm_merge_stats": _merge_reference,
}


# eps = 0 is refused where a batch's variance is normalized in training (as nn.BatchNorm1d refuses it)
EPS_ZERO_REFUSED = {"batch_norm-train", "batch_norm_merge_stats"}


def _eps_cases() -> Iterator[Fuzz]:
    """Every op with an eps argument (batch_norm in training and in eval)."""
    bases = {op: base_sample(op) for op in samples.OPS if "eps" in arg_names(op)}
    bases["batch_norm-train"] = bases.pop("batch_norm")
    bases["batch_norm-eval"] = by_name(samples.SAMPLES["batch_norm"](), "eval-NC-float32")
    for key, sample in bases.items():
        op = key.split("-")[0]
        at = arg_names(op).index("eps")
        values = dict(BAD_EPS, zero=0.0, huge=1e300, tiny=1e-30)
        for what, eps in values.items():
            args = replaced(sample.args, at, eps)
            if what in BAD_EPS or (what == "zero" and key in EPS_ZERO_REFUSED):
                yield Fuzz(f"{key}-eps_{what}", op, args, raises="eps")
            elif op in FORWARD_REFERENCES:
                ref = FORWARD_REFERENCES[op]
                yield Fuzz(f"{key}-eps_{what}", op, args, reference=lambda args=args, ref=ref: ref(fresh(args)))
            else:
                yield Fuzz(f"{key}-eps_{what}", op, args)


def _momentum_cases() -> Iterator[Fuzz]:
    """Every op with a momentum argument: out of [0, 1] raises; the edges 0 and
    1 update the running statistics as the formula says (the ops with one here)."""
    bases = {op: base_sample(op) for op in samples.OPS if "momentum" in arg_names(op)}
    bases["batch_norm_merge_stats"] = by_name(samples.SAMPLES["batch_norm_merge_stats"](), "running_momentum-float32")
    for op, sample in bases.items():
        at = arg_names(op).index("momentum")
        for what, momentum in BAD_MOMENTUM.items():
            yield Fuzz(f"{op}-momentum_{what}", op, replaced(sample.args, at, momentum), raises="momentum")
        if op in RUNNING_STATS_OPS:
            for momentum in (0.0, 1.0):
                yield Fuzz(f"{op}-momentum_{momentum}", op, replaced(sample.args, at, momentum),
                           reference=lambda: None, check=_running_stats_check(op, momentum))


RUNNING_STATS_OPS = ("batch_norm", "batch_norm_merge_stats")  # the ops _running_stats_check knows


def _running_stats_check(op: str, momentum: float):
    """The running statistics after the call: (1 - momentum) * before +
    momentum * the batch's (unbiased variance), from float64 statistics."""
    def check(before, after):
        if op == "batch_norm":
            x, mask, rm_at, rv_at = before[0], before[1], 4, 5
            rows = x if x.dim() == 2 or before[10] else x.transpose(1, 2)
            packed = (rows.reshape(-1, rows.shape[-1]) if mask is None else rows[~mask]).double()
            mean, var = packed.mean(0), packed.var(0)
        else:
            rm_at, rv_at = 3, 4
            mean, invstd, count = _merge_reference(before)
            m2 = (before[1].double() + before[2].double()[:, None] * (before[0].double() - mean) ** 2).sum(0)
            var = m2 / (count - 1)
        for at, batch in ((rm_at, mean), (rv_at, var)):
            expected = (1 - momentum) * before[at].double() + momentum * batch
            torch.testing.assert_close(after[at].double(), expected, rtol=1e-6, atol=1e-7)
    return check


def _normalized_shape_cases() -> Iterator[Fuzz]:
    for op in (op for op in samples.OPS if "normalized_shape" in arg_names(op)):
        sample = base_sample(op)
        at = arg_names(op).index("normalized_shape")
        x = sample.args[arg_names(op).index("input")]
        D = x.shape[-1]
        bad = {"empty": [], "zero": [0], "negative": [-D], "not_trailing": [D + 1], "huge": [2**62],
               "too_long": [1] * (x.dim() + 1), "two_dims_wrong": [2, D]}
        for what, ns in bad.items():
            yield Fuzz(f"{op}-normalized_shape_{what}", op, replaced(sample.args, at, ns), raises="normalized_shape")


def _count_cases() -> Iterator[Fuzz]:
    """Every op with a count argument (a tensor of whole numbers)."""
    bases = {op: base_sample(op) for op in samples.OPS if "count" in arg_names(op)}
    bases["batch_norm_merge_stats"] = by_name(samples.SAMPLES["batch_norm_merge_stats"](), "running_cumulative-float32")
    for op, sample in bases.items():
        at = arg_names(op).index("count")
        for what, value in BAD_COUNTS.items():
            dtype = torch.float64 if isinstance(value, float) else torch.long
            count = sample.args[at].to(dtype)
            count.view(-1)[0] = value
            yield Fuzz(f"{op}-count_{what}", op, replaced(sample.args, at, count), raises="count", meta=False)
    merge = bases["batch_norm_merge_stats"]
    total = torch.tensor([2**62, 2**62, 0, 0])
    yield Fuzz("batch_norm_merge_stats-count_total_overflows", "batch_norm_merge_stats",
               replaced(merge.args, 2, total), raises="count", meta=False)


def _tensor_argument_cases(op: str) -> Iterator[Fuzz]:
    """Per tensor argument of the op's base call: another device, None where
    required, a Python list, and broadcast / overlapping views (inputs read),
    or expanded views (tensors updated in place)."""
    sample = base_sample(op)
    names = arg_names(op)
    gen = torch.Generator().manual_seed(len(op))
    tensor_names = [n for i, n in enumerate(names) if is_tensor_arg(op, i)]
    for i, name in enumerate(names):
        if not is_tensor_arg(op, i):
            continue
        t = sample.args[i]
        if t is None:
            continue
        if name == main_input(op):
            # the input (or first tensor) elsewhere: the first argument checked against it is named
            others = "|".join(n for n in tensor_names if n != name and sample.args[names.index(n)] is not None)
            yield Fuzz(f"{op}-{name}_meta", op, replaced(sample.args, i, t.to("meta")), raises=rf"(?:{others})",
                       meta=False)
        else:
            yield Fuzz(f"{op}-{name}_meta", op, replaced(sample.args, i, t.to("meta")), raises=name, meta=False)
        if not is_optional_arg(op, i):
            yield Fuzz(f"{op}-{name}_none", op, replaced(sample.args, i, None), raises=name, meta=False)
        yield Fuzz(f"{op}-{name}_list", op, replaced(sample.args, i, t.tolist()), raises=name, own_check=False,
                   meta=False)
        if is_mutable_arg(op, i):
            if t.dim() >= 1 and t.shape[0] > 1:
                yield Fuzz(f"{op}-{name}_expanded", op, replaced(sample.args, i, broadcast_view(t)), raises=name,
                           meta=False)
            continue
        if t.dim() >= 1 and t.shape[0] > 1:
            yield Fuzz(f"{op}-{name}_broadcast", op, replaced(sample.args, i, broadcast_view(t)))
        if t.dim() >= 2:
            yield Fuzz(f"{op}-{name}_overlapping", op, replaced(sample.args, i, overlapping_view(t, gen)))
        if t.dtype == torch.bool and bool(t.any()):
            # bytes 2 and 255 where True (a uint8 tensor viewed as bool): nonzero is True, as for torch
            yield Fuzz(f"{op}-{name}_bytes_2_255", op, replaced(sample.args, i, noncanonical_bool(t)))


def _aliasing_cases() -> Iterator[Fuzz]:
    """Running statistics updated in place that share memory."""
    bn = by_name(samples.SAMPLES["batch_norm"](), "train-running-NCL-float32")
    merge = by_name(samples.SAMPLES["batch_norm_merge_stats"](), "running_cumulative-float32")
    for op, sample, (rm_at, rv_at, nbt_at) in (("batch_norm", bn, (4, 5, 6)),
                                                ("batch_norm_merge_stats", merge, (3, 4, 5))):
        rm = sample.args[rm_at].clone()
        yield Fuzz(f"{op}-running_var_is_running_mean", op, replaced(replaced(sample.args, rm_at, rm), rv_at, rm),
                   raises="running_var", meta=False)
        first = sample.args[0]
        inside = first.view(-1)[: rm.numel()]
        yield Fuzz(f"{op}-running_mean_inside_{arg_names(op)[0]}", op, replaced(sample.args, rm_at, inside),
                   raises=arg_names(op)[0], meta=False)


def _input_cases(op: str) -> Iterator[Fuzz]:
    """The op's main tensor (input; mean for merge_stats) of a wrong dtype or rank."""
    sample = base_sample(op)
    names = arg_names(op)
    name = main_input(op)
    i = names.index(name)
    t = sample.args[i]
    for dtype in (torch.int32, torch.bool, torch.complex64, torch.float16 if name == "mean" else torch.uint8):
        yield Fuzz(f"{op}-{name}_{dtype}".replace("torch.", ""), op, replaced(sample.args, i, t.to(dtype)),
                   raises=name)
    row_norm = "normalized_shape" in names
    shapes = {"0d": ()} if row_norm else {"0d": (), "1d": (t.shape[-1],), "4d": (2, 3, 4, 5)}
    if name == "mean":
        shapes = {"1d": (t.shape[-1],), "3d": tuple(t.shape) + (2,)}
    for what, shape in shapes.items():
        yield Fuzz(f"{op}-{name}_{what}", op, replaced(sample.args, i, torch.zeros(shape)), raises=name)


def _zero_size_cases() -> Iterator[Fuzz]:
    """No channels, no positions, no rows: accepted, outputs of the fake kernel's shapes."""
    for layout, shape, mask_shape, cl in (("NC", (5, 0), (5,), False), ("NLC", (2, 3, 0), (2, 3), True),
                                         ("NCL", (2, 0, 3), (2, 3), False), ("NCL", (2, 3, 0), (2, 0), False),
                                         ("NLC", (0, 3, 4), (0, 3), True)):
        x = torch.randn(shape)
        C = shape[2] if cl and len(shape) == 3 else shape[1]
        mask = torch.zeros(mask_shape, dtype=torch.bool)
        if mask.numel():
            mask.view(-1)[0] = True
        rm, rv, nbt = torch.zeros(C), torch.ones(C), torch.tensor(0)
        w, b = torch.ones(C), torch.zeros(C)
        name = f"{layout}{'x'.join(map(str, shape))}"
        yield Fuzz(f"batch_norm-train-{name}", "batch_norm", (x, mask, w, b, rm, rv, nbt, True, 0.1, 1e-5, cl),
                   reference=lambda: None)
        yield Fuzz(f"batch_norm-eval-{name}", "batch_norm", (x, mask, w, b, rm, rv, nbt, False, 0.1, 1e-5, cl),
                   reference=lambda: None)
        yield Fuzz(f"batch_norm_stats-{name}", "batch_norm_stats", (x, mask, cl), reference=lambda: None)
        mean, invstd = torch.zeros(C), torch.ones(C)
        yield Fuzz(f"batch_norm_backward-{name}", "batch_norm_backward",
                   (torch.randn(shape), x, mask, w, mean, invstd, True, cl, [True, True, True]), reference=lambda: None)
        yield Fuzz(f"batch_norm_backward_elemt-{name}", "batch_norm_backward_elemt",
                   (torch.randn(shape), x, mask, w, mean, invstd, mean, mean, torch.tensor(3), cl),
                   reference=lambda: None)
    yield Fuzz("batch_norm_merge_stats-no_parts", "batch_norm_merge_stats",
               (torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), None, None, None, 0.1, 1e-5),
               reference=lambda: None)
    for op, extra in (("layer_norm", (None, None, 1e-5)), ("rms_norm", (None, None))):
        for shape in ((0, 5), (3, 0, 5)):
            x = torch.randn(shape)
            yield Fuzz(f"{op}-rows_{'x'.join(map(str, shape))}", op,
                       (x, [5], torch.zeros(shape[:-1], dtype=torch.bool)) + extra, reference=lambda: None)


def _non_finite_value_cases() -> Iterator[Fuzz]:
    """NaN and inf at a valid position: propagated as torch's functions propagate them."""
    from helpers import bn_full_mask, row_full_mask

    bn = samples.SAMPLES["batch_norm"]()
    for key, op, sample in (("batch_norm-train", "batch_norm", by_name(bn, "train-running-NCL-float32")),
                            ("batch_norm-eval", "batch_norm", by_name(bn, "eval-NC-float32")),
                            ("layer_norm", "layer_norm", base_sample("layer_norm")),
                            ("rms_norm", "rms_norm", base_sample("rms_norm"))):
        x = sample.args[0]
        if op == "batch_norm":
            full = bn_full_mask(sample.args[1], x, sample.args[10])
        else:
            full = row_full_mask(sample.args[2], x)
        where = tuple((~full).nonzero()[0].tolist())
        for value in (float("nan"), float("inf")):
            bad = x.clone()
            bad[where] = value
            args = replaced(sample.args, 0, bad)
            ref = FORWARD_REFERENCES[op]
            yield Fuzz(f"{key}-valid_{value}", op, args, reference=lambda args=args, ref=ref: ref(fresh(args)),
                       meta=False)


def fuzz_cases() -> List[Fuzz]:
    cases: List[Fuzz] = []
    for op, arg, what, sample in samples.wrong_cases():
        if what == "device":
            continue  # _tensor_argument_cases moves every tensor argument to meta
        cases.append(Fuzz(f"{op}-{arg}_{what}", op, sample.args, raises=arg, meta=False))
    for op in samples.OPS:
        cases += list(_tensor_argument_cases(op))
        cases += list(_input_cases(op))
    cases += list(_eps_cases())
    cases += list(_momentum_cases())
    cases += list(_normalized_shape_cases())
    cases += list(_count_cases())
    cases += list(_aliasing_cases())
    cases += list(_zero_size_cases())
    cases += list(_non_finite_value_cases())
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    return cases


# ---------------------------------------------------------------------------
# running a case
# ---------------------------------------------------------------------------


def _flat(out) -> List[Optional[torch.Tensor]]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _same(actual, expected, name):
    """Outputs equal: exactly where both come from masknorm, to float32
    rounding against a float64 reference; NaN where the reference has NaN."""
    for k, (a, b) in enumerate(zip(_flat(actual), _flat(expected))):
        if b is None:
            continue
        assert a is not None, f"{name}: output {k} is None"
        if b.dtype == torch.float64 and a.dtype != torch.float64:
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, equal_nan=True, msg=f"{name} out {k}")
        else:
            assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: output {k}"
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0), b.nan_to_num(0)), \
                f"{name}: output {k} differs"


def error_pattern(case: Fuzz) -> str:
    if case.own_check:
        return rf"masknorm::{case.op}\b.*\b(?:{case.raises})\b"
    return rf"\b(?:{case.raises})\b"


def run_case(case: Fuzz) -> None:
    """Runs the case against its expectation (AssertionError if not met)."""
    import re

    if case.raises is not None:
        # nothing is written before the checks: the arguments as they are (aliasing included)
        try:
            case.call()
        except ERR as e:
            assert re.search(error_pattern(case), str(e), re.S), f"{case.name}: {type(e).__name__}: {e}"
            return
        raise AssertionError(f"{case.name}: accepted, but expected an error naming {case.raises}")
    args = fresh(case.args)
    if case.reference is None:
        # the call on well-formed copies of the same values, from the same state
        ref_args = well_formed(fresh(case.args))
        try:
            expected, expected_error = case.call(ref_args), None
        except ERR as e:
            expected, expected_error = None, e
        if expected_error is not None:
            with pytest.raises(type(expected_error)) as info:
                case.call(args)
            assert str(info.value) == str(expected_error)
            return
        _same(case.call(args), expected, case.name)
        for i, (a, b) in enumerate(zip(args, ref_args)):
            if isinstance(a, torch.Tensor) and is_mutable_arg(case.op, i):
                assert torch.equal(a, b), f"{case.name}: {arg_names(case.op)[i]} updated differently"
        return
    actual = case.call(args)
    expected = case.reference()
    if expected is not None:
        _same(actual, expected, case.name)
    if case.check is not None:
        case.check(case.args, args)
    meta = case.call(tuple(v.to("meta") if isinstance(v, torch.Tensor) else v for v in case.args))
    for a, m in zip(_flat(actual), _flat(meta)):
        assert (a is None) == (m is None), case.name
        if a is not None:
            assert a.shape == m.shape and a.dtype == m.dtype, case.name


def run_case_on_meta(case: Fuzz) -> None:
    """The fake kernel on meta copies of the arguments: the same error, or
    outputs of the shapes and dtypes the real call gives."""
    import re

    meta_args = tuple(v.to("meta") if isinstance(v, torch.Tensor) else v for v in case.args)
    if case.raises is not None:
        try:
            case.call(meta_args)
        except ERR as e:
            assert re.search(error_pattern(case), str(e), re.S), f"{case.name} (meta): {type(e).__name__}: {e}"
            return
        raise AssertionError(f"{case.name} (meta): accepted, but expected an error naming {case.raises}")
    real = case.call(fresh(case.args))
    meta = case.call(meta_args)
    for a, m in zip(_flat(real), _flat(meta)):
        assert (a is None) == (m is None), case.name
        if a is not None:
            assert a.shape == m.shape and a.dtype == m.dtype and m.device.type == "meta", case.name


CASES = fuzz_cases()
META_CASES = [c for c in CASES if c.meta]


@pytest.mark.kernels
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_fuzz_case(case):
    run_case(case)


@pytest.mark.parametrize("case", META_CASES, ids=repr)
def test_fuzz_case_through_the_fake_kernel(case):
    run_case_on_meta(case)


def test_every_op_is_fuzzed():
    fuzzed = {c.op for c in CASES}
    assert fuzzed == set(samples.OPS), set(samples.OPS) - fuzzed
    for op in samples.OPS:
        assert sum(c.op == op for c in CASES) >= 15, op


def test_no_case_crashes_a_fresh_process():
    """All cases (both kernel sets, real and meta) in a child process: a crash
    there fails this test, naming the case that was running."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, f"exit code {proc.returncode} while running {lines[-1] if lines else '?'}: " \
                                 f"{proc.stderr[-2000:]}"
    assert lines[-1] == f"ran {2 * (len(CASES) + len(META_CASES))} fuzz cases, none crashed", lines[-1]


def main() -> int:
    """Runs every case once per kernel set, printing its name first (the last
    line names the case that crashed, if one does)."""
    ran = 0
    for generic in (False, True):
        masknorm._C._force_generic_kernels(generic)
        for runner, cases in ((run_case, CASES), (run_case_on_meta, META_CASES)):
            for case in cases:
                print(f"{'generic' if generic else 'native'} {runner.__name__} {case.name}", flush=True)
                try:
                    runner(case)
                except (AssertionError, Exception):  # noqa: B014  (expectations are the in-process tests' job)
                    pass
                ran += 1
    masknorm._C._force_generic_kernels(False)
    print(f"ran {ran} fuzz cases, none crashed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
