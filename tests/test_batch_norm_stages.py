"""The batch-norm stage ops against float64 references, with the native and
the generic kernels, on every device:

* batch_norm_stats: count, mean and M2 of the valid positions, for each
  layout and mask, edge sizes and dtypes; NaN at padding changes nothing;
* batch_norm_merge_stats: merged parts give the statistics of their
  concatenation, parts of count 0 skipped whatever their mean and M2 hold (no
  NaN out), float counts accepted; the running statistics (momentum,
  momentum=None with num_batches_tracked, unbiased variance from M2,
  untouched when the total count is 0, ValueError when it is 1);
* batch_norm_elemt with given statistics;
* batch_norm_backward_reduce's sums, batch_norm_backward_elemt with and
  without them;
* stats -> merge_stats -> elemt and backward_reduce -> backward_elemt give
  batch_norm and batch_norm_backward's results bit for bit.
"""

import pytest
import torch

from helpers import ALL_DTYPES, BN_LAYOUTS, bn_full_mask, bn_pack, device_data_checks, poison
from samples import batch_norm as S

pytestmark = pytest.mark.kernels

ops = torch.ops.masknorm
EPS = 1e-5
STATS_CASES = S.PARITY_CASES + S.EDGE_CASES


def stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def close(actual, expected, dtype=torch.float32, **tol):
    """Compared in float64 on the CPU; ``dtype`` is the precision the result was computed in."""
    default = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        actual.detach().cpu().double(), expected.detach().cpu().double(), **{**default, **tol}
    )


def reference_stats(x, mask, channels_last):
    """(mean, M2, count) of the valid positions in float64 (0 without any)."""
    packed = bn_pack(x.detach().cpu().double(), None if mask is None else mask.cpu(), channels_last)
    count = packed.shape[0]
    mean = packed.sum(0) / max(count, 1)
    return mean, ((packed - mean) ** 2).sum(0), count


def per_channel(t, x, channels_last):
    """A (C,) tensor shaped to broadcast against x."""
    if x.dim() == 2 or channels_last:
        return t
    return t[:, None]


def valid(x, mask, channels_last):
    """Bool of x's shape, True at valid positions."""
    if mask is None:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    return ~bn_full_mask(mask, x, channels_last)


# ------------------------------------------------------------------ stats


def _check_stats(x, mask, cl, dtype=torch.float32, **tol):
    mean, m2, count = ops.batch_norm_stats(x, mask, cl)
    C = x.shape[-1] if cl or x.dim() == 2 else x.shape[1]
    sd = stat_dtype(x.dtype)
    assert mean.shape == m2.shape == (C,) and mean.dtype == m2.dtype == sd
    assert count.shape == () and count.dtype == torch.int64
    assert mean.device == m2.device == count.device == x.device
    rmean, rm2, rcount = reference_stats(x, mask, cl)
    assert int(count) == rcount
    close(mean, rmean, sd, **tol)
    close(m2, rm2, sd, **tol)
    return mean, m2, count


@pytest.mark.parametrize("case", STATS_CASES, ids=str)
def test_stats_match_reference(case, device):
    x, mask = S.inputs(case, device=device)
    stats = _check_stats(x, mask, case.channels_last)
    if mask is not None and mask.any():
        # NaN / inf at padding: nothing changes
        dirty = ops.batch_norm_stats(poison(x, bn_full_mask(mask, x, case.channels_last)), mask, case.channels_last)
        for a, b in zip(dirty, stats):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_stats_dtypes(layout, dtype, device):
    # half inputs accumulate in float32: their (rounded) values' statistics to float32 precision
    case = S.parity_case(layout)
    x, mask = S.inputs(case, dtype=dtype, device=device)
    _check_stats(x, mask, case.channels_last)


@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_stats_large_offset(layout, device):
    # float32 values around 1000 with unit spread: E[x^2] - E[x]^2 would lose the variance.
    # CPU (native and generic kernels) measured: mean 2.9e-8, M2 1.9e-7 relative.
    case = S.Case(layout, 40, 5, 9) if layout != "NC" else S.Case(layout, 300, 5)
    x, mask = S.inputs(case, device=device, scale=1.0, offset=1000.0)
    tol = dict(rtol=2e-6, atol=0) if torch.device(device).type == "cpu" else dict(rtol=1e-4, atol=1e-3)
    _check_stats(x, mask, case.channels_last, **tol)


@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_stats_of_a_large_offset_have_no_bias(layout):
    """1e4 + 0.01 noise in float32 (CPU kernels, native and generic): the first
    pass's mean is off by up to half an ulp of 1e4, 5% of the spread; M2 taken
    about it without the deviations' sum as a correction is biased by that
    squared (about 1e-3 relative, 8e-3 measured before the correction)."""
    case = S.Case(layout, 300, 5) if layout == "NC" else S.Case(layout, 16, 7, 64)
    x, mask = S.inputs(case, scale=0.01, offset=1e4)
    mean, m2, count = ops.batch_norm_stats(x, mask, case.channels_last)
    rmean, rm2, rcount = reference_stats(x, mask, case.channels_last)
    assert int(count) == rcount
    torch.testing.assert_close(m2.double(), rm2, rtol=1e-5, atol=0)
    # the mean to its float32 rounding
    torch.testing.assert_close(mean.double(), rmean, rtol=2 ** -24, atol=0)


# ------------------------------------------------------------------ merge_stats

SPLITS = {"NC": [4, 1, 5, 3], "NCL": [2, 1, 1, 1], "NLC": [1, 1, 2, 1]}


def _parts(layout, device, dtype=torch.float32):
    case = S.parity_case(layout)
    x, mask, mean, m2, count = S.parts_of(case, SPLITS[layout], dtype=dtype, device=device)
    xs = x.split(SPLITS[layout])
    masks = mask.split(SPLITS[layout])
    return case, xs, masks, mean, m2, count


def _reference_of_parts(case, xs, masks, keep):
    x = torch.cat([t for i, t in enumerate(xs) if i in keep])
    mask = torch.cat([t for i, t in enumerate(masks) if i in keep])
    return reference_stats(x, mask, case.channels_last)


def _check_merged(merged, reference, dtype=torch.float32):
    mean, invstd, count = merged
    rmean, rm2, rcount = reference
    assert count.shape == () and count.dtype == torch.int64 and int(count) == rcount
    assert torch.isfinite(mean).all() and torch.isfinite(invstd).all()
    close(mean, rmean, dtype)
    close(invstd, (rm2 / rcount + EPS).rsqrt() if rcount else torch.zeros_like(rm2), dtype)


@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_merge_equals_stats_of_the_whole(layout, device):
    case, xs, masks, mean, m2, count = _parts(layout, device)
    merged = ops.batch_norm_merge_stats(mean, m2, count, None, None, None, 0.1, EPS)
    _check_merged(merged, _reference_of_parts(case, xs, masks, keep=range(len(xs))))
    # and batch_norm_stats of the concatenation (another summation order: float32 rounding apart)
    whole_mean, whole_m2, whole_count = ops.batch_norm_stats(torch.cat(xs), torch.cat(masks), case.channels_last)
    assert torch.equal(merged[2], whole_count)
    close(merged[0], whole_mean, rtol=1e-6, atol=1e-6)
    close(merged[1], (whole_m2 / whole_count + EPS).rsqrt(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_merge_skips_parts_of_count_zero(layout, device):
    # parts 1 and 3 get count 0 with NaN (part 1) and 1e30 / -inf (part 3) as mean and m2
    case, xs, masks, mean, m2, count = _parts(layout, device)
    empty = S.with_empty_parts(mean, m2, count)
    merged = ops.batch_norm_merge_stats(*empty, None, None, None, 0.1, EPS)
    _check_merged(merged, _reference_of_parts(case, xs, masks, keep=(0, 2)))
    # the same as leaving those parts out
    kept = [0, 2]
    without = ops.batch_norm_merge_stats(mean[kept], m2[kept], count[kept], None, None, None, 0.1, EPS)
    for a, b in zip(merged, without):
        close(a, b, rtol=1e-6, atol=1e-7)


def test_merge_of_nothing_gives_zeros(device):
    nan = torch.full((3, 4), float("nan"), device=device)
    mean, invstd, count = ops.batch_norm_merge_stats(nan, nan, torch.zeros(3, dtype=torch.long, device=device),
                                                     None, None, None, 0.1, EPS)
    assert int(count) == 0
    assert torch.equal(mean, torch.zeros_like(mean)) and torch.equal(invstd, torch.zeros_like(invstd))


@pytest.mark.parametrize("count_dtype", [torch.float32, torch.float64, torch.int32], ids=str)
def test_merge_accepts_other_count_dtypes(count_dtype, device):
    _, _, _, mean, m2, count = _parts("NCL", device)
    expected = ops.batch_norm_merge_stats(mean, m2, count, None, None, None, 0.1, EPS)
    # Counts gathered in a float tensor are whole numbers exactly (a float holds
    # every integer up to 2**24, and only integers above); fractions raise
    # (test_errors.py: test_counts_must_be_whole_and_non_negative).
    for a, b in zip(ops.batch_norm_merge_stats(mean, m2, count.to(count_dtype), None, None, None, 0.1, EPS), expected):
        assert torch.equal(a, b)


def _running(device, dtype=torch.float32):
    _, _, rm, rv = S.features(S.MERGE_CASE.C, "running", dtype=dtype, device=device)
    return rm, rv, torch.tensor(4, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_merge_updates_running_stats(momentum, dtype, device):
    x, mask, mean, m2, count = S.parts_of(S.MERGE_CASE, S.MERGE_SPLITS, dtype=dtype, device=device)
    rm, rv, nbt = _running(device, dtype)
    rm0, rv0 = rm.double().cpu().clone(), rv.double().cpu().clone()
    ptrs = rm.data_ptr(), rv.data_ptr()
    merged = ops.batch_norm_merge_stats(mean, m2, count, rm, rv, nbt, momentum, EPS)
    rmean, rm2, n = reference_stats(x, mask, S.MERGE_CASE.channels_last)
    _check_merged(merged, (rmean, rm2, n), dtype)
    assert int(nbt) == 5 and (rm.data_ptr(), rv.data_ptr()) == ptrs
    f = 1 / 5 if momentum is None else momentum
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    close(rm, (1 - f) * rm0 + f * rmean, **tol)
    unbiased = (1 - f) * rv0 + f * rm2 / (n - 1)
    close(rv, unbiased, **tol)
    # the tolerance tells a biased variance apart
    biased = (1 - f) * rv0 + f * rm2 / n
    assert ((rv.cpu().double() - biased).abs() > 100 * (tol["atol"] + tol["rtol"] * biased.abs())).all()


def test_running_var_from_m2_not_from_invstd(device):
    # variance 1e-6 with eps 1: invstd^-2 - eps in float32 keeps ~1 significant digit of it
    case = S.Case("NLC", 6, 5, 9)
    x, mask = S.inputs(case, device=device, scale=1e-3, offset=3.0)
    mean, m2, count = ops.batch_norm_stats(x, mask, True)
    rm, rv = torch.zeros(5, device=device), torch.zeros(5, device=device)
    ops.batch_norm_merge_stats(mean[None], m2[None], count[None], rm, rv, None, 1.0, 1.0)
    rmean, rm2, n = reference_stats(x, mask, True)
    # CUDA merges many float32 partial moments whose means (3.0) dwarf the
    # spread (1e-3): measured 1.4e-4 relative. From invstd it would be ~10%.
    close(rv, rm2 / (n - 1), rtol=1e-4 if torch.device(device).type == "cpu" else 1e-3, atol=0)
    close(rm, rmean, rtol=1e-6, atol=0)


def test_merge_running_stats_untouched_when_total_count_is_zero(device):
    rm, rv, nbt = _running(device)
    rm0, rv0 = rm.clone(), rv.clone()
    nan = torch.full((2, S.MERGE_CASE.C), float("nan"), device=device)
    zero = torch.zeros(2, dtype=torch.long, device=device)
    for momentum in (0.1, None):
        ops.batch_norm_merge_stats(nan, nan, zero, rm, rv, nbt, momentum, EPS)
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert int(nbt) == 6  # counted, as torch counts an empty batch


def test_merge_total_count_one_raises_value_error(device):
    _, _, rm, rv = S.features(3, "one", device=device)
    rm0, rv0 = rm.clone(), rv.clone()
    mean = torch.tensor([[1.0, 2.0, 3.0], [float("nan")] * 3], device=device)
    m2 = torch.tensor([[0.0, 0.0, 0.0], [float("nan")] * 3], device=device)
    count = torch.tensor([1, 0], device=device)
    with device_data_checks(device), pytest.raises(
            ValueError, match="masknorm::batch_norm_merge_stats: expected more than 1 valid"):
        ops.batch_norm_merge_stats(mean, m2, count, rm, rv, None, 0.1, EPS)
    with device_data_checks(device), pytest.raises(ValueError, match="more than 1 valid"):
        ops.batch_norm_merge_stats(mean, m2, count, None, None, None, 0.1, EPS)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_merge_num_batches_tracked_without_running_stats(device):
    _, _, _, mean, m2, count = _parts("NLC", device)
    nbt = torch.tensor(7, device=device)
    ops.batch_norm_merge_stats(mean, m2, count, None, None, nbt, 0.1, EPS)
    assert int(nbt) == 8
    ops.batch_norm_merge_stats(mean, m2, count, None, None, None, 0.1, EPS)
    assert int(nbt) == 8


def test_merge_running_stats_of_another_dtype_and_strides(device):
    x, mask, mean, m2, count = S.parts_of(S.MERGE_CASE, S.MERGE_SPLITS, device=device)
    rm, rv, _ = _running(device)
    rm_half = rm.half()
    rv_strided = torch.stack([rv, torch.zeros_like(rv)], 1)[:, 0]
    assert not rv_strided.is_contiguous()
    ops.batch_norm_merge_stats(mean, m2, count, rm_half, rv_strided, None, 0.5, EPS)
    rmean, rm2, n = reference_stats(x, mask, S.MERGE_CASE.channels_last)
    assert rm_half.dtype == torch.float16
    close(rm_half, 0.5 * rm.double().cpu() + 0.5 * rmean, rtol=1e-3, atol=1e-3)
    close(rv_strided, 0.5 * rv.double().cpu() + 0.5 * rm2 / (n - 1), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ elemt


def reference_elemt(x, mask, cl, weight, bias, mean, invstd):
    x64 = x.detach().cpu().double()
    pc = lambda t: per_channel(t.cpu().double(), x64, cl)  # noqa: E731
    y = (x64 - pc(mean)) * pc(invstd)
    if weight is not None:
        y = y * pc(weight)
    if bias is not None:
        y = y + pc(bias)
    return torch.where(valid(x64, None if mask is None else mask.cpu(), cl), y, 0.0)


@pytest.mark.parametrize("affine", ["affine", "weight", "none"])
@pytest.mark.parametrize("case", STATS_CASES, ids=str)
def test_elemt_with_given_statistics(case, affine, device):
    x, mask = S.inputs(case, device=device)
    w, b, mean, var = S.features(case.C, case.name, device=device)
    w, b = (w if affine != "none" else None), (b if affine == "affine" else None)
    invstd = var.rsqrt()
    y = ops.batch_norm_elemt(x, mask, w, b, mean, invstd, case.channels_last)
    assert y.shape == x.shape and y.dtype == x.dtype
    close(y, reference_elemt(x, mask, case.channels_last, w, b, mean, invstd))
    if mask is not None and mask.any():
        full = bn_full_mask(mask, x, case.channels_last)
        dirty = ops.batch_norm_elemt(poison(x, full), mask, w, b, mean, invstd, case.channels_last)
        assert torch.equal(dirty, y) and (y[full] == 0).all()


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_eval_returns_the_running_statistics_it_normalized_with(layout, dtype, kernels):
    """batch_norm in eval sets mean and invstd from the running statistics in
    the kernel itself: a copy of running_mean (not running_mean: later updates
    must not change it) and 1/sqrt(running_var + eps) in the accumulation
    dtype, the same statistics batch_norm_elemt is given."""
    case = S.parity_case(layout)
    x, mask = S.inputs(case, dtype=dtype)
    C, channels_last = case.C, case.channels_last
    running_mean = torch.randn(C, dtype=dtype)
    running_var = torch.rand(C, dtype=dtype) + 0.5
    w, b = torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)
    y, mean, invstd = ops.batch_norm(
        x, mask, w, b, running_mean, running_var, None, False, 0.1, 1e-3, channels_last)
    sd = stat_dtype(dtype)
    assert mean.dtype == invstd.dtype == sd and mean.shape == invstd.shape == (C,)
    assert torch.equal(mean, running_mean.to(sd))
    assert torch.equal(invstd, (running_var.to(sd) + 1e-3).rsqrt())
    assert torch.equal(y, ops.batch_norm_elemt(x, mask, w, b, mean, invstd, channels_last))
    before = mean.clone()
    running_mean.add_(1.0)
    assert torch.equal(mean, before)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_elemt_dtypes(layout, dtype, device):
    case = S.parity_case(layout)
    x, mask = S.inputs(case, dtype=dtype, device=device)
    w, b, mean, var = S.features(case.C, case.name, dtype=dtype, device=device)
    sd = stat_dtype(dtype)
    y = ops.batch_norm_elemt(x, mask, w, b, mean.to(sd), var.rsqrt().to(sd), case.channels_last)
    assert y.dtype == dtype
    tol = {} if dtype in (torch.float64, torch.float32) else dict(rtol=1e-2, atol=1e-2)
    close(y, reference_elemt(x, mask, case.channels_last, w, b, mean.to(sd), var.rsqrt().to(sd)), dtype, **tol)


# ------------------------------------------------------------------ backward stages


def _backward_inputs(case, device, dtype=torch.float32):
    g, x, mask, mean, invstd, count, w, _ = S._stage_inputs(case, dtype, device)
    return g, x, mask, mean, invstd, count, w


@pytest.mark.parametrize("case", STATS_CASES, ids=str)
def test_backward_reduce_sums(case, device):
    g, x, mask, mean, invstd, _, _ = _backward_inputs(case, device)
    cl = case.channels_last
    sum_dy, sum_dy_xhat = ops.batch_norm_backward_reduce(g, x, mask, mean, invstd, cl)
    assert sum_dy.dtype == sum_dy_xhat.dtype == torch.float32 and sum_dy.shape == (case.C,)
    g64 = bn_pack(g.cpu().double(), None if mask is None else mask.cpu(), cl)
    xhat = (bn_pack(x.cpu().double(), None if mask is None else mask.cpu(), cl) - mean.cpu().double()) \
        * invstd.cpu().double()
    close(sum_dy, g64.sum(0), atol=1e-5)
    close(sum_dy_xhat, (g64 * xhat).sum(0), atol=1e-5)
    if mask is not None and mask.any():
        full = bn_full_mask(mask, x, cl)
        dirty = ops.batch_norm_backward_reduce(poison(g, full), poison(x, full), mask, mean, invstd, cl)
        assert torch.equal(dirty[0], sum_dy) and torch.equal(dirty[1], sum_dy_xhat)


def reference_backward_elemt(g, x, mask, cl, weight, mean, invstd, sums=None):
    pc = lambda t: per_channel(t.cpu().double(), x, cl)  # noqa: E731
    g64, x64 = g.cpu().double(), x.cpu().double()
    dy = g64
    if sums is not None:
        sum_dy, sum_dy_xhat, count = sums
        n = float(count)
        xhat = (x64 - pc(mean)) * pc(invstd)
        dy = g64 - pc(sum_dy) / n - xhat * pc(sum_dy_xhat) / n
    k = pc(invstd) * (pc(weight) if weight is not None else 1.0)
    return torch.where(valid(x64, None if mask is None else mask.cpu(), cl), dy * k, 0.0)


@pytest.mark.parametrize("stats", ["batch", "batch_float_count", "given"])
@pytest.mark.parametrize("case", S.PARITY_CASES, ids=str)
def test_backward_elemt(case, stats, device):
    g, x, mask, mean, invstd, count, w = _backward_inputs(case, device)
    cl = case.channels_last
    sums = None
    if stats != "given":
        sum_dy, sum_dy_xhat = ops.batch_norm_backward_reduce(g, x, mask, mean, invstd, cl)
        sums = (sum_dy, sum_dy_xhat, count.double() if stats == "batch_float_count" else count)
    for weight in (w, None):
        dx = ops.batch_norm_backward_elemt(g, x, mask, weight, mean, invstd, *(sums or (None,) * 3), cl)
        assert dx.shape == x.shape and dx.dtype == x.dtype
        close(dx, reference_backward_elemt(g, x, mask, cl, weight, mean, invstd, sums), atol=1e-5)
        if mask is not None and mask.any():
            full = bn_full_mask(mask, x, cl)
            dirty = ops.batch_norm_backward_elemt(poison(g, full), poison(x, full), mask, weight, mean, invstd,
                                                  *(sums or (None,) * 3), cl)
            assert torch.equal(dirty, dx) and (dx[full] == 0).all()


# ------------------------------------------------------------------ compositions


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", S.PARITY_CASES + S.EDGE_CASES, ids=str)
def test_stages_compose_to_batch_norm(case, dtype, device):
    x, mask = S.inputs(case, dtype=dtype, device=device)
    w, b, rm, rv = S.features(case.C, case.name, dtype=dtype, device=device)
    nbt = torch.tensor(3, device=device)
    cl = case.channels_last
    state = [(rm.clone(), rv.clone(), nbt.clone()) for _ in range(2)]
    # training: stats -> merge_stats (one part, running statistics) -> elemt
    y, save_mean, save_invstd = ops.batch_norm(x, mask, w, b, *state[0], True, None, EPS, cl)
    mean, m2, count = ops.batch_norm_stats(x, mask, cl)
    mean2, invstd2, _ = ops.batch_norm_merge_stats(mean[None], m2[None], count[None], *state[1], None, EPS)
    y2 = ops.batch_norm_elemt(x, mask, w, b, mean2, invstd2, cl)
    for a, e in [(y2, y), (mean2, save_mean), (invstd2, save_invstd)] + list(zip(state[1], state[0])):
        assert torch.equal(a, e)
    # eval: elemt with the running statistics
    y_eval, eval_mean, eval_invstd = ops.batch_norm(x, mask, w, b, rm, rv, None, False, 0.1, EPS, cl)
    sd = stat_dtype(dtype)
    assert torch.equal(eval_mean, rm.to(sd)) and torch.equal(eval_invstd, (rv.to(sd) + EPS).rsqrt())
    assert torch.equal(ops.batch_norm_elemt(x, mask, w, b, eval_mean, eval_invstd, cl), y_eval)
    # backward: backward_reduce -> backward_elemt (with the sums in training)
    g = torch.randn(x.shape, device=device).to(dtype)
    for training, (m, s) in [(True, (save_mean, save_invstd)), (False, (eval_mean, eval_invstd))]:
        dx, dw, db = ops.batch_norm_backward(g, x, mask, w, m, s, training, cl, [True, True, True])
        sum_dy, sum_dy_xhat = ops.batch_norm_backward_reduce(g, x, mask, m, s, cl)
        sums = (sum_dy, sum_dy_xhat, count) if training else (None, None, None)
        assert torch.equal(ops.batch_norm_backward_elemt(g, x, mask, w, m, s, *sums, cl), dx)
        assert torch.equal(sum_dy_xhat.to(dtype), dw) and torch.equal(sum_dy.to(dtype), db)
