"""MaskedLayerNorm and MaskedRMSNorm, masknorm.functional.layer_norm /
rms_norm and the layer_norm / rms_norm ops and their backward ops, against
nn.LayerNorm / nn.RMSNorm on the valid rows, parametrized over the two norms
(RMS norm is layer norm with the mean fixed at 0 and no bias), with the native
and the generic kernels, on every device.
"""

from typing import Callable, Dict, NamedTuple, Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import masknorm.functional as MF
from helpers import (
    ALL_DTYPES,
    LOW_PRECISION,
    assert_close,
    call_masked,
    check_step,
    copy_affine,
    fwd_bwd,
    make_row_pair,
    noncontig_copy,
    param_grads,
    poison,
    ref_rows,
    row_full_mask,
    zero_param_grads,
    zip_strict,
)
from samples import row_norm as R
from samples.common import make_mask, noncanonical_bool

pytestmark = pytest.mark.kernels

ops = torch.ops.masknorm


def _rms_functional(fn):
    """``fn(x, ns, weight, eps=None, ...)`` called as ``(x, ns, weight, bias, eps, ...)``."""

    def call(x, ns, weight=None, bias=None, eps=None, **kw):
        assert bias is None, "RMSNorm has no bias"
        return fn(x, ns, weight, eps, **kw)

    return call


class RowNorm(NamedTuple):
    functional: Callable  # (x, ns, weight, bias, eps, padding_mask=) in masknorm.functional
    ref_functional: Callable  # (x, ns, weight, bias, eps) in torch.nn.functional
    has_bias: bool
    affine: Dict[str, dict]  # affine variant name -> constructor kwargs
    eps: Tuple[Optional[float], ...]  # eps values worth testing


NORMS = {
    "layer_norm": RowNorm(
        MF.layer_norm, F.layer_norm, True,
        {"affine": dict(elementwise_affine=True, bias=True), "no_affine": dict(elementwise_affine=False),
         "no_bias": dict(elementwise_affine=True, bias=False)},
        (1e-5, 1e-2, 0.5),
    ),
    "rms_norm": RowNorm(
        _rms_functional(MF.rms_norm), _rms_functional(F.rms_norm), False,
        {"affine": dict(elementwise_affine=True), "no_affine": dict(elementwise_affine=False)},
        (None, 1e-6, 0.25),
    ),
}
NORM_AFFINE = [(n, a) for n in NORMS for a in NORMS[n].affine]


def _step(m, r, x, mask, **kw):
    """The one comparison: forward and backward against the torch module on the valid rows."""
    return check_step(m, r, lambda t: ref_rows(r, t, mask), x, mask, **kw)


def _small(device, dtype=torch.float32, shape=(4, 5, 8)):
    x = torch.randn(shape).to(device, dtype)
    return x, make_mask("padded", shape[:-1]).to(device)


# ---------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", R.PARITY_CASES, ids=str)
@pytest.mark.parametrize("norm,affine", NORM_AFFINE)
def test_parity(norm, affine, case, device):
    m, r = make_row_pair(norm, case.ns, device=device, **NORMS[norm].affine[affine])
    assert (m.weight is None) == (affine == "no_affine")
    if NORMS[norm].has_bias:
        assert (m.bias is None) == (affine != "affine")
    x, mask = R.inputs(case, device=device, scale=3.0, offset=1.0)
    y, gx = _step(m, r, x, mask)
    if mask is not None:
        full = row_full_mask(mask, x)
        assert (y[full] == 0).all() and (gx[full] == 0).all()


@pytest.mark.parametrize("name", ["rows", "seq", "mask3d"])
@pytest.mark.parametrize("norm", NORMS)
def test_mask_bytes_other_than_one_are_true(norm, name, device):
    """A bool mask holding bytes 2 or 255 (a uint8 tensor viewed as bool) is
    read as torch reads it, nonzero = True (the CPU kernels read such bytes as
    bool: undefined behaviour)."""
    case = R.parity_case(name)
    x, mask = R.inputs(case, device=device)
    m, r = make_row_pair(norm, case.ns, device=device)
    raw = noncanonical_bool(mask)
    y, gx = check_step(m, r, lambda t: ref_rows(r, t, mask), x, raw)
    assert (y[row_full_mask(mask, x)] == 0).all() and (gx[row_full_mask(mask, x)] == 0).all()


@pytest.mark.parametrize("case", R.EDGE_CASES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_edge_shapes(norm, case, device):
    """Width 1, a length-1 sequence, one sequence, empty batches. The reference
    runs in float64: with width 1 LN's input gradient is exactly 0, which
    torch's float32 kernel gives only to rounding (~3e-5 here)."""
    m, r = make_row_pair(norm, case.ns, ref_dtype=torch.float64, device=device)
    x, mask = R.inputs(case, device=device)
    y, _ = _step(m, r, x, mask, ref_dtype=torch.float64)
    assert y.shape == case.shape


@pytest.mark.parametrize("norm", NORMS)
def test_eps(norm, device):
    for eps in NORMS[norm].eps:
        m, r = make_row_pair(norm, (8,), eps=eps, device=device)
        x, mask = _small(device)
        _step(m, r, x * 0.3, mask)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_rms_eps_none_matches_nn_rmsnorm_same_dtype(dtype, masked, device):
    """eps=None: finfo(float32).eps for bf16/f16/f32, finfo(float64).eps for f64.

    Inputs are scaled so that mean(x^2) is comparable to that eps: a wrong eps
    (e.g. finfo(bfloat16).eps, or float32's eps for float64) changes the result
    far beyond the tolerance.
    """
    scale = 1e-8 if dtype == torch.float64 else 1e-4
    m, r = make_row_pair("rms_norm", (8,), dtype=dtype, eps=None, device=device)
    x, mask = _small(device)
    x = (x * scale).to(dtype)
    mask = mask if masked else None
    y = call_masked(m, x, mask)
    yr = ref_rows(r, x, mask)
    assert y.dtype == dtype
    assert_close(y, yr, **({"rtol": 1e-7, "atol": 1e-7} if dtype == torch.float64 else {}))
    # and the eps actually matters at this scale: a 100x larger eps gives a different answer
    r_big = nn.RMSNorm((8,), eps=torch.finfo(dtype).eps * 100 if dtype != torch.bfloat16 else 1e-2, dtype=dtype)
    copy_affine(r_big.to(device), m)
    assert not torch.allclose(ref_rows(r_big, x, mask).float(), yr.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("norm", NORMS)
def test_constant_rows_are_finite(norm, device):
    """A valid all-zero row (and for LN a constant one): eps keeps it finite, as torch's norms."""
    m, r = make_row_pair(norm, (8,), device=device)
    x, mask = _small(device)
    x[1, 2], x[2, 0] = 0.0, 3.0
    mask[1, 2] = mask[2, 0] = False
    y, gx = _step(m, r, x, mask)
    assert torch.isfinite(y).all() and torch.isfinite(gx).all()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", ["rows", "seq", "ns2"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_dtypes(norm, dtype, name, masked, device):
    case = R.parity_case(name, "padded" if masked else None)
    ref_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
    m, r = make_row_pair(norm, case.ns, dtype=dtype, ref_dtype=ref_dtype, device=device)
    assert m.weight.dtype == dtype
    x, mask = R.inputs(case, dtype=dtype, device=device)
    # check_step: outputs and gradients in dtype, parameter gradients in the weight's dtype
    y, _ = _step(m, r, x, mask, ref_dtype=ref_dtype)
    if masked:
        assert (y[row_full_mask(mask, x)] == 0).all()


# ---------------------------------------------------------------------------
# functional API and the ops
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("norm", NORMS)
def test_functional(norm, affine, masked, device):
    spec = NORMS[norm]
    case = R.parity_case("ns2", "padded" if masked else None)
    x, mask = R.inputs(case, device=device)
    w, b = R.affine_params(case.ns, "functional", device=device)
    w = w if affine else None
    b = b if affine and spec.has_bias else None
    for eps in spec.eps:
        y = spec.functional(x, case.ns, w, b, eps, padding_mask=mask)
        assert_close(y, ref_rows(lambda t: spec.ref_functional(t, case.ns, w, b, eps), x, mask))
    # default eps
    y = spec.functional(x, case.ns, padding_mask=mask)
    assert_close(y, ref_rows(lambda t: spec.ref_functional(t, case.ns), x, mask))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_op_saved_statistics(norm, dtype, device):
    """layer_norm returns (output, mean, rstd), rms_norm (output, rstd): in the
    accumulation dtype, 0 at padded rows."""
    eps = 1e-5
    case = R.parity_case("ns2")
    x, mask = R.inputs(case, dtype=dtype, device=device)
    ns = list(case.ns)
    if norm == "layer_norm":
        out, mean, rstd = ops.layer_norm(x, ns, mask, None, None, eps)
    else:
        out, rstd = ops.rms_norm(x, ns, mask, None, eps)
        mean = None
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == x.shape and out.dtype == dtype
    assert rstd.shape == case.mask_shape and rstd.dtype == stat_dtype
    xv = x[~mask].to(torch.float64).flatten(1)
    centered = xv - xv.mean(1, keepdim=True) if mean is not None else xv
    assert_close(rstd[~mask], 1 / torch.sqrt(centered.pow(2).mean(1) + eps), dtype=stat_dtype)
    assert torch.equal(rstd[mask], torch.zeros_like(rstd[mask]))
    if mean is not None:
        assert mean.shape == case.mask_shape and mean.dtype == stat_dtype
        assert_close(mean[~mask], xv.mean(1), dtype=stat_dtype)
        assert torch.equal(mean[mask], torch.zeros_like(mean[mask]))
    else:
        # eps=None through the op: torch's default for the accumulation dtype
        out_none, _ = ops.rms_norm(x, ns, mask, None, None)
        up = (lambda t: t.float()) if dtype in LOW_PRECISION else (lambda t: t)
        assert_close(out_none, ref_rows(lambda t: F.rms_norm(up(t), case.ns), x, mask))


@pytest.mark.parametrize("norm", NORMS)
def test_backward_op_output_mask(norm, device):
    spec = NORMS[norm]
    eps = 1e-5
    x, mask = _small(device)
    w, b = R.affine_params((8,), "backward", device=device)
    b = b if spec.has_bias else None
    if norm == "layer_norm":
        _, mean, rstd = ops.layer_norm(x, [8], mask, w, b, eps)
        backward = lambda om: ops.layer_norm_backward(g, x, [8], mask, mean, rstd, w, om)  # noqa: E731
    else:
        _, rstd = ops.rms_norm(x, [8], mask, w, eps)
        backward = lambda om: ops.rms_norm_backward(g, x, [8], mask, rstd, w, om)  # noqa: E731
    g = torch.randn_like(x)
    n_params = 2 if spec.has_bias else 1
    grads = backward([True] * (1 + n_params))
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b) if t is not None]
    ref_rows(lambda t: spec.ref_functional(t, (8,), *leaves[1:], eps=eps), leaves[0], mask).backward(g)
    for got, leaf in zip_strict(grads, leaves):
        assert_close(got, leaf.grad)
    only_input = backward([True] + [False] * n_params)
    assert torch.equal(only_input[0], grads[0]) and all(t is None for t in only_input[1:])
    only_params = backward([False] + [True] * n_params)
    assert only_params[0] is None
    for a, b in zip_strict(only_params[1:], grads[1:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("norm", NORMS)
def test_large_offset_is_numerically_stable(norm, device):
    """float32 rows around 1000 with unit spread: LN's variance must not cancel."""
    m, _ = make_row_pair(norm, (64,), device=device)
    r64 = nn.LayerNorm((64,), dtype=torch.float64) if norm == "layer_norm" else nn.RMSNorm((64,), dtype=torch.float64)
    copy_affine(r64.to(device), m)
    x, mask = _small(device, shape=(6, 7, 64))
    x = x + 1000.0
    assert_close(m(x, padding_mask=mask), ref_rows(r64, x.double(), mask), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------
# padding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", R.PARITY_SHAPES)
@pytest.mark.parametrize("norm", NORMS)
def test_masked_valid_rows_equal_unmasked(norm, name, device):
    """LN/RMS are row-wise: valid rows equal the unmasked result, padded rows are 0."""
    case = R.parity_case(name)
    m, _ = make_row_pair(norm, case.ns, device=device)
    x, mask = R.inputs(case, device=device)
    full = row_full_mask(mask, x)
    y_m = m(x, padding_mask=mask)
    y_p = m(x)
    assert_close(y_m[~full], y_p[~full])
    assert (y_m[full] == 0).all() and (y_p[full] != 0).any()


@pytest.mark.parametrize("name", R.PARITY_SHAPES)
@pytest.mark.parametrize("norm,affine", NORM_AFFINE)
def test_nan_inf_in_padding_never_leak(norm, affine, name, device):
    case = R.parity_case(name)
    m, r = make_row_pair(norm, case.ns, device=device, **NORMS[norm].affine[affine])
    x, mask = R.inputs(case, device=device)
    g = torch.randn(x.shape, device=device)
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


@pytest.mark.parametrize("name", ["rows", "seq", "ns2"])
@pytest.mark.parametrize("norm", NORMS)
def test_all_rows_padded(norm, name, device):
    case = R.parity_case(name)
    m, _ = make_row_pair(norm, case.ns, device=device)
    x, _ = R.inputs(case, device=device)
    mask = torch.ones(case.mask_shape, dtype=torch.bool, device=device)
    x = poison(x, row_full_mask(mask, x))
    y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x, torch.randn(x.shape, device=device))
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.equal(gx, torch.zeros_like(gx))
    for p in param_grads(m):
        assert p is None or torch.equal(p, torch.zeros_like(p))


# ---------------------------------------------------------------------------
# memory layout, sizes, modes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", ["transpose", "step_slice"])
@pytest.mark.parametrize("norm", NORMS)
def test_non_contiguous_input(norm, kind, masked, device):
    m, r = make_row_pair(norm, (8,), device=device)
    if kind == "transpose":
        leaf = torch.randn(5, 4, 8, device=device, requires_grad=True)
        view = lambda t: t.transpose(0, 1)  # noqa: E731  (4, 5, 8)
    else:
        leaf = torch.randn(4, 5, 16, device=device, requires_grad=True)
        view = lambda t: t[:, :, ::2]  # noqa: E731  (4, 5, 8), last-dim stride 2
    x = view(leaf)
    assert x.shape == (4, 5, 8) and not x.is_contiguous()
    _, mask = _small(device)
    mask = mask if masked else None
    g = torch.randn(4, 5, 8, device=device)
    y = call_masked(m, x, noncontig_copy(mask) if masked else None)
    y.backward(noncontig_copy(g))
    yr, gxr = fwd_bwd(lambda t: ref_rows(r, t, mask), x.detach().contiguous(), g)
    assert_close(y, yr)
    assert_close(view(leaf.grad), gxr)
    for a, b in zip_strict(param_grads(m), param_grads(r)):
        assert_close(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("D", [131, 1000])
@pytest.mark.parametrize("norm", NORMS)
def test_large_shapes(norm, D, dtype, device):
    """Odd row widths (SIMD tails) and > GRAIN_SIZE elements (several threads)."""
    n, l = (16, 50) if D == 131 else (8, 9)
    ref_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
    m, r = make_row_pair(norm, (D,), dtype=dtype, ref_dtype=ref_dtype, device=device)
    x, mask = R.inputs(R.Case((n, l, D), (D,)), dtype=dtype, device=device, offset=0.5)
    # the reference reduces another order: a bit looser in float32
    extra = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    y, gx = _step(m, r, x, mask, ref_dtype=ref_dtype, **extra)
    full = row_full_mask(mask, x)
    assert (y[full] == 0).all() and (gx[full] == 0).all()


@pytest.mark.parametrize("norm", NORMS)
def test_param_grads_without_input_grad(norm, device):
    m, r = make_row_pair(norm, (8,), device=device)
    x, mask = _small(device)
    g = torch.randn_like(x)
    m(x, padding_mask=mask).backward(g)
    ref_rows(r, x, mask).backward(g)
    for a, b in zip_strict(param_grads(m), param_grads(r)):
        assert_close(a, b)


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("norm", NORMS)
def test_no_grad_and_inference_mode(norm, ctx, device):
    m, r = make_row_pair(norm, (8,), device=device)
    x, mask = _small(device)
    with torch.no_grad() if ctx == "no_grad" else torch.inference_mode():
        y = m(x, padding_mask=mask)
        assert not y.requires_grad
        assert_close(y, ref_rows(r, x, mask))


@pytest.mark.parametrize("norm", NORMS)
def test_functional_non_contiguous_params(norm, device):
    spec = NORMS[norm]
    x, mask = _small(device)
    w = (torch.rand(16, device=device) + 0.5)[::2]
    b = torch.randn(16, device=device)[::2] if spec.has_bias else None
    y = spec.functional(x, (8,), w, b, padding_mask=mask)
    b_ref = b.contiguous() if b is not None else None
    assert_close(y, ref_rows(lambda t: spec.ref_functional(t, (8,), w.contiguous(), b_ref), x, mask))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_low_precision_input_with_float32_module(norm, dtype, device):
    """bf16/fp16 activations through a float32 module (autocast-style), as nn allows."""
    m, r = make_row_pair(norm, (8,), device=device)
    x, mask = _small(device, dtype=dtype)
    g = torch.randn(x.shape, device=device).to(dtype)
    y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x, g)
    yr, gxr = fwd_bwd(lambda t: ref_rows(r, t, mask), x.float(), g.float())
    assert y.dtype == dtype and gx.dtype == dtype
    assert all(p.grad.dtype == torch.float32 for p in m.parameters())
    assert_close(y, yr)
    assert_close(gx, gxr)
    for a, b in zip_strict(param_grads(m), param_grads(r)):
        assert_close(a, b, rtol=2e-2, atol=2e-2)
