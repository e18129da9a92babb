"""Helpers shared by the masknorm test modules (``from helpers import ...``;
``tests/`` has no ``__init__.py``, so pytest puts it on ``sys.path``): dtypes,
devices, tolerances, torch references, module pairs with the same state.
Fixtures and hooks are in ``conftest.py``; sample inputs per op in
``tests/samples/``.

The references follow the contract:

* masked BatchNorm == ``nn.BatchNorm1d`` applied to the *packed* valid tokens
  (NC: ``x[~m]``; NCL: ``x.transpose(1, 2)[~m]``; NLC: ``x[~m]``), scattered
  back with zeros at padding;
* masked LayerNorm / RMSNorm == ``nn.LayerNorm`` / ``nn.RMSNorm`` applied to
  ``x[~m]`` (the valid rows), zeros at padded rows.

Batch-norm layouts have one vocabulary (``BN_LAYOUTS``): ``NC`` (N, C) input
with an (N,) mask, ``NCL`` (N, C, L) with an (N, L) mask, ``NLC`` (N, L, C)
with an (N, L) mask and ``channels_last=True``.
"""

import contextlib
import inspect

import pytest
import torch
import torch.nn as nn

import masknorm

LOW_PRECISION = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

BN_LAYOUTS = ("NC", "NCL", "NLC")
KERNELS = ("native", "generic")
DEVICES = (
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")),
)

# nn.BatchNorm1d(bias=False): torch 2.13 has it, 2.11 (the GPU machine's) does not.
BN_TAKES_BIAS = "bias" in inspect.signature(nn.BatchNorm1d.__init__).parameters


@contextlib.contextmanager
def device_data_checks(device):
    """Data-dependent checks (a single valid value per channel) on `device`:
    always on for the CPU; on accelerators off by default (each would wait for
    the device), turned on here."""
    if torch.device(device).type == "cpu":
        yield
        return
    masknorm._C._enable_device_data_checks(True)
    try:
        yield
    finally:
        masknorm._C._enable_device_data_checks(False)
# --------------------------------------------------------------------------
# tolerances
# --------------------------------------------------------------------------


def tol(dtype):
    """(rtol, atol) for comparing a result of ``dtype`` with a reference."""
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-9)
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-5)
    return dict(rtol=2e-2, atol=2e-2)


def assert_close(actual, expected, dtype=None, **kw):
    """Compare ``actual`` with ``expected`` (cast to actual's dtype handled here)."""
    assert actual is not None, "expected a tensor, got None"
    dtype = dtype or actual.dtype
    t = tol(dtype)
    t.update(kw)
    torch.testing.assert_close(
        actual.detach().cpu().to(torch.float64),
        expected.detach().cpu().to(torch.float64),
        check_dtype=False,
        equal_nan=False,
        **t,
    )


# --------------------------------------------------------------------------
# BatchNorm helpers
# --------------------------------------------------------------------------


def is_channels_last(layout):
    """The ``channels_last`` flag of a batch-norm layout."""
    assert layout in BN_LAYOUTS, layout
    return layout == "NLC"


def bn_input_shape(layout, N, C, L):
    """The input shape of ``layout`` (L is ignored for NC)."""
    return {"NC": (N, C), "NCL": (N, C, L), "NLC": (N, L, C)}[layout]


def bn_mask_shape(layout, N, L):
    return (N,) if layout == "NC" else (N, L)


def bn_full_mask(mask, x, channels_last=False):
    """Expand a BN padding mask to x's shape (True at padded elements)."""
    if x.dim() == 2:
        return mask[:, None].expand_as(x)
    if channels_last:
        return mask[:, :, None].expand_as(x)
    return mask[:, None, :].expand_as(x)


def bn_pack(x, mask, channels_last=False):
    """Packed valid tokens, shape (K, C) (all positions when ``mask`` is None)."""
    rows = x if x.dim() == 2 or channels_last else x.transpose(1, 2)
    return rows.reshape(-1, rows.shape[-1]) if mask is None else rows[~mask]


def bn_unpack(packed, mask, shape, channels_last=False):
    """Scatter packed (K, C) rows back into ``shape`` with zeros at padding
    (differentiable w.r.t. ``packed``)."""
    if len(shape) == 2 or channels_last:
        out = packed.new_zeros(shape)
        out[~mask] = packed
        return out
    N, C, L = shape
    out = packed.new_zeros((N, L, C))
    out[~mask] = packed
    return out.transpose(1, 2)


def ref_bn(ref_module, x, mask=None, channels_last=False):
    """Reference masked BatchNorm with an ``nn.BatchNorm1d`` (or any callable
    taking (K, C) / (N, C, L))."""
    if mask is None:
        if x.dim() == 3 and channels_last:
            return ref_module(x.transpose(1, 2)).transpose(1, 2)
        return ref_module(x)
    return bn_unpack(ref_module(bn_pack(x, mask, channels_last)), mask, x.shape, channels_last)


def init_bn_state(module):
    """Random (but reasonable) affine params and running stats, in place."""
    init_affine(module)
    with torch.no_grad():
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.copy_(torch.empty(module.running_mean.shape).uniform_(-0.5, 0.5))
            module.running_var.copy_(torch.empty(module.running_var.shape).uniform_(0.5, 2.0))


def copy_state(dst, src, names=("weight", "bias", "running_mean", "running_var", "num_batches_tracked")):
    """Copy params/buffers by name (no reliance on state_dict compatibility)."""
    with torch.no_grad():
        for name in names:
            s = getattr(src, name, None)
            d = getattr(dst, name, None)
            if s is None or d is None:
                assert s is None and d is None, f"{name}: one module has it, the other does not"
                continue
            d.copy_(s.to(d.dtype))


def make_bn_pair(C, *, channels_last=False, dtype=torch.float32, ref_dtype=None, device="cpu", **kw):
    """(MaskedBatchNorm1d, nn.BatchNorm1d) with identical random state."""
    m = masknorm.MaskedBatchNorm1d(C, channels_last=channels_last, dtype=dtype, **kw)
    init_bn_state(m)
    r = nn.BatchNorm1d(C, dtype=ref_dtype or dtype, **kw)
    copy_state(r, m)
    return m.to(device), r.to(device)


def running_tol(dtype, device=None):
    """(rtol, atol) for running statistics of ``dtype`` against torch's: a few
    ulps in float32 and float64 (the update is the same formula; only the
    summation order differs), two roundings in half types (each step rounds
    the running statistics, the float32 reference does not). On CUDA both
    masknorm and torch reduce float32 in blocks (another order, measured
    1.3e-7 apart on values of size 1): atol 1e-6."""
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    if dtype == torch.float32:
        cuda = device is not None and torch.device(device).type == "cuda"
        return dict(rtol=1e-6, atol=1e-6 if cuda else 1e-7)
    return dict(rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps / 8)


def assert_buffers_match(m, r):
    """Running statistics and num_batches_tracked of a masked module equal torch's."""
    for name in ("running_mean", "running_var"):
        a, b = getattr(m, name), getattr(r, name)
        assert (a is None) == (b is None), f"{name}: one module has it, the other does not"
        if b is not None:
            assert_close(a, b, **running_tol(a.dtype, a.device))
    a, b = m.num_batches_tracked, r.num_batches_tracked
    assert (a is None) == (b is None)
    if b is not None:
        assert a.dtype == torch.long and int(a) == int(b)


def param_grads(module):
    return [p.grad for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if p is not None]


def zero_param_grads(*modules):
    for mod in modules:
        for p in mod.parameters():
            p.grad = None


def call_masked(module, x, mask):
    return module(x) if mask is None else module(x, padding_mask=mask)


def check_step(m, r, reference, x, mask, g=None, ref_dtype=None, **tol):
    """Forward and backward of ``m(x, padding_mask=mask)`` against
    ``reference(t)`` (which runs module ``r`` on t): output, input gradient
    and parameter gradients (these in ``m``'s parameter dtype) agree.
    The reference gets x and g in ``ref_dtype`` (default: x's). Returns
    (output, input gradient)."""
    g = torch.randn(x.shape, device=x.device).to(x.dtype) if g is None else g
    zero_param_grads(m, r)
    y, gx = fwd_bwd(lambda t: call_masked(m, t, mask), x, g)
    rd = ref_dtype or x.dtype
    yr, gxr = fwd_bwd(reference, x.to(rd), g.to(rd))
    assert y.shape == x.shape and y.dtype == x.dtype and gx.dtype == x.dtype
    assert y.device == x.device
    assert_close(y, yr, **tol)
    assert_close(gx, gxr, **tol)
    params = [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if p is not None]
    pr = param_grads(r)
    assert len(params) == len(pr)
    for p, b in zip(params, pr):
        assert p.grad is not None and p.grad.dtype == p.dtype
        assert_close(p.grad, b, **tol)
    return y, gx


# --------------------------------------------------------------------------
# LayerNorm / RMSNorm helpers
# --------------------------------------------------------------------------


def row_full_mask(mask, x):
    """Expand an LN/RMS mask (x.shape[:-k]) to x's shape."""
    k = x.dim() - mask.dim()
    return mask.reshape(mask.shape + (1,) * k).expand_as(x)


def ref_rows(ref_module, x, mask=None):
    """Reference masked LN/RMS: module on x[~m], zeros at padded rows."""
    if mask is None:
        return ref_module(x)
    y = ref_module(x[~mask])
    out = y.new_zeros(x.shape)
    out[~mask] = y
    return out


def init_affine(module):
    """Random (but reasonable) weight and bias, in place."""
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.copy_(torch.empty(module.weight.shape).uniform_(0.5, 1.5))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(torch.empty(module.bias.shape).uniform_(-0.5, 0.5))


def copy_affine(dst, src):
    """Copy weight and bias."""
    copy_state(dst, src, ("weight", "bias"))


ROW_NORMS = {"layer_norm": (masknorm.MaskedLayerNorm, nn.LayerNorm), "rms_norm": (masknorm.MaskedRMSNorm, nn.RMSNorm)}


def make_row_pair(norm, ns, dtype=torch.float32, ref_dtype=None, device="cpu", **kw):
    """(masknorm module, torch module) for ``norm`` ("layer_norm" or
    "rms_norm") with identical random affine parameters."""
    masked_cls, ref_cls = ROW_NORMS[norm]
    m = masked_cls(ns, dtype=dtype, **kw)
    init_affine(m)
    r = ref_cls(ns, dtype=ref_dtype or dtype, **kw)
    copy_affine(r, m)
    return m.to(device), r.to(device)


def fwd_bwd(fn, x, g):
    """Run y = fn(x_leaf); y.backward(g); return (y, x_leaf.grad)."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    y.backward(g)
    return y, x.grad


def poison(t, full_mask):
    """Copy of ``t`` with NaN / +inf / -inf written at positions where
    ``full_mask`` is True (cycling through the three values)."""
    t = t.detach().clone()
    idx = full_mask.nonzero(as_tuple=True)
    n = idx[0].numel()
    if n:
        bad = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=t.dtype, device=t.device)
        t[idx] = bad.repeat(n // 3 + 1)[:n]
    return t


def noncontig_copy(t):
    """A non-contiguous view with the same values as ``t`` (stride-2 last dim)."""
    v = torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    if t.numel() > 1:
        assert not v.is_contiguous()
    return v


def zip_strict(a, b):
    """zip(a, b, strict=True) for Python < 3.10."""
    a, b = list(a), list(b)
    assert len(a) == len(b), f"length mismatch: {len(a)} != {len(b)}"
    return zip(a, b)
