"""MaskedRMSNorm / masknorm.functional.rms_norm / RMS ops vs nn.RMSNorm."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import masknorm.functional as MF
from conftest import (
    ALL_DTYPES,
    LOW_PRECISION,
    ROW_SHAPES,
    assert_close,
    copy_affine,
    fwd_bwd,
    make_mask,
    make_rms_pair,
    param_grads,
    ref_rows,
    row_batch_shape,
    row_full_mask,
    zero_param_grads,
)


def _call(m, x, mask):
    return m(x) if mask is None else m(x, padding_mask=mask)


def _compare(m, r, x, mask, g=None, ref_dtype=None, **tol):
    g = torch.randn(x.shape).to(x.dtype) if g is None else g
    zero_param_grads(m, r)
    y, gx = fwd_bwd(lambda t: _call(m, t, mask), x, g)
    rd = ref_dtype or x.dtype
    yr, gxr = fwd_bwd(lambda t: ref_rows(r, t, mask), x.to(rd), g.to(rd))
    assert y.shape == x.shape and y.dtype == x.dtype and gx.dtype == x.dtype
    assert_close(y, yr, **tol)
    assert_close(gx, gxr, **tol)
    pm, pr = param_grads(m), param_grads(r)
    assert len(pm) == len(pr)
    for a, b in zip(pm, pr):
        assert_close(a, b, **tol)
    return y, gx


@pytest.mark.parametrize("mask_kind", [None, "all_false", "random"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("shape_name", list(ROW_SHAPES))
def test_parity_with_nn_rmsnorm(shape_name, eps, affine, mask_kind):
    shape, ns = ROW_SHAPES[shape_name]
    m, r = make_rms_pair(ns, eps=eps, elementwise_affine=affine)
    if not affine:
        assert m.weight is None
    x = torch.randn(shape) * 3 + 1
    mask = make_mask(mask_kind, row_batch_shape(shape, ns))
    y, gx = _compare(m, r, x, mask)
    if mask is not None:
        full = row_full_mask(mask, x)
        assert (y[full] == 0).all() and (gx[full] == 0).all()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_eps_none_matches_nn_rmsnorm_same_dtype(dtype, masked):
    """eps=None: finfo(float32).eps for bf16/f16/f32, finfo(float64).eps for f64.

    Inputs are scaled so that mean(x^2) is comparable to that eps: a wrong eps
    (e.g. finfo(bfloat16).eps, or float32's eps for float64) changes the result
    far beyond the tolerance.
    """
    scale = 1e-8 if dtype == torch.float64 else 1e-4
    m, r = make_rms_pair((8,), dtype=dtype, eps=None)
    x = (torch.randn(4, 5, 8) * scale).to(dtype)
    g = torch.randn(4, 5, 8).to(dtype)
    mask = make_mask("random", (4, 5)) if masked else None
    zero_param_grads(m, r)
    y, _ = fwd_bwd(lambda t: _call(m, t, mask), x, g)
    yr, _ = fwd_bwd(lambda t: ref_rows(r, t, mask), x, g)
    assert y.dtype == dtype
    if dtype == torch.float64:
        assert_close(y, yr, rtol=1e-7, atol=1e-7)
    else:
        assert_close(y, yr)
    # and the eps actually matters at this scale: a 100x larger eps gives a different answer
    r_big = nn.RMSNorm((8,), eps=torch.finfo(dtype).eps * 100 if dtype != torch.bfloat16 else 1e-2, dtype=dtype)
    copy_affine(r_big, m)
    assert not torch.allclose(ref_rows(r_big, x, mask).float(), yr.float(), rtol=5e-2, atol=5e-2)


def test_explicit_eps_used():
    m, r = make_rms_pair((8,), eps=0.25)
    x = torch.randn(4, 5, 8) * 0.3
    _compare(m, r, x, make_mask("random", (4, 5)))


def test_zero_rows_are_finite():
    """A valid all-zero row: eps keeps it finite (output 0), like nn.RMSNorm."""
    m, r = make_rms_pair((8,))
    x = torch.randn(4, 5, 8)
    x[1, 2] = 0
    mask = make_mask("random", (4, 5))
    mask[1, 2] = False
    _compare(m, r, x, mask)


# not in test_row_norms.py: its _compare differs from test_layer_norm.py's (no param-grad dtype check)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape_name", ["2d", "3d", "multi_dim_ns"])
@pytest.mark.parametrize("masked", [False, True])
def test_dtypes(dtype, shape_name, masked):
    shape, ns = ROW_SHAPES[shape_name]
    ref_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
    m, r = make_rms_pair(ns, dtype=dtype, ref_dtype=ref_dtype)
    assert m.weight.dtype == dtype
    x = (torch.randn(shape) * 2 + 1).to(dtype)
    mask = make_mask("random", row_batch_shape(shape, ns)) if masked else None
    y, _ = _compare(m, r, x, mask, ref_dtype=ref_dtype)
    if masked:
        assert (y[row_full_mask(mask, x)] == 0).all()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_functional_rms_norm(masked, eps):
    x = torch.randn(4, 5, 3, 4)
    ns = (3, 4)
    w = torch.rand(ns) + 0.5
    mask = make_mask("random", (4, 5)) if masked else None
    y = MF.rms_norm(x, ns, w, eps, padding_mask=mask)
    yr = ref_rows(lambda t: F.rms_norm(t, ns, w, eps), x, mask)
    assert_close(y, yr)
    y2 = MF.rms_norm(x, ns, padding_mask=mask)
    yr2 = ref_rows(lambda t: F.rms_norm(t, ns), x, mask)
    assert_close(y2, yr2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_rms_norm_op_rstd(dtype):
    x = torch.randn(4, 5, 3, 4).to(dtype)
    mask = make_mask("random", (4, 5))
    out, rstd = torch.ops.masknorm.rms_norm(x, [3, 4], mask, None, 1e-5)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == x.shape and out.dtype == dtype
    assert rstd.shape == (4, 5) and rstd.dtype == stat_dtype
    xv = x[~mask].to(torch.float64).flatten(1)
    cmp_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(rstd[~mask], 1 / torch.sqrt(xv.pow(2).mean(1) + 1e-5), dtype=cmp_dtype)
    assert torch.isfinite(rstd).all()
    # eps=None through the op
    out_n, _ = torch.ops.masknorm.rms_norm(x, [3, 4], mask, None, None)
    up = (lambda t: t.float()) if dtype == torch.bfloat16 else (lambda t: t)
    assert_close(out_n, ref_rows(lambda t: F.rms_norm(up(t), (3, 4)), x, mask))


def test_rms_norm_backward_op_output_mask():
    x = torch.randn(4, 5, 8)
    mask = make_mask("random", (4, 5))
    w = torch.rand(8) + 0.5
    _, rstd = torch.ops.masknorm.rms_norm(x, [8], mask, w, 1e-6)
    g = torch.randn_like(x)
    gi, gw = torch.ops.masknorm.rms_norm_backward(g, x, [8], mask, rstd, w, [True, True])
    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref_rows(lambda t: F.rms_norm(t, (8,), wl, 1e-6), xl, mask).backward(g)
    assert_close(gi, xl.grad)
    assert_close(gw, wl.grad)
    gi2, gw2 = torch.ops.masknorm.rms_norm_backward(g, x, [8], mask, rstd, w, [True, False])
    assert gw2 is None
    assert_close(gi2, gi)
    gi3, gw3 = torch.ops.masknorm.rms_norm_backward(g, x, [8], mask, rstd, w, [False, True])
    assert gi3 is None
    assert_close(gw3, gw)

