"""torch.autograd.gradcheck and gradgradcheck (float64) through the masknorm
ops, called directly.

Only output[0] of each op is differentiated (w.r.t. input / weight / bias).
Masks have some padding and >= 2 valid tokens; inputs are NaN-free. Second
derivatives come from the backward ops' differentiable composite (used when a
graph is recorded, create_graph=True); the tests at the end check that padding
(NaN stored there, fully padded rows) stays out of them and that plain
backward still runs the fast kernel.
"""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import masknorm  # noqa: F401  (loads the ops)
from conftest import bn_full_mask, lengths_mask, poison, row_full_mask

DT = torch.float64
ops = torch.ops.masknorm
CHECKS = {"grad": gradcheck, "gradgrad": gradgradcheck}
TOL = dict(eps=1e-6, atol=1e-5, rtol=1e-4)


def _bn_case(layout, masked):
    C = 3
    if layout == "2d":
        x = torch.randn(5, C, dtype=DT)
        mask = torch.tensor([False, True, False, False, True]) if masked else None
    else:
        N, L = 3, 4
        x = torch.randn((N, L, C) if layout == "3d_cl" else (N, C, L), dtype=DT)
        mask = lengths_mask([4, 2, 1], 4) if masked else None
    return x, mask, C


def _row_case(ns, masked):
    x = torch.randn(3, 2, 4, dtype=DT, requires_grad=True)
    bshape = x.shape[: x.dim() - len(ns)]
    mask = None
    if masked:
        mask = lengths_mask([2, 1, 0], 2) if len(bshape) == 2 else torch.tensor([False, True, False])
    return x, mask


def _param(shape, positive=False):
    t = torch.rand(shape, dtype=DT) + 0.5 if positive else torch.randn(shape, dtype=DT)
    return t.requires_grad_(True)


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["2d", "3d", "3d_cl"])
def test_gradcheck_batch_norm(layout, training, masked, check):
    x, mask, C = _bn_case(layout, masked)
    cl = layout == "3d_cl"
    w, b = _param(C, positive=True), _param(C)
    rm = torch.randn(C, dtype=DT) if not training else None
    rv = (torch.rand(C, dtype=DT) + 0.5) if not training else None
    x.requires_grad_(True)

    def f(x, w, b):
        return ops.batch_norm(x, mask, w, b, rm, rv, training, 1e-5, cl)[0]

    assert CHECKS[check](f, (x, w, b), **TOL)

    def f_weight_only(x, w):
        return ops.batch_norm(x, mask, w, None, rm, rv, training, 1e-5, cl)[0]

    assert CHECKS[check](f_weight_only, (x, w), **TOL)

    def f_noaffine(x):
        return ops.batch_norm(x, mask, None, None, rm, rv, training, 1e-5, cl)[0]

    assert CHECKS[check](f_noaffine, (x,), **TOL)


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("ns", [(4,), (2, 4)])
def test_gradcheck_layer_norm(ns, masked, check):
    x, mask = _row_case(ns, masked)
    w, b = _param(ns, positive=True), _param(ns)

    def f(x, w, b):
        return ops.layer_norm(x, list(ns), mask, w, b, 1e-5)[0]

    assert CHECKS[check](f, (x, w, b), **TOL)

    def f_weight_only(x, w):
        return ops.layer_norm(x, list(ns), mask, w, None, 1e-5)[0]

    assert CHECKS[check](f_weight_only, (x, w), **TOL)

    def f_noaffine(x):
        return ops.layer_norm(x, list(ns), mask, None, None, 1e-5)[0]

    assert CHECKS[check](f_noaffine, (x,), **TOL)


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("eps", [None, 1e-5])
@pytest.mark.parametrize("ns", [(4,), (2, 4)])
def test_gradcheck_rms_norm(ns, eps, masked, check):
    x, mask = _row_case(ns, masked)
    w = _param(ns, positive=True)

    def f(x, w):
        return ops.rms_norm(x, list(ns), mask, w, eps)[0]

    assert CHECKS[check](f, (x, w), **TOL)

    def f_noaffine(x):
        return ops.rms_norm(x, list(ns), mask, None, eps)[0]

    assert CHECKS[check](f_noaffine, (x,), **TOL)


# ----------------------------------------------------------------------------
# second derivatives with padding: NaN stored there, fully padded rows
# ----------------------------------------------------------------------------

# name -> (x shape, mask, full-mask function); every mask has a fully padded
# sequence / row, "all_padded" has nothing valid at all
def _cases():
    bn3 = lengths_mask([4, 0, 2], 4)
    return {
        "bn_2d": ((5, 3), torch.tensor([False, True, False, False, True])),
        "bn_3d": ((3, 3, 4), bn3),
        "bn_3d_cl": ((3, 4, 3), bn3),
        "bn_all_padded": ((3, 3, 4), torch.ones(3, 4, dtype=torch.bool)),
        "ln": ((3, 4, 5), lengths_mask([4, 0, 2], 4)),
        "ln_all_padded": ((3, 4, 5), torch.ones(3, 4, dtype=torch.bool)),
        "rms": ((3, 4, 5), lengths_mask([4, 0, 2], 4)),
    }


def _op_call(name, training):
    """(forward(x, w, b) -> output, full padding mask of x)."""
    shape, mask = _cases()[name]
    if name.startswith("bn"):
        cl = name == "bn_3d_cl"
        C = shape[-1] if cl else shape[1]
        rm, rv = torch.randn(C, dtype=DT), torch.rand(C, dtype=DT) + 0.5

        def f(x, w, b):
            return ops.batch_norm(x, mask, w, b, rm, rv, training, 1e-5, cl)[0]

        return f, bn_full_mask(mask, torch.empty(shape), cl), (C,)
    full = row_full_mask(mask, torch.empty(shape))
    if name.startswith("ln"):
        return (lambda x, w, b: ops.layer_norm(x, [shape[-1]], mask, w, b, 1e-5)[0]), full, (shape[-1],)
    return (lambda x, w, b: ops.rms_norm(x, [shape[-1]], mask, w, None)[0]), full, (shape[-1],)


def _second_derivatives(f, x, g, w, b):
    """Gradients w.r.t. x and w of a gradient penalty ||d<f, g>/d(x, w, b)||^2
    (no first derivative depends on b)."""
    x = x.detach().clone().requires_grad_(True)
    params = [p for p in (w, b) if p is not None]
    first = torch.autograd.grad((f(x, w, b) * g).sum(), [x] + params, create_graph=True)
    penalty = sum((d**2).sum() for d in first)
    return torch.autograd.grad(penalty, [x, w])


@pytest.mark.parametrize(
    "name,training",
    [(n, t) for n in _cases() for t in ((True, False) if n.startswith("bn") else (True,))],
)
def test_second_derivatives_ignore_padding(name, training):
    f, full, pshape = _op_call(name, training)
    x = torch.randn(full.shape, dtype=DT)
    g = torch.randn(full.shape, dtype=DT)
    w = _param(pshape, positive=True)
    b = _param(pshape) if not name.startswith("rms") else None
    # NaN / inf at padding, in the input and in the incoming gradient
    dirty = _second_derivatives(f, poison(x, full), poison(g, full), w, b)
    # other finite values at padding: nothing may change
    clean = _second_derivatives(f, torch.where(full, 7.0, x), torch.where(full, -3.0, g), w, b)
    for d, c in zip(dirty, clean):
        assert d is not None and torch.isfinite(d).all()
        # the same ops on the same selected values: bit-identical
        assert torch.equal(d, c)
    assert (dirty[0][full] == 0).all()
    if name.endswith("all_padded"):
        assert all((d == 0).all() for d in dirty)


class _OpNames(TorchDispatchMode):
    """Records the names of the ops dispatched below autograd."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", ["batch_norm", "layer_norm", "rms_norm"])
def test_first_order_backward_runs_the_kernel(op):
    # Without create_graph the backward op's fast kernel runs (no composite);
    # with it, the differentiable composite runs and records a graph.
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    w = torch.ones(3, dtype=DT, requires_grad=True)
    if op == "batch_norm":
        y = ops.batch_norm(x, None, w, None, None, None, True, 1e-5, False)[0]
    elif op == "layer_norm":
        y = ops.layer_norm(x, [3], None, w, None, 1e-5)[0]
    else:
        y = ops.rms_norm(x, [3], None, w, None)[0]
    g = torch.randn_like(y)
    for create_graph in (False, True):
        with _OpNames() as seen:
            gx, gw = torch.autograd.grad(y, (x, w), g, retain_graph=True, create_graph=create_graph)
        assert (f"masknorm::{op}_backward" in seen.names) != create_graph, seen.names
        assert gx.requires_grad == gw.requires_grad == create_graph


@pytest.mark.parametrize("op", ["batch_norm_backward", "layer_norm_backward", "rms_norm_backward"])
def test_backward_op_composite_matches_kernel(op):
    # The backward op called directly with inputs that require grad (composite)
    # gives the kernel's values, leaves unrequested outputs None, and refuses
    # derivatives w.r.t. the saved statistics.
    torch.manual_seed(5)
    x = torch.randn(3, 4, 5, dtype=DT)
    mask = lengths_mask([4, 0, 2], 4)
    w = torch.rand(5, dtype=DT) + 0.5
    if op == "batch_norm_backward":
        _, m, s, _ = ops.batch_norm(x, mask, w, None, None, None, True, 1e-5, True)
        args = lambda x, s: (torch.ones_like(x), x, mask, w, m, s, True, True, [True, False, True])  # noqa: E731
    elif op == "layer_norm_backward":
        _, m, s = ops.layer_norm(x, [5], mask, w, None, 1e-5)
        args = lambda x, s: (torch.ones_like(x), x, [5], mask, m, s, w, [True, False, True])  # noqa: E731
    else:
        _, s = ops.rms_norm(x, [5], mask, w, None)
        args = lambda x, s: (torch.ones_like(x), x, [5], mask, s, w, [True, False])  # noqa: E731
    fn = getattr(ops, op)
    fast = fn(*args(x, s))
    composite = fn(*args(x.clone().requires_grad_(True), s))
    assert composite[0].requires_grad
    assert fast[1] is None and composite[1] is None
    for a, c in zip(fast, composite):
        if a is not None:
            torch.testing.assert_close(c.detach(), a, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match=f"masknorm::{op}: derivatives with respect to the saved statistics"):
        fn(*args(x.clone().requires_grad_(True), s.clone().requires_grad_(True)))
