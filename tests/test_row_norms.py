"""Tests shared by MaskedLayerNorm and MaskedRMSNorm, parametrized over the two row-wise norms."""

from typing import Callable, Dict, NamedTuple

import pytest
import torch
import torch.nn.functional as F

import masknorm.functional as MF
from conftest import (
    LN_AFFINE,
    LOW_PRECISION,
    ROW_SHAPES,
    assert_close,
    fwd_bwd,
    make_ln_pair,
    make_mask,
    make_rms_pair,
    noncontig_copy,
    param_grads,
    poison,
    ref_rows,
    row_batch_shape,
    row_full_mask,
    zero_param_grads,
    zip_strict,
)


def _rms_functional(fn):
    """``fn(x, ns, weight, eps=None, ...)`` called as ``(x, ns, weight, bias, ...)``."""

    def call(x, ns, weight=None, bias=None, **kw):
        assert bias is None, "RMSNorm has no bias"
        return fn(x, ns, weight, **kw)

    return call


class RowNorm(NamedTuple):
    make_pair: Callable  # (ns, dtype=, ref_dtype=, **kw) -> (masknorm module, torch module)
    functional: Callable  # (x, ns, weight, bias, **kw), masknorm.functional
    ref_functional: Callable  # (x, ns, weight, bias), torch.nn.functional
    has_bias: bool
    affine: Dict[str, dict]  # affine variant name -> constructor kwargs


NORMS = {
    "layer_norm": RowNorm(make_ln_pair, MF.layer_norm, F.layer_norm, True, LN_AFFINE),
    "rms_norm": RowNorm(
        make_rms_pair,
        _rms_functional(MF.rms_norm),
        _rms_functional(F.rms_norm),
        False,
        {"affine": dict(elementwise_affine=True), "no_affine": dict(elementwise_affine=False)},
    ),
}


def make_pair(norm, ns, **kw):
    """(masknorm module, torch reference module) for ``norm``, same affine params."""
    return NORMS[norm].make_pair(ns, **kw)


def _call(m, x, mask):
    return m(x) if mask is None else m(x, padding_mask=mask)


@pytest.mark.parametrize("shape_name", list(ROW_SHAPES))
@pytest.mark.parametrize("norm", list(NORMS))
def test_masked_valid_rows_equal_unmasked(norm, shape_name):
    """LN/RMS are row-wise: valid rows equal the unmasked result, padded rows are 0."""
    shape, ns = ROW_SHAPES[shape_name]
    m, _ = make_pair(norm, ns)
    x = torch.randn(shape)
    mask = make_mask("random", row_batch_shape(shape, ns))
    full = row_full_mask(mask, x)
    y_m = m(x, padding_mask=mask)
    y_p = m(x)
    assert_close(y_m[~full], y_p[~full])
    assert (y_m[full] == 0).all() and (y_p[full] != 0).any()


@pytest.mark.parametrize("shape_name", list(ROW_SHAPES))
@pytest.mark.parametrize("norm,affine", [(n, a) for n in NORMS for a in NORMS[n].affine])
def test_nan_inf_in_padding_never_leak(norm, affine, shape_name):
    shape, ns = ROW_SHAPES[shape_name]
    m, r = make_pair(norm, ns, **NORMS[norm].affine[affine])
    x = torch.randn(shape)
    g = torch.randn(shape)
    mask = make_mask("random", row_batch_shape(shape, ns))
    full = row_full_mask(mask, x)
    x_bad, g_bad = poison(x, full), poison(g, full)
    zero_param_grads(m, r)
    y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x_bad, g_bad)
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
@pytest.mark.parametrize("norm", list(NORMS))
def test_all_rows_padded(norm, shape_name):
    shape, ns = ROW_SHAPES[shape_name]
    m, _ = make_pair(norm, ns)
    mask = torch.ones(row_batch_shape(shape, ns), dtype=torch.bool)
    x = poison(torch.randn(shape), row_full_mask(mask, torch.empty(shape)))
    y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x, torch.randn(shape))
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.equal(gx, torch.zeros_like(gx))
    for p in param_grads(m):
        assert p is None or torch.equal(p, torch.zeros_like(p))


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("norm", list(NORMS))
def test_empty_batch(norm, with_mask):
    m, r = make_pair(norm, (8,))
    x = torch.randn(0, 5, 8, requires_grad=True)
    mask = torch.zeros(0, 5, dtype=torch.bool) if with_mask else None
    y = _call(m, x, mask)
    assert y.shape == r(x).shape == (0, 5, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", ["transpose", "step_slice"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_non_contiguous_input(norm, kind, masked):
    m, r = make_pair(norm, (8,))
    if kind == "transpose":
        leaf = torch.randn(5, 4, 8, requires_grad=True)
        view = lambda t: t.transpose(0, 1)  # (4, 5, 8)
    else:
        leaf = torch.randn(4, 5, 16, requires_grad=True)
        view = lambda t: t[:, :, ::2]  # (4, 5, 8), last-dim stride 2
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("D", [131, 1000])
@pytest.mark.parametrize("norm", list(NORMS))
def test_large_shapes(norm, D, dtype):
    """Odd row widths (SIMD tails) and > GRAIN_SIZE elements (several threads)."""
    n, l = (16, 50) if D == 131 else (8, 9)
    ref_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
    m, r = make_pair(norm, (D,), dtype=dtype, ref_dtype=ref_dtype)
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


@pytest.mark.parametrize("norm", list(NORMS))
def test_param_grads_without_input_grad(norm):
    m, r = make_pair(norm, (8,))
    x = torch.randn(4, 5, 8)
    mask = make_mask("random", (4, 5))
    g = torch.randn_like(x)
    m(x, padding_mask=mask).backward(g)
    ref_rows(r, x, mask).backward(g)
    assert_close(m.weight.grad, r.weight.grad)
    if NORMS[norm].has_bias:
        assert_close(m.bias.grad, r.bias.grad)


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_no_grad_and_inference_mode(norm, ctx):
    m, r = make_pair(norm, (8,))
    x = torch.randn(4, 5, 8)
    mask = make_mask("random", (4, 5))
    with torch.no_grad() if ctx == "no_grad" else torch.inference_mode():
        y = m(x, padding_mask=mask)
        assert not y.requires_grad
        assert_close(y, ref_rows(r, x, mask))


@pytest.mark.parametrize("norm", list(NORMS))
def test_functional_non_contiguous_params(norm):
    spec = NORMS[norm]
    x = torch.randn(4, 5, 8)
    mask = make_mask("random", (4, 5))
    w = (torch.rand(16) + 0.5)[::2]
    b = torch.randn(16)[::2] if spec.has_bias else None
    y = spec.functional(x, (8,), w, b, padding_mask=mask)
    b_ref = b.contiguous() if b is not None else None
    assert_close(y, ref_rows(lambda t: spec.ref_functional(t, (8,), w.contiguous(), b_ref), x, mask))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("norm", list(NORMS))
def test_low_precision_input_with_float32_module(norm, dtype):
    """bf16/fp16 activations through a float32 module (autocast-style), as nn allows."""
    m, r = make_pair(norm, (8,))
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
