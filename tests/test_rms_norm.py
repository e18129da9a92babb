"""MaskedRMSNorm / masknorm.functional.rms_norm / RMS ops vs nn.RMSNorm."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import masknorm
import masknorm.functional as MF
from conftest import (
    ALL_DTYPES,
    LOW_PRECISION,
    assert_close,
    copy_affine,
    fwd_bwd,
    init_affine,
    make_mask,
    noncontig_copy,
    param_grads,
    poison,
    ref_rows,
    row_full_mask,
    zero_param_grads,
    zip_strict,
)

SHAPES = {
    "2d": ((6, 8), (8,)),
    "3d": ((4, 5, 8), (8,)),
    "multi_dim_ns": ((3, 4, 3, 4), (3, 4)),
    "3d_ns2": ((6, 3, 4), (3, 4)),
}


def make_rms_pair(ns, dtype=torch.float32, ref_dtype=None, **kw):
    m = masknorm.MaskedRMSNorm(ns, dtype=dtype, **kw)
    init_affine(m)
    r = nn.RMSNorm(ns, dtype=ref_dtype or dtype, **kw)
    copy_affine(r, m)
    return m, r


def batch_shape(shape, ns):
    return shape[: len(shape) - len(ns)]


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
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_parity_with_nn_rmsnorm(shape_name, eps, affine, mask_kind):
    shape, ns = SHAPES[shape_name]
    m, r = make_rms_pair(ns, eps=eps, elementwise_affine=affine)
    if not affine:
        assert m.weight is None
    x = torch.randn(shape) * 3 + 1
    mask = make_mask(mask_kind, batch_shape(shape, ns))
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


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_masked_valid_rows_equal_unmasked(shape_name):
    shape, ns = SHAPES[shape_name]
    m, _ = make_rms_pair(ns)
    x = torch.randn(shape)
    mask = make_mask("random", batch_shape(shape, ns))
    full = row_full_mask(mask, x)
    y_m = m(x, padding_mask=mask)
    y_p = m(x)
    assert_close(y_m[~full], y_p[~full])
    assert (y_m[full] == 0).all() and (y_p[full] != 0).any()


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_nan_inf_in_padding_never_leak(shape_name, affine):
    shape, ns = SHAPES[shape_name]
    m, r = make_rms_pair(ns, elementwise_affine=affine)
    x = torch.randn(shape)
    g = torch.randn(shape)
    mask = make_mask("random", batch_shape(shape, ns))
    full = row_full_mask(mask, x)
    zero_param_grads(m, r)
    y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), poison(x, full), poison(g, full))
    yr, gxr = fwd_bwd(lambda t: ref_rows(r, t, mask), x, g)
    assert torch.isfinite(y).all() and torch.isfinite(gx).all()
    assert torch.equal(y[full], torch.zeros_like(y[full]))
    assert torch.equal(gx[full], torch.zeros_like(gx[full]))
    assert_close(y, yr)
    assert_close(gx, gxr)
    for a, b in zip_strict(param_grads(m), param_grads(r)):
        assert torch.isfinite(a).all()
        assert_close(a, b)


@pytest.mark.parametrize("shape_name", ["2d", "3d", "multi_dim_ns"])
def test_all_rows_padded(shape_name):
    shape, ns = SHAPES[shape_name]
    m, _ = make_rms_pair(ns)
    mask = torch.ones(batch_shape(shape, ns), dtype=torch.bool)
    x = poison(torch.randn(shape), row_full_mask(mask, torch.empty(shape)))
    y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x, torch.randn(shape))
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.equal(gx, torch.zeros_like(gx))
    for p in param_grads(m):
        assert p is None or torch.equal(p, torch.zeros_like(p))


def test_zero_rows_are_finite():
    """A valid all-zero row: eps keeps it finite (output 0), like nn.RMSNorm."""
    m, r = make_rms_pair((8,))
    x = torch.randn(4, 5, 8)
    x[1, 2] = 0
    mask = make_mask("random", (4, 5))
    mask[1, 2] = False
    _compare(m, r, x, mask)


@pytest.mark.parametrize("with_mask", [False, True])
def test_empty_batch(with_mask):
    m, r = make_rms_pair((8,))
    x = torch.randn(0, 5, 8, requires_grad=True)
    mask = torch.zeros(0, 5, dtype=torch.bool) if with_mask else None
    y = _call(m, x, mask)
    assert y.shape == r(x).shape == (0, 5, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape_name", ["2d", "3d", "multi_dim_ns"])
@pytest.mark.parametrize("masked", [False, True])
def test_dtypes(dtype, shape_name, masked):
    shape, ns = SHAPES[shape_name]
    ref_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
    m, r = make_rms_pair(ns, dtype=dtype, ref_dtype=ref_dtype)
    assert m.weight.dtype == dtype
    x = (torch.randn(shape) * 2 + 1).to(dtype)
    mask = make_mask("random", batch_shape(shape, ns)) if masked else None
    y, _ = _compare(m, r, x, mask, ref_dtype=ref_dtype)
    if masked:
        assert (y[row_full_mask(mask, x)] == 0).all()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", ["transpose", "step_slice"])
def test_non_contiguous_input(kind, masked):
    m, r = make_rms_pair((8,))
    if kind == "transpose":
        leaf = torch.randn(5, 4, 8, requires_grad=True)
        view = lambda t: t.transpose(0, 1)
    else:
        leaf = torch.randn(4, 5, 16, requires_grad=True)
        view = lambda t: t[:, :, ::2]
    x = view(leaf)
    assert x.shape == (4, 5, 8) and not x.is_contiguous()
    mask = make_mask("random", (4, 5)) if masked else None
    g = torch.randn(4, 5, 8)
    y = _call(m, x, noncontig_copy(mask) if masked else None)
    y.backward(noncontig_copy(g))
    yr, gxr = fwd_bwd(lambda t: ref_rows(r, t, mask), x.detach().contiguous(), g)
    assert_close(y, yr)
    assert_close(view(leaf.grad), gxr)
    for a, b in zip_strict(param_grads(m), param_grads(r)):
        assert_close(a, b)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("D", [131, 1000])
def test_large_shapes(D, dtype):
    """Odd row widths (SIMD tails) and > GRAIN_SIZE elements (several threads)."""
    n, l = (16, 50) if D == 131 else (8, 9)
    ref_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
    m, r = make_rms_pair((D,), dtype=dtype, ref_dtype=ref_dtype)
    x = (torch.randn(n, l, D) * 2 + 0.5).to(dtype)
    mask = make_mask("random", (n, l))
    extra = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    zero_param_grads(m, r)
    g = torch.randn(x.shape).to(dtype)
    y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x, g)
    yr, gxr = fwd_bwd(lambda t: ref_rows(r, t, mask), x.to(ref_dtype), g.to(ref_dtype))
    assert_close(y, yr, **extra)
    assert_close(gx, gxr, **extra)
    for a, b in zip_strict(param_grads(m), param_grads(r)):
        assert_close(a, b, **({"rtol": 1e-4, "atol": 1e-3} if dtype == torch.float32 else {}))
    full = row_full_mask(mask, x)
    assert (y[full] == 0).all() and (gx[full] == 0).all()


def test_param_grads_without_input_grad():
    m, r = make_rms_pair((8,))
    x = torch.randn(4, 5, 8)
    mask = make_mask("random", (4, 5))
    g = torch.randn_like(x)
    m(x, padding_mask=mask).backward(g)
    ref_rows(r, x, mask).backward(g)
    assert_close(m.weight.grad, r.weight.grad)


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode(ctx):
    m, r = make_rms_pair((8,))
    x = torch.randn(4, 5, 8)
    mask = make_mask("random", (4, 5))
    with torch.no_grad() if ctx == "no_grad" else torch.inference_mode():
        y = m(x, padding_mask=mask)
        assert not y.requires_grad
        assert_close(y, ref_rows(r, x, mask))


def test_functional_non_contiguous_params():
    x = torch.randn(4, 5, 8)
    mask = make_mask("random", (4, 5))
    w = (torch.rand(16) + 0.5)[::2]
    y = MF.rms_norm(x, (8,), w, padding_mask=mask)
    assert_close(y, ref_rows(lambda t: F.rms_norm(t, (8,), w.contiguous()), x, mask))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_input_with_float32_module(dtype):
    """bf16/fp16 activations through a float32 module (autocast-style), as nn allows."""
    m, r = make_rms_pair((8,))
    x = torch.randn(4, 5, 8).to(dtype)
    mask = make_mask("random", (4, 5))
    g = torch.randn(x.shape).to(dtype)
    y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x, g)
    yr, gxr = fwd_bwd(lambda t: ref_rows(r, t, mask), x.float(), g.float())
    assert y.dtype == dtype and gx.dtype == dtype
    assert m.weight.grad.dtype == torch.float32
    assert_close(y, yr)
    assert_close(gx, gxr)
    for a, b in zip_strict(param_grads(m), param_grads(r)):
        assert_close(a, b, rtol=2e-2, atol=2e-2)
