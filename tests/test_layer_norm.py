"""MaskedLayerNorm / masknorm.functional.layer_norm / LN ops vs nn.LayerNorm."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import masknorm.functional as MF
from conftest import (
    ALL_DTYPES,
    LN_AFFINE,
    LOW_PRECISION,
    ROW_SHAPES,
    assert_close,
    copy_affine,
    fwd_bwd,
    make_ln_pair,
    make_mask,
    param_grads,
    ref_rows,
    row_batch_shape,
    row_full_mask,
    zero_param_grads,
)


def _call(m, x, mask):
    return m(x) if mask is None else m(x, padding_mask=mask)


def _compare(m, r, x, mask, g=None, ref_dtype=None):
    g = torch.randn(x.shape).to(x.dtype) if g is None else g
    zero_param_grads(m, r)
    y, gx = fwd_bwd(lambda t: _call(m, t, mask), x, g)
    rd = ref_dtype or x.dtype
    yr, gxr = fwd_bwd(lambda t: ref_rows(r, t, mask), x.to(rd), g.to(rd))
    assert y.shape == x.shape and y.dtype == x.dtype and gx.dtype == x.dtype
    assert_close(y, yr)
    assert_close(gx, gxr)
    pm, pr = param_grads(m), param_grads(r)
    assert len(pm) == len(pr)
    for a, b in zip(pm, pr):
        assert a.dtype == m.weight.dtype
        assert_close(a, b)
    return y, gx


@pytest.mark.parametrize("mask_kind", [None, "all_false", "random"])
@pytest.mark.parametrize("affine", list(LN_AFFINE))
@pytest.mark.parametrize("shape_name", list(ROW_SHAPES))
def test_parity_with_nn_layernorm(shape_name, affine, mask_kind):
    shape, ns = ROW_SHAPES[shape_name]
    m, r = make_ln_pair(ns, **LN_AFFINE[affine])
    if affine == "no_affine":
        assert m.weight is None and m.bias is None
    if affine == "no_bias":
        assert m.weight is not None and m.bias is None
    x = torch.randn(shape) * 3 + 1
    mask = make_mask(mask_kind, row_batch_shape(shape, ns))
    y, gx = _compare(m, r, x, mask)
    if mask is not None:
        full = row_full_mask(mask, x)
        assert (y[full] == 0).all() and (gx[full] == 0).all()


@pytest.mark.parametrize("eps", [1e-5, 1e-2, 0.5])
def test_eps(eps):
    m, r = make_ln_pair((8,), eps=eps)
    x = torch.randn(4, 5, 8) * 0.3
    _compare(m, r, x, make_mask("random", (4, 5)))


# not in test_row_norms.py: _compare here also asserts the param-grad dtype
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape_name", ["2d", "3d", "multi_dim_ns"])
@pytest.mark.parametrize("masked", [False, True])
def test_dtypes(dtype, shape_name, masked):
    shape, ns = ROW_SHAPES[shape_name]
    ref_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
    m, r = make_ln_pair(ns, dtype=dtype, ref_dtype=ref_dtype)
    assert m.weight.dtype == dtype
    x = (torch.randn(shape) * 2 + 1).to(dtype)
    mask = make_mask("random", row_batch_shape(shape, ns)) if masked else None
    y, _ = _compare(m, r, x, mask, ref_dtype=ref_dtype)
    if masked:
        assert (y[row_full_mask(mask, x)] == 0).all()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_functional_layer_norm(masked, affine):
    x = torch.randn(4, 5, 3, 4)
    ns = (3, 4)
    w = torch.rand(ns) + 0.5 if affine else None
    b = torch.rand(ns) - 0.5 if affine else None
    mask = make_mask("random", (4, 5)) if masked else None
    y = MF.layer_norm(x, ns, w, b, 1e-3, padding_mask=mask)
    yr = ref_rows(lambda t: F.layer_norm(t, ns, w, b, 1e-3), x, mask)
    assert_close(y, yr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_layer_norm_op_mean_rstd(dtype):
    eps = 1e-5
    x = torch.randn(4, 5, 3, 4).to(dtype)
    mask = make_mask("random", (4, 5))
    out, mean, rstd = torch.ops.masknorm.layer_norm(x, [3, 4], mask, None, None, eps)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == x.shape and out.dtype == dtype
    assert mean.shape == (4, 5) and rstd.shape == (4, 5)
    assert mean.dtype == stat_dtype and rstd.dtype == stat_dtype
    assert torch.equal(mean[mask], torch.zeros_like(mean[mask]))
    assert torch.equal(rstd[mask], torch.zeros_like(rstd[mask]))
    xv = x[~mask].to(torch.float64).flatten(1)
    cmp_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(mean[~mask], xv.mean(1), dtype=cmp_dtype)
    assert_close(rstd[~mask], 1 / torch.sqrt(xv.var(1, unbiased=False) + eps), dtype=cmp_dtype)


def test_layer_norm_backward_op_output_mask():
    eps = 1e-5
    x = torch.randn(4, 5, 8)
    mask = make_mask("random", (4, 5))
    w, b = torch.rand(8) + 0.5, torch.rand(8)
    _, mean, rstd = torch.ops.masknorm.layer_norm(x, [8], mask, w, b, eps)
    g = torch.randn_like(x)
    gi, gw, gb = torch.ops.masknorm.layer_norm_backward(g, x, [8], mask, mean, rstd, w, [True, True, True])
    xl, wl, bl = (t.clone().requires_grad_(True) for t in (x, w, b))
    ref_rows(lambda t: F.layer_norm(t, (8,), wl, bl, eps), xl, mask).backward(g)
    assert_close(gi, xl.grad)
    assert_close(gw, wl.grad)
    assert_close(gb, bl.grad)
    gi2, gw2, gb2 = torch.ops.masknorm.layer_norm_backward(g, x, [8], mask, mean, rstd, w, [True, False, False])
    assert gw2 is None and gb2 is None
    assert_close(gi2, gi)
    gi3, gw3, gb3 = torch.ops.masknorm.layer_norm_backward(g, x, [8], mask, mean, rstd, w, [False, True, True])
    assert gi3 is None
    assert_close(gw3, gw)
    assert_close(gb3, gb)


def test_large_offset_is_numerically_stable():
    m, _ = make_ln_pair((64,))
    r64 = nn.LayerNorm((64,), dtype=torch.float64)
    copy_affine(r64, m)
    x = torch.randn(6, 7, 64) + 1000.0
    mask = make_mask("random", (6, 7))
    y = m(x, padding_mask=mask)
    assert_close(y, ref_rows(r64, x.double(), mask), rtol=1e-3, atol=1e-3)

