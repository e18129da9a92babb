"""torch.autograd.gradcheck (float64) through the masknorm ops, called directly.

Only output[0] of each op is differentiated (w.r.t. input / weight / bias).
Masks have some padding and >= 2 valid tokens; inputs are NaN-free.
"""

import pytest
import torch
from torch.autograd import gradcheck

import masknorm  # noqa: F401  (loads the ops)
from conftest import lengths_mask

DT = torch.float64


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


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["2d", "3d", "3d_cl"])
def test_gradcheck_batch_norm(layout, training, masked):
    x, mask, C = _bn_case(layout, masked)
    cl = layout == "3d_cl"
    w = (torch.rand(C, dtype=DT) + 0.5).requires_grad_(True)
    b = torch.randn(C, dtype=DT).requires_grad_(True)
    rm = torch.randn(C, dtype=DT) if not training else None
    rv = (torch.rand(C, dtype=DT) + 0.5) if not training else None
    x.requires_grad_(True)

    def f(x, w, b):
        return torch.ops.masknorm.batch_norm(x, mask, w, b, rm, rv, training, 1e-5, cl)[0]

    assert gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)

    def f_noaffine(x):
        return torch.ops.masknorm.batch_norm(x, mask, None, None, rm, rv, training, 1e-5, cl)[0]

    assert gradcheck(f_noaffine, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("ns", [(4,), (2, 4)])
def test_gradcheck_layer_norm(ns, masked):
    x = torch.randn(3, 2, 4, dtype=DT, requires_grad=True)
    bshape = x.shape[: x.dim() - len(ns)]
    mask = None
    if masked:
        mask = lengths_mask([2, 1, 0], 2) if len(bshape) == 2 else torch.tensor([False, True, False])
    w = (torch.rand(ns, dtype=DT) + 0.5).requires_grad_(True)
    b = torch.randn(ns, dtype=DT).requires_grad_(True)

    def f(x, w, b):
        return torch.ops.masknorm.layer_norm(x, list(ns), mask, w, b, 1e-5)[0]

    assert gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)

    def f_noaffine(x):
        return torch.ops.masknorm.layer_norm(x, list(ns), mask, None, None, 1e-5)[0]

    assert gradcheck(f_noaffine, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("eps", [None, 1e-5])
@pytest.mark.parametrize("ns", [(4,), (2, 4)])
def test_gradcheck_rms_norm(ns, eps, masked):
    x = torch.randn(3, 2, 4, dtype=DT, requires_grad=True)
    bshape = x.shape[: x.dim() - len(ns)]
    mask = None
    if masked:
        mask = lengths_mask([2, 1, 0], 2) if len(bshape) == 2 else torch.tensor([False, True, False])
    w = (torch.rand(ns, dtype=DT) + 0.5).requires_grad_(True)

    def f(x, w):
        return torch.ops.masknorm.rms_norm(x, list(ns), mask, w, eps)[0]

    assert gradcheck(f, (x, w), eps=1e-6, atol=1e-5, rtol=1e-4)

    def f_noaffine(x):
        return torch.ops.masknorm.rms_norm(x, list(ns), mask, None, eps)[0]

    assert gradcheck(f_noaffine, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("op", ["batch_norm", "layer_norm", "rms_norm"])
def test_double_backward_raises_clear_error(op):
    # Second derivatives are not implemented yet: asking for one must fail
    # loudly, naming the op, rather than return wrong numbers.
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    ops = torch.ops.masknorm
    if op == "batch_norm":
        y = ops.batch_norm(x, None, None, None, None, None, True, 1e-5, False)[0]
    elif op == "layer_norm":
        y = ops.layer_norm(x, [3], None, None, None, 1e-5)[0]
    else:
        y = ops.rms_norm(x, [3], None, None, None)[0]
    (gx,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x, create_graph=True)
    assert torch.isfinite(gx).all()  # first derivative with create_graph still works
    with pytest.raises(RuntimeError, match=f"masknorm::{op}_backward: double backward"):
        torch.autograd.grad(gx.pow(2).sum(), x)
