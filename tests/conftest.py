"""Shared helpers and fixtures for the masknorm test suite.

The references used throughout the suite follow the contract:

* masked BatchNorm == ``nn.BatchNorm1d`` applied to the *packed* valid tokens
  (2-D: ``x[~m]``; channels-first (N, C, L): ``x.transpose(1, 2)[~m]``;
  channels_last (N, L, C): ``x[~m]``), scattered back with zeros at padding;
* masked LayerNorm / RMSNorm == ``nn.LayerNorm`` / ``nn.RMSNorm`` applied to
  ``x[~m]`` (the valid rows), zeros at padded rows.

Test modules import the plain helper functions with ``from conftest import ...``
(``tests/`` has no ``__init__.py``, so pytest puts it on ``sys.path``).
"""

import pytest
import torch
import torch.nn as nn

import masknorm  # noqa: F401  (a failing import must fail the whole suite)

LOW_PRECISION = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

# layouts for BatchNorm inputs
BN_LAYOUTS = ("2d", "3d", "3d_cl")


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same RNG state (reproducible failures)."""
    torch.manual_seed(0)
    yield 0


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
        actual.detach().to(torch.float64),
        expected.detach().to(torch.float64),
        check_dtype=False,
        equal_nan=False,
        **t,
    )


# --------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------


def lengths_mask(lengths, max_len=None):
    """Padding mask (True = padding) from a list/tensor of lengths."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    return masknorm.padding_mask_from_lengths(lengths, max_len)


def random_lengths(n, max_len, min_len=1):
    """Random lengths in [min_len, max_len]; the first row is full length and,
    when possible, the last row is padded, so the mask has some padding."""
    lengths = torch.randint(min_len, max_len + 1, (n,))
    if n > 0:
        lengths[0] = max_len
    if n > 1 and max_len > min_len:
        lengths[-1] = torch.randint(min_len, max_len, (1,)).item()
    return lengths


def random_lengths_mask(n, max_len, min_len=1):
    """(N, max_len) bool mask built with masknorm.padding_mask_from_lengths."""
    return lengths_mask(random_lengths(n, max_len, min_len), max_len)


def random_row_mask(n, min_valid=2, min_pad=1):
    """(N,) bool mask for 2-D inputs with >= min_valid valid and >= min_pad padded rows."""
    assert n >= min_valid + min_pad
    perm = torch.randperm(n)
    n_pad = torch.randint(min_pad, n - min_valid + 1, (1,)).item()
    mask = torch.zeros(n, dtype=torch.bool)
    mask[perm[:n_pad]] = True
    return mask


def make_mask(kind, batch_shape):
    """kind: None (no mask), 'all_false' (all-False mask), 'random' (some padding)."""
    if kind is None:
        return None
    if kind == "all_false":
        return torch.zeros(batch_shape, dtype=torch.bool)
    if kind == "random":
        if len(batch_shape) == 1:
            # >= 3 valid rows: with only 2 values per channel the BN input
            # gradient is pure cancellation (ill-conditioned in any implementation)
            return random_row_mask(batch_shape[0], min_valid=3)
        n, L = batch_shape[0], batch_shape[-1]
        if len(batch_shape) == 2:
            return random_lengths_mask(n, L)
        # more leading dims: random bool with guaranteed valid/pad entries
        m = torch.rand(batch_shape) < 0.35
        flat = m.view(-1)
        flat[0] = False
        flat[1] = False
        flat[-1] = True
        return m
    raise ValueError(kind)


# --------------------------------------------------------------------------
# BatchNorm helpers
# --------------------------------------------------------------------------


def bn_input_shape(layout, N, C, L):
    if layout == "2d":
        return (N, C)
    if layout == "3d":
        return (N, C, L)
    if layout == "3d_cl":
        return (N, L, C)
    raise ValueError(layout)


def bn_mask_shape(layout, N, L):
    return (N,) if layout == "2d" else (N, L)


def bn_full_mask(mask, x, channels_last=False):
    """Expand a BN padding mask to x's shape (True at padded elements)."""
    if x.dim() == 2:
        return mask[:, None].expand_as(x)
    if channels_last:
        return mask[:, :, None].expand_as(x)
    return mask[:, None, :].expand_as(x)


def bn_pack(x, mask, channels_last=False):
    """Packed valid tokens, shape (K, C)."""
    if x.dim() == 2 or channels_last:
        return x[~mask]
    return x.transpose(1, 2)[~mask]


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


def init_bn_state(module, dtype=None):
    """Random (but reasonable) affine params and running stats, in place."""
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.copy_(torch.empty(module.weight.shape).uniform_(0.5, 1.5))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(torch.empty(module.bias.shape).uniform_(-0.5, 0.5))
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.copy_(torch.empty(module.running_mean.shape).uniform_(-0.5, 0.5))
            module.running_var.copy_(torch.empty(module.running_var.shape).uniform_(0.5, 2.0))


def copy_state(dst, src, dtype=None):
    """Copy params/buffers by name (no reliance on state_dict compatibility)."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            s = getattr(src, name, None)
            d = getattr(dst, name, None)
            if s is None or d is None:
                assert s is None and d is None, f"{name}: one module has it, the other does not"
                continue
            d.copy_(s.to(d.dtype))


def make_bn_pair(C, *, channels_last=False, dtype=torch.float32, ref_dtype=None, **kw):
    """(MaskedBatchNorm1d, nn.BatchNorm1d) with identical random state."""
    m = masknorm.MaskedBatchNorm1d(C, channels_last=channels_last, dtype=dtype, **kw)
    init_bn_state(m)
    r = nn.BatchNorm1d(C, dtype=ref_dtype or dtype, **kw)
    copy_state(r, m)
    return m, r


def param_grads(module):
    return [p.grad for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if p is not None]


def zero_param_grads(*modules):
    for mod in modules:
        for p in mod.parameters():
            p.grad = None


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
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.copy_(torch.empty(module.weight.shape).uniform_(0.5, 1.5))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(torch.empty(module.bias.shape).uniform_(-0.5, 0.5))


def copy_affine(dst, src):
    with torch.no_grad():
        for name in ("weight", "bias"):
            s = getattr(src, name, None)
            d = getattr(dst, name, None)
            if s is None or d is None:
                assert s is None and d is None, f"{name}: one module has it, the other does not"
                continue
            d.copy_(s.to(d.dtype))


# name -> (input shape, normalized_shape)
ROW_SHAPES = {
    "2d": ((6, 8), (8,)),
    "3d": ((4, 5, 8), (8,)),
    "multi_dim_ns": ((3, 4, 3, 4), (3, 4)),
    "3d_ns2": ((6, 3, 4), (3, 4)),
}

# MaskedLayerNorm / nn.LayerNorm affine variants: name -> constructor kwargs
LN_AFFINE = {
    "affine": dict(elementwise_affine=True, bias=True),
    "no_affine": dict(elementwise_affine=False),
    "no_bias": dict(elementwise_affine=True, bias=False),
}


def row_batch_shape(shape, ns):
    """The leading (mask) dims of an LN/RMS input ``shape`` normalized over ``ns``."""
    return shape[: len(shape) - len(ns)]


def _make_row_pair(masked_cls, ref_cls, ns, dtype, ref_dtype, **kw):
    m = masked_cls(ns, dtype=dtype, **kw)
    init_affine(m)
    r = ref_cls(ns, dtype=ref_dtype or dtype, **kw)
    copy_affine(r, m)
    return m, r


def make_ln_pair(ns, dtype=torch.float32, ref_dtype=None, **kw):
    """(MaskedLayerNorm, nn.LayerNorm) with identical random affine params."""
    return _make_row_pair(masknorm.MaskedLayerNorm, nn.LayerNorm, ns, dtype, ref_dtype, **kw)


def make_rms_pair(ns, dtype=torch.float32, ref_dtype=None, **kw):
    """(MaskedRMSNorm, nn.RMSNorm) with identical random affine params."""
    return _make_row_pair(masknorm.MaskedRMSNorm, nn.RMSNorm, ns, dtype, ref_dtype, **kw)


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
        bad = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=t.dtype)
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
