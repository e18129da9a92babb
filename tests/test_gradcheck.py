"""torch.autograd.gradcheck and gradgradcheck (float64) of the differentiable
ops (every forward op of the samples registry: a new op's samples bring it
here), and of every backward op of the registry (whose derivatives are what
double backward runs), from the samples of
tests/samples/, with the native and the generic kernels, on every device.

Only output[0] of a forward op is differentiated (w.r.t. input, weight and
bias); its saved statistics are not differentiable. A backward op is
differentiated w.r.t. grad_output, input and weight with its saved statistics
recomputed from the input, as autograd uses it. The tests at the end check
that padding (NaN stored there, fully padded rows) stays out of second
derivatives and that plain backward still runs the fast kernel.
"""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import samples
from helpers import bn_full_mask, is_channels_last, poison, ref_bn, ref_rows, row_full_mask
from samples import batch_norm as SB, row_norm as SR
from samples.common import by_name, inputs

pytestmark = pytest.mark.kernels

DT = torch.float64
ops = torch.ops.masknorm
CHECKS = {"grad": gradcheck, "gradgrad": gradgradcheck}
TOL = dict(eps=1e-6, atol=1e-5, rtol=1e-4)
# every forward op of the samples registry whose samples differentiate something
FORWARD = tuple(op for op in samples.OPS if not op.endswith("_backward")
                and any(s.grad_args and s.args[0].numel() for s in samples.SAMPLES[op](dtype=DT)))


def _saved_statistics(backward_op):
    """(forward op, positions in the backward op's arguments of the saved
    statistics): the arguments named as the forward op's outputs after the first."""
    forward_op = backward_op[: -len("_backward")]
    saved = [r.name for r in getattr(ops, forward_op).default._schema.returns[1:]]
    names = [a.name for a in getattr(ops, backward_op).default._schema.arguments]
    assert all(n in names for n in saved), (backward_op, saved, names)
    return forward_op, tuple(names.index(n) for n in saved)


# every backward op of the samples registry -> (forward op, positions of the saved statistics)
BACKWARD = {op: _saved_statistics(op) for op in samples.OPS if op.endswith("_backward")}


def _mutated_positions(op):
    """The positions of the arguments ``op``'s schema says it writes (running statistics)."""
    schema = getattr(ops, op).default._schema
    return [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


def _differentiable(sample, op=None):
    """(function of the grad_args tensors, those tensors requiring grad). With
    ``op``, the arguments it writes in place are fresh copies in every call."""
    sample = sample.with_grad()
    at = [i for i in sample.grad_args if isinstance(sample.args[i], torch.Tensor)]
    written = _mutated_positions(op) if op else []

    def call(*tensors):
        args = list(sample.args)
        for i, t in zip(at, tensors):
            args[i] = t
        for i in written:
            if isinstance(args[i], torch.Tensor):
                args[i] = args[i].clone()
        return args

    return call, tuple(sample.args[i] for i in at)


FORWARD_CASES = [(op, s.name) for op in FORWARD for s in samples.SAMPLES[op](dtype=DT) if s.args[0].numel()]


def _first_quick(cases):
    """pytest params of (op, sample name) cases: each op's first in the quick loop, the others slow."""
    seen = set()
    params = []
    for op, name in cases:
        params.append(pytest.param(op, name, id=f"{op}-{name}", marks=() if op not in seen else pytest.mark.slow))
        seen.add(op)
    return params


# the quick loop (-m "not slow") runs gradcheck on one sample per op; the full suite every sample, and gradgradcheck
@pytest.mark.parametrize("check", ["grad", pytest.param("gradgrad", marks=pytest.mark.slow)])
@pytest.mark.parametrize("op,name", _first_quick(FORWARD_CASES))
def test_forward_op(op, name, check, device):
    sample = by_name(samples.SAMPLES[op](device=device, dtype=DT), name)
    call, inputs = _differentiable(sample, op)
    fn = getattr(ops, op)
    assert CHECKS[check](lambda *t: fn(*call(*t))[0], inputs, **TOL)


BACKWARD_CASES = [
    (op, s.name) for op in BACKWARD for s in samples.SAMPLES[op](dtype=DT) if s.name.endswith(("-double",
                                                                                              "-input_only",
                                                                                              "-params_only"))
]


@pytest.mark.parametrize("op,name", _first_quick(BACKWARD_CASES))
def test_backward_op(op, name, device):
    forward_op, stat_at = BACKWARD[op]
    sample = by_name(samples.SAMPLES[op](device=device, dtype=DT), name)
    forward = by_name(samples.SAMPLES[forward_op](device=device, dtype=DT), name.rsplit("-", 1)[0])
    call, inputs = _differentiable(sample)
    w_at = sample.grad_args[2]
    forward_w_at = forward.grad_args[1]

    def fn(*tensors):
        args = call(*tensors)
        fwd = list(forward.args)
        fwd[0], fwd[forward_w_at] = args[1], args[w_at]
        stats = getattr(ops, forward_op)(*fwd)[1:]
        for i, s in zip(stat_at, stats):
            args[i] = s
        return tuple(o for o in getattr(ops, op)(*args) if o is not None)

    assert gradcheck(fn, inputs, **TOL)


# ----------------------------------------------------------------------------
# second derivatives with padding: NaN stored there, fully padded rows
# ----------------------------------------------------------------------------

# (op, forward sample): padded masks with a fully padded sequence or row; "all_padded" masks everything
PADDING_CASES = [
    ("batch_norm", "train-NC_6x3_padded-float64"),
    ("batch_norm", "train-NCL_3x3x4_padded-float64"),
    ("batch_norm", "train-NLC_3x3x4_padded-float64"),
    ("batch_norm", "eval-NC-float64"),
    ("batch_norm", "all_padded:train-NCL_3x3x4_padded-float64"),
    ("layer_norm", "3x4x5_ns5_padded-float64"),
    ("layer_norm", "all_padded:3x4x5_ns5_padded-float64"),
    ("rms_norm", "3x4x5_ns5_padded-float64-eps_none"),
]


def _padding_case(op, name, device):
    """(f(x, w, b) -> output, x, full padding mask of x, w, b)."""
    all_padded = name.startswith("all_padded:")
    sample = by_name(samples.SAMPLES[op](device=device, dtype=DT), name.split(":")[-1])
    args = list(sample.args)
    mask_at = 1 if op == "batch_norm" else 2
    if all_padded:
        args[mask_at] = torch.ones_like(args[mask_at])
    x, mask = args[0], args[mask_at]
    if op == "batch_norm":
        full = bn_full_mask(mask, x, args[-1])
    else:
        full = row_full_mask(mask, x)
    w_at = sample.grad_args[1]
    b_at = sample.grad_args[2] if len(sample.grad_args) > 2 and args[sample.grad_args[2]] is not None else None

    def f(x, w, b):
        a = list(args)
        a[0], a[w_at] = x, w
        if b_at is not None:
            a[b_at] = b
        return getattr(ops, op)(*a)[0]

    w = args[w_at].clone().requires_grad_(True)
    b = args[b_at].clone().requires_grad_(True) if b_at is not None else None
    return f, x, full, w, b


def _second_derivatives(f, x, g, w, b):
    """Gradients w.r.t. x and w of a gradient penalty ||d<f, g>/d(x, w, b)||^2
    (no first derivative depends on b)."""
    x = x.detach().clone().requires_grad_(True)
    params = [p for p in (w, b) if p is not None]
    first = torch.autograd.grad((f(x, w, b) * g).sum(), [x] + params, create_graph=True)
    penalty = sum((d**2).sum() for d in first)
    return torch.autograd.grad(penalty, [x, w])


@pytest.mark.parametrize("op,name", PADDING_CASES, ids=[f"{op}-{name}" for op, name in PADDING_CASES])
def test_second_derivatives_ignore_padding(op, name, device):
    f, x, full, w, b = _padding_case(op, name, device)
    assert full.any()
    g = torch.randn(x.shape, dtype=DT, device=device)
    # NaN / inf at padding, in the input and in the incoming gradient
    dirty = _second_derivatives(f, poison(x, full), poison(g, full), w, b)
    # other finite values at padding: nothing may change
    clean = _second_derivatives(f, torch.where(full, 7.0, x), torch.where(full, -3.0, g), w, b)
    for d, c in zip(dirty, clean):
        assert d is not None and torch.isfinite(d).all()
        # the same ops on the same selected values: bit-identical
        assert torch.equal(d, c)
    assert (dirty[0][full] == 0).all()
    if name.startswith("all_padded:"):
        assert all((d == 0).all() for d in dirty)


class _OpNames(TorchDispatchMode):
    """Records the names of the ops dispatched below autograd."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", FORWARD)
def test_first_order_backward_runs_the_kernel(op):
    # Without create_graph the backward op's fast kernel runs (no composite);
    # with it, the differentiable composite runs and records a graph.
    sample = next(s for s in samples.SAMPLES[op](dtype=DT) if s.grad_args and s.args[0].numel())
    call, inputs = _differentiable(sample, op)
    y = getattr(ops, op)(*call(*inputs))[0]
    g = torch.randn_like(y)
    for create_graph in (False, True):
        with _OpNames() as seen:
            grads = torch.autograd.grad(y, inputs, g, retain_graph=True, create_graph=create_graph)
        backward_ops = {n for n in seen.names if n.startswith("masknorm::") and n.endswith("_backward")}
        assert bool(backward_ops) != create_graph, seen.names
        assert grads[0].requires_grad == create_graph  # the input's (the bias's, sum(dy), needs no graph)


def _padded_all_gradients_sample(op):
    """The first float64 sample of backward op ``op`` asking for every gradient,
    with a weight and a padding mask that pads something."""
    names = [a.name for a in getattr(ops, op).default._schema.arguments]
    mask_at, w_at = names.index("padding_mask"), names.index("weight")
    return next(s for s in samples.SAMPLES[op](dtype=DT) if s.name.endswith("-all") and s.args[w_at] is not None
                and s.args[mask_at] is not None and bool(s.args[mask_at].any()))


@pytest.mark.parametrize("op", BACKWARD)
def test_backward_op_composite_matches_kernel(op):
    # The backward op called directly with inputs that require grad (composite)
    # gives the kernel's values, leaves unrequested outputs None, and refuses
    # derivatives w.r.t. the saved statistics.
    sample = _padded_all_gradients_sample(op)
    output_mask = [True, False, True][: len(sample.args[-1])]  # no weight gradient
    sample = sample.replace("no_weight_grad", **{f"a{len(sample.args) - 1}": output_mask})
    fn = getattr(ops, op)
    stat_at = BACKWARD[op][1][-1]
    fast = fn(*sample.args)
    composite_sample = sample.with_grad()
    composite = fn(*composite_sample.args)
    assert composite[0].requires_grad
    assert fast[1] is None and composite[1] is None
    for a, c in zip(fast, composite):
        assert (a is None) == (c is None)
        if a is not None:
            torch.testing.assert_close(c.detach(), a, rtol=1e-12, atol=1e-12)
    stats_grad = composite_sample.replace("stats", **{f"a{stat_at}": sample.args[stat_at].clone().requires_grad_()})
    with pytest.raises(RuntimeError, match=f"masknorm::{op}: derivatives with respect to the saved statistics"):
        fn(*stats_grad.args)


# ------------------------------------------------------- double backward vs torch

# gradgradcheck compares the composite with itself; here its second
# derivatives meet torch's own (nn.BatchNorm1d's batch_norm, F.layer_norm,
# F.rms_norm on the packed valid tokens), with random grad_output and random
# grad-of-grad: a dropped term of the composite changes them.
SECOND_ORDER = [("batch_norm", c) for c in ("NC", "NCL", "NLC")] + [
    (op, c) for op in ("layer_norm", "rms_norm") for c in ("seq", "rows_ns2", "mask3d")]


def _masked_and_torch(op, case, device):
    """(x, masknorm's f(x, w, b), torch's on the packed valid tokens, w, b)."""
    eps = 1e-5
    if op == "batch_norm":
        c, cl = SB.parity_case(case), is_channels_last(case)
        x, mask = inputs(c, dtype=DT, device=device)
        w, b = (torch.rand(c.C, dtype=DT, device=device) + 0.5 for _ in range(2))
        f = lambda x, w, b: ops.batch_norm(x, mask, w, b, None, None, None, True, 0.1, eps, cl)[0]
        ref = lambda x, w, b: ref_bn(lambda t: torch.nn.functional.batch_norm(t, None, None, w, b, True, 0.1, eps),
                                     x, mask, cl)
        return x, f, ref, w, b
    c = SR.Case(*SR.PARITY_SHAPES[case])
    ns = c.ns
    x, mask = inputs(c, dtype=DT, device=device)
    w, b = (torch.rand(ns, dtype=DT, device=device) + 0.5 for _ in range(2))
    if op == "layer_norm":
        f = lambda x, w, b: ops.layer_norm(x, list(ns), mask, w, b, eps)[0]
        ref = lambda x, w, b: ref_rows(lambda t: torch.nn.functional.layer_norm(t, ns, w, b, eps), x, mask)
    else:
        f = lambda x, w, b: ops.rms_norm(x, list(ns), mask, w, eps)[0] + b
        ref = lambda x, w, b: ref_rows(lambda t: torch.nn.functional.rms_norm(t, ns, w, eps), x, mask) + b
    return x, f, ref, w, b


@pytest.mark.parametrize("op,case", SECOND_ORDER, ids=[f"{op}-{c}" for op, c in SECOND_ORDER])
def test_double_backward_matches_torch(op, case, device):
    x, f, ref, w, b = _masked_and_torch(op, case, device)
    g = torch.randn(x.shape, dtype=DT, device=device)
    vs = [torch.randn(t.shape, dtype=DT, device=device) for t in (x, w, b)]
    results = []
    for fn in (f, ref):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, g)]
        first = torch.autograd.grad(fn(*leaves[:3]), leaves[:3], leaves[3], create_graph=True)
        inner = sum((d * v).sum() for d, v in zip(first, vs))
        second = torch.autograd.grad(inner, leaves[:2] + leaves[3:], allow_unused=True)
        results.append([d.detach() for d in first] + [torch.zeros_like(t) if d is None else d
                                                      for d, t in zip(second, leaves[:2] + leaves[3:])])
    for name, a, e in zip(("dx", "dw", "db", "d2x", "d2w", "d2g"), *results):
        assert e.abs().max() > 1e-3, name  # nothing that zeros would match
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=name)
