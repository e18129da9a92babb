"""Hypothesis property tests.

The parity properties (``test_bn_matches_torch_on_packed_tokens``,
``test_row_norm_matches_torch_on_valid_rows``) draw random shapes (size-1
dims, primes up to 127, C not a multiple of the vector width), masks (none,
all valid, fully padded sequences, a single valid token, scattered padding,
everything padded), the batch-norm layouts NC / NCL / NLC, all four dtypes,
non-contiguous and zero-size inputs, affine on/off, training/eval, and
compare outputs, input/weight/bias gradients and running statistics with
nn.BatchNorm1d on the packed valid tokens / nn.LayerNorm / nn.RMSNorm on the
valid rows; padded positions of the input and of the incoming gradient hold
NaN/inf, which must reach nothing (the row norms' permutation equivariance
follows: their reference is row by row). Smaller properties: batch norm's
permutation equivariance, padding contents never matter, merged partial
statistics equal the statistics of the whole.

In CI (the default) the examples are derandomized (the same ones every run)
and number well over a thousand. ``MASKNORM_HYPOTHESIS=nightly`` runs 20
times as many, fresh random ones each run (a failure prints the blob that
reproduces it, ``@reproduce_failure``).
"""

import os

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import masknorm
from helpers import (
    BN_LAYOUTS,
    bn_input_shape,
    assert_close,
    bn_full_mask,
    bn_mask_shape,
    bn_pack,
    copy_affine,
    copy_state,
    fwd_bwd,
    init_affine,
    init_bn_state,
    is_channels_last,
    param_grads,
    poison,
    ref_bn,
    ref_rows,
    row_full_mask,
    running_tol,
    tol,
)
from samples.common import lengths_mask

pytestmark = pytest.mark.slow  # hypothesis runs hundreds of examples per property

NIGHTLY = os.environ.get("MASKNORM_HYPOTHESIS", "ci") == "nightly"


def examples(n):
    """n examples in CI, 20 n in the nightly setting."""
    return 20 * n if NIGHTLY else n


def property_settings(n):
    return settings(
        max_examples=examples(n),
        deadline=None,
        database=None,
        derandomize=not NIGHTLY,
        print_blob=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


SETTINGS = property_settings(25)


@st.composite
def bn_cases(draw):
    layout = draw(st.sampled_from(BN_LAYOUTS))
    n = draw(st.integers(1, 5))
    c = draw(st.integers(1, 4))
    L = 1 if layout == "NC" else draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(0, L), min_size=n, max_size=n))
    # training needs >= 2 valid values per channel; with exactly 2 the input
    # gradient is pure cancellation (ill-conditioned), so ask for >= 3
    while sum(lengths) < 3:
        lengths = lengths + [L]
        n += 1
    seed = draw(st.integers(0, 2**31 - 1))
    return layout, n, c, L, lengths, seed


def _bn_data(layout, n, c, L, lengths, seed):
    torch.manual_seed(seed)
    if layout == "NC":
        x = torch.randn(n, c) * 3
        mask = lengths_mask(lengths, 1)[:, 0]
    else:
        x = torch.randn(bn_input_shape(layout, n, c, L)) * 3
        mask = lengths_mask(lengths, L)
    return x, mask


@SETTINGS
@given(case=bn_cases(), data=st.data())
def test_bn_batch_permutation_equivariance(case, data):
    layout, n, c, L, lengths, seed = case
    cl = is_channels_last(layout)
    x, mask = _bn_data(layout, n, c, L, lengths, seed)
    perm = torch.tensor(data.draw(st.permutations(list(range(n)))), dtype=torch.long)
    m1 = masknorm.MaskedBatchNorm1d(c, channels_last=cl)
    init_bn_state(m1)
    m2 = masknorm.MaskedBatchNorm1d(c, channels_last=cl)
    copy_state(m2, m1)
    y1 = m1(x, padding_mask=mask)
    y2 = m2(x[perm], padding_mask=mask[perm])
    assert_close(y2, y1[perm])
    assert_close(m2.running_mean, m1.running_mean)
    assert_close(m2.running_var, m1.running_var)


@SETTINGS
@given(case=bn_cases(), training=st.booleans(), fill=st.sampled_from(["nan", "huge", "random"]))
def test_bn_padded_values_never_change_outputs(case, training, fill):
    layout, n, c, L, lengths, seed = case
    cl = is_channels_last(layout)
    x, mask = _bn_data(layout, n, c, L, lengths, seed)
    full = bn_full_mask(mask, x, cl)
    if fill == "nan":
        x2 = poison(x, full)
    else:
        scale = 1e6 if fill == "huge" else 5.0
        x2 = torch.where(full, torch.randn_like(x) * scale, x)
    m1 = masknorm.MaskedBatchNorm1d(c, channels_last=cl)
    init_bn_state(m1)
    m2 = masknorm.MaskedBatchNorm1d(c, channels_last=cl)
    copy_state(m2, m1)
    m1.train(training)
    m2.train(training)
    g = torch.randn_like(x)
    y1, gx1 = fwd_bwd(lambda t: m1(t, padding_mask=mask), x, g)
    y2, gx2 = fwd_bwd(lambda t: m2(t, padding_mask=mask), x2, g)
    assert_close(y2, y1, rtol=1e-6, atol=1e-6)
    assert_close(gx2, gx1, rtol=1e-6, atol=1e-6)
    assert_close(m2.running_mean, m1.running_mean, rtol=1e-6, atol=1e-6)
    assert_close(m2.running_var, m1.running_var, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# parity with torch on random shapes, masks, layouts, dtypes and modes
# ---------------------------------------------------------------------------

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# size-1, small, vector widths +- 1 (8 doubles, 16 floats with AVX512), primes up to 127
SIZES = (1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 61, 127)
MASK_KINDS = ("none", "all_valid", "lengths", "scattered", "single_valid", "all_padded")


def _mask(kind, shape, gen):
    """A mask of ``shape`` ((N,) or (N, L)) of kind ``kind``: "lengths" pads
    the end of each sequence (some fully), "scattered" anywhere."""
    if kind == "none":
        return None
    numel = 1
    for n in shape:
        numel *= n
    if kind == "all_valid":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "all_padded":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "single_valid":
        mask = torch.ones(numel, dtype=torch.bool)
        if numel:
            mask[int(torch.randint(numel, (1,), generator=gen))] = False
        return mask.view(shape)
    if kind == "scattered" or len(shape) == 1:
        return torch.rand(shape, generator=gen) < float(torch.rand((), generator=gen))
    N, L = shape
    return lengths_mask(torch.randint(0, L + 1, (N,), generator=gen).tolist(), L)


def _data(shape, dtype, gen, noncontiguous):
    """N(offset, scale^2) data (offset and scale random per example), made in
    float64 and rounded to dtype; a stride-2 view when ``noncontiguous``."""
    offset = float(torch.randn((), generator=gen, dtype=torch.float64)) * 3
    scale = float(torch.rand((), generator=gen, dtype=torch.float64)) * 4 + 0.25
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)
    return _strided(x) if noncontiguous else x


def _strided(x):
    """x's values in a stride-2 view (NaN in between)."""
    return torch.stack([x, torch.full_like(x, float("nan"))], dim=-1)[..., 0]


@st.composite
def bn_parity_cases(draw):
    layout = draw(st.sampled_from(BN_LAYOUTS))
    N = draw(st.sampled_from((0, 1, 2, 3, 4, 7)))
    C = draw(st.sampled_from(SIZES))
    L = 1 if layout == "NC" else draw(st.sampled_from((0, 1, 2, 3, 5, 8, 13, 17)))
    return dict(
        layout=layout, N=N, C=C, L=L, mask=draw(st.sampled_from(MASK_KINDS)), dtype=draw(st.sampled_from(DTYPES)),
        training=draw(st.booleans()), affine=draw(st.booleans()), momentum=draw(st.sampled_from((0.1, None, 1.0))),
        noncontiguous=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _ref_dtype(dtype):
    """The references run in float64 on the same (rounded) values: what is
    compared is masknorm's error, not torch's float32 rounding as well."""
    return torch.float64


# Centered norms compute x - mean in float32: rounding errors of size
# eps32 * |mean| are amplified by 1 / std in xhat, so outputs and weight
# gradients are as accurate as eps32 * |mean| / std allows. Examples whose
# statistics are worse conditioned than this are not compared elementwise at
# the float32 tolerance (test_numerics.py measures data with large offsets
# against torch's own accuracy).
MAX_CONDITION = 100.0


def _condition(values, dim):
    """max over groups of |mean| / std of float64 values (statistics over ``dim``)."""
    if values.shape[dim] < 2 or values.numel() == 0:
        return 0.0
    mean, std = values.mean(dim), values.std(dim, unbiased=False)
    return float((mean.abs() / (std + 1e-300)).max()) if mean.numel() else 0.0


def _assert_input_grad_close(actual, expected, term_scale, dims, dtype):
    """|actual - expected| <= atol + rtol * scale, scale the larger of the
    group's largest |expected| (``dims`` reduced) and ``term_scale`` (the
    size of the terms the gradient is made of: rstd * |weight| * max |dy|
    per group). The input gradient of a norm is a projection of dy that may
    cancel to far below its terms (a channel of three values, two nearly
    equal), where an elementwise relative bound does not apply."""
    t = tol(dtype)
    a, e = actual.detach().double(), expected.detach().double()
    if not e.numel():
        return
    scale = torch.maximum(e.abs().amax(dim=dims, keepdim=True), term_scale)
    bad = (a - e).abs() > t["atol"] + t["rtol"] * scale
    assert not bad.any(), (
        f"{int(bad.sum())} of {a.numel()} elements off by up to {float((a - e).abs().max()):.3g} "
        f"(atol {t['atol']}, rtol {t['rtol']} of the group's scale)")


def _grads_match(actual, expected, scales, dtype):
    """Parameter gradients (sums over valid positions): |actual - expected|
    <= atol + rtol * the sum of the absolute terms (``scales``), the error
    bound of a sum, whose terms may cancel to near 0; None on one side only
    where the other is all zero (a batch without valid positions)."""
    t = tol(dtype)
    assert len(actual) == len(expected) == len(scales)
    for a, b, scale in zip(actual, expected, scales):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
            continue
        assert a.dtype == dtype and a.shape == b.shape
        err = (a.detach().double() - b.detach().double()).abs()
        assert not (err > t["atol"] + t["rtol"] * scale).any(), f"parameter gradient off by {float(err.max()):.3g}"


def _abs_term_sums(dy, xhat, has_weight, has_bias):
    """Per feature: sum |dy * xhat| (weight gradient) and sum |dy| (bias), over rows."""
    scales = []
    if has_weight:
        scales.append((dy.abs() * xhat.abs()).sum(0))
    if has_bias:
        scales.append(dy.abs().sum(0))
    return scales


@property_settings(500)
@given(case=bn_parity_cases())
def test_bn_matches_torch_on_packed_tokens(case):
    """MaskedBatchNorm1d against nn.BatchNorm1d on the packed valid tokens:
    output (0 at padding), input and parameter gradients, running statistics
    and num_batches_tracked, or the same ValueError (a single valid value per
    channel in training). NaN/inf stored at padding, in the input and in the
    incoming gradient, reaches nothing."""
    gen = torch.Generator().manual_seed(case["seed"])
    layout, dtype, training = case["layout"], case["dtype"], case["training"]
    cl = is_channels_last(layout)
    shape = bn_input_shape(layout, case["N"], case["C"], case["L"])
    x = _data(shape, dtype, gen, case["noncontiguous"])
    g = _data(shape, dtype, gen, False)
    mask = _mask(case["mask"], bn_mask_shape(layout, case["N"], case["L"]), gen)
    count = case["N"] * case["L"] if mask is None else int((~mask).sum())  # valid values per channel
    if mask is not None:
        full = bn_full_mask(mask, x, cl)
        x, g = poison(x, full), poison(g, full)
        x = _strided(x) if case["noncontiguous"] else x
    kw = dict(affine=case["affine"], momentum=case["momentum"])
    m = masknorm.MaskedBatchNorm1d(case["C"], channels_last=cl, dtype=dtype, **kw)
    init_bn_state(m)
    r = nn.BatchNorm1d(case["C"], dtype=_ref_dtype(dtype), **kw)
    copy_state(r, m)
    m.train(training), r.train(training)
    running_before = (m.running_mean.double().clone(), m.running_var.double().clone())
    if training and count == 1 and case["C"] > 0:
        with pytest.raises(ValueError):
            ref_bn(r, x.to(r.running_mean.dtype), mask, cl)
        with pytest.raises(ValueError):
            m(x, padding_mask=mask)
        return
    packed = bn_pack(x, mask, cl).double()
    if training and dtype != torch.float64:
        assume(_condition(packed, 0) < MAX_CONDITION)
    if training or m.running_mean is None:
        invstd = (packed.var(0, unbiased=False) + m.eps).rsqrt() if packed.shape[0] else torch.zeros(case["C"])
        xhat = (packed - packed.mean(0)) * invstd
    else:
        invstd = (m.running_var.double() + m.eps).rsqrt()
        xhat = (packed - m.running_mean.double()) * invstd
    grad_packed = bn_pack(g, mask, cl).double()
    scales = _abs_term_sums(grad_packed, xhat, case["affine"], case["affine"])
    term_scale = invstd.double() * (m.weight.detach().double().abs() if case["affine"] else 1) * (
        grad_packed.abs().amax(0) if grad_packed.shape[0] else 0)
    term_scale = term_scale.view((1, -1) if x.dim() == 2 else ((1, 1, -1) if cl else (1, -1, 1)))
    y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x, g)
    rd = _ref_dtype(dtype)
    yr, gxr = fwd_bwd(lambda t: ref_bn(r, t, mask, cl), x.to(rd), g.to(rd))
    assert y.dtype == dtype and gx.dtype == dtype and y.shape == x.shape
    if mask is not None:
        yr, gxr = yr.masked_fill(full, 0), gxr.masked_fill(full, 0)  # the reference leaves NaN-free zeros there too
        assert not y[full].any() and not gx[full].any()
    assert_close(y, yr, dtype=dtype)
    if not (training and count == 2):  # two values: the input gradient is pure cancellation
        # per channel: over N (and L)
        _assert_input_grad_close(gx, gxr, term_scale, (0,) if x.dim() == 2 else ((0, 1) if cl else (0, 2)), dtype)
    _grads_match(param_grads(m), param_grads(r), scales, dtype)
    assert int(m.num_batches_tracked) == int(r.num_batches_tracked)
    if m.running_mean is not None:
        # A few ulps (running_tol's rtol) of the terms: (1 - f) |running| + f |batch|, the batch
        # mean's own terms being the values' magnitudes (their sum may cancel to near 0).
        f = case["momentum"] if case["momentum"] is not None else 1 / max(int(m.num_batches_tracked), 1)
        mean_abs = packed.abs().mean(0) if packed.shape[0] else torch.zeros(case["C"], dtype=torch.float64)
        bounds = {"running_mean": (1 - f) * running_before[0].abs() + f * mean_abs,
                  "running_var": r.running_var.double().abs()}
        t = running_tol(dtype)
        for name, scale in bounds.items():
            err = (getattr(m, name).double() - getattr(r, name).double()).abs()
            assert not (err > t["atol"] + t["rtol"] * scale).any(), f"{name} off by {float(err.max()):.3g}"


@st.composite
def row_parity_cases(draw):
    norm = draw(st.sampled_from(("layer_norm", "rms_norm")))
    lead = tuple(draw(st.lists(st.sampled_from((0, 1, 2, 3, 5)), min_size=1, max_size=3)))
    ns = tuple(draw(st.lists(st.sampled_from(SIZES), min_size=1, max_size=2)))
    width = 1
    for n in ns:
        width *= n
    if norm == "layer_norm" and width == 2:
        ns = ns + (3,)  # two values per row: the LN input gradient is pure cancellation
    if width > 600:
        ns = ns[-1:]
    return dict(
        norm=norm, lead=lead, ns=ns, mask=draw(st.sampled_from(MASK_KINDS)), dtype=draw(st.sampled_from(DTYPES)),
        weight=draw(st.booleans()), bias=draw(st.booleans()), eps=draw(st.sampled_from((1e-5, 1e-3, None))),
        noncontiguous=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


@property_settings(500)
@given(case=row_parity_cases())
def test_row_norm_matches_torch_on_valid_rows(case):
    """MaskedLayerNorm / MaskedRMSNorm against nn.LayerNorm / nn.RMSNorm on the
    valid rows: output (0 on padded rows), input and parameter gradients;
    NaN/inf stored in padded rows (input and incoming gradient) reaches nothing."""
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, ns = case["dtype"], case["ns"]
    shape = case["lead"] + ns
    x = _data(shape, dtype, gen, case["noncontiguous"])
    g = _data(shape, dtype, gen, False)
    kind = case["mask"] if len(case["lead"]) <= 2 else ("scattered" if case["mask"] == "lengths" else case["mask"])
    mask = _mask(kind, case["lead"], gen) if len(case["lead"]) <= 2 or kind in ("none", "all_valid", "all_padded") \
        else torch.rand(case["lead"], generator=gen) < 0.4
    if mask is not None:
        full = row_full_mask(mask, x)
        x, g = poison(x, full), poison(g, full)
        x = _strided(x) if case["noncontiguous"] else x
    if case["norm"] == "layer_norm":
        eps = 1e-5 if case["eps"] is None else case["eps"]
        kw = dict(eps=eps, elementwise_affine=case["weight"], bias=case["bias"])
        m, r = masknorm.MaskedLayerNorm(ns, dtype=dtype, **kw), nn.LayerNorm(ns, dtype=_ref_dtype(dtype), **kw)
    else:
        kw = dict(eps=case["eps"], elementwise_affine=case["weight"])
        m, r = masknorm.MaskedRMSNorm(ns, dtype=dtype, **kw), nn.RMSNorm(ns, dtype=_ref_dtype(dtype), **kw)
    init_affine(m)
    copy_affine(r, m)
    if case["norm"] == "rms_norm" and case["eps"] is None and dtype != torch.float64:
        r.eps = torch.finfo(torch.float32).eps  # eps=None: the accumulation type's (float32 for half types)
    width = 1
    for n in ns:
        width *= n
    valid = None if mask is None else ~mask.reshape(-1)
    rows = x.reshape(-1, width).double()
    rows = rows if valid is None else rows[valid]
    grad_rows = g.reshape(-1, width).double()
    grad_rows = grad_rows if valid is None else grad_rows[valid]
    if case["norm"] == "layer_norm":
        if dtype != torch.float64:
            assume(_condition(rows, 1) < MAX_CONDITION)
        centered = rows - rows.mean(1, keepdim=True)
        rstd = ((centered * centered).mean(1, keepdim=True) + m.eps).rsqrt()
        xhat = centered * rstd
    else:
        eps = m.eps if m.eps is not None else torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        rstd = ((rows * rows).mean(1, keepdim=True) + eps).rsqrt()
        xhat = rows * rstd
    # per row: rstd * max |dy * weight|, 0 at padded rows
    gw = grad_rows * (m.weight.detach().double().reshape(1, -1) if m.weight is not None else 1)
    row_scale = torch.zeros(rows_total := x.numel() // width if width else 0, dtype=torch.float64)
    if rows.shape[0]:
        terms = (rstd * gw.abs().amax(1, keepdim=True)).reshape(-1)
        if valid is None:
            row_scale = terms
        else:
            row_scale[valid] = terms
    term_scale = row_scale.reshape(case["lead"] + (1,) * len(ns))
    has_bias = getattr(m, "bias", None) is not None
    scales = [sc.reshape(ns) for sc in _abs_term_sums(grad_rows, xhat, m.weight is not None, has_bias)]
    y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x, g)
    rd = _ref_dtype(dtype)
    yr, gxr = fwd_bwd(lambda t: ref_rows(r, t, mask), x.to(rd), g.to(rd))
    assert y.dtype == dtype and gx.dtype == dtype and y.shape == x.shape
    if mask is not None:
        assert not y[full].any() and not gx[full].any()
    assert_close(y, yr, dtype=dtype)
    _assert_input_grad_close(gx, gxr, term_scale, tuple(range(len(case["lead"]), x.dim())), dtype)  # per row
    _grads_match(param_grads(m), param_grads(r), scales, dtype)


@st.composite
def split_cases(draw):
    case = draw(bn_cases())
    layout, n = case[0], case[1]
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    return case, cuts


@property_settings(100)
@given(case=split_cases(), dtype=st.sampled_from((torch.float64, torch.float32)))
def test_merged_part_statistics_equal_the_whole(case, dtype):
    """batch_norm_stats of parts of the batch (some empty), merged by
    batch_norm_merge_stats, give the statistics of the whole batch."""
    (layout, n, c, L, lengths, seed), cuts = case
    cl = is_channels_last(layout)
    x, mask = _bn_data(layout, n, c, L, lengths, seed)
    x = x.to(dtype)
    bounds = [0] + cuts + [n]
    parts = [torch.ops.masknorm.batch_norm_stats(x[a:b], mask[a:b], cl) for a, b in zip(bounds, bounds[1:])]
    mean, m2, count = (torch.stack(t) for t in zip(*parts))
    merged = torch.ops.masknorm.batch_norm_merge_stats(mean, m2, count, None, None, None, 0.1, 1e-5)
    whole_mean, whole_m2, whole_count = torch.ops.masknorm.batch_norm_stats(x, mask, cl)
    packed = bn_pack(x, mask, cl).double()
    assert int(merged[2]) == int(whole_count) == packed.shape[0]
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(merged[0].double(), packed.mean(0), rtol=rtol, atol=rtol)
    var = ((packed - packed.mean(0)) ** 2).mean(0)
    torch.testing.assert_close(merged[1].double(), (var + 1e-5).rsqrt(), rtol=rtol * 10, atol=rtol * 10)
    torch.testing.assert_close(merged[0], whole_mean, rtol=rtol, atol=rtol)
