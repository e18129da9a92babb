"""MaskedBatchNorm1d / masknorm.functional.batch_norm / BN ops vs nn.BatchNorm1d."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import masknorm
import masknorm.functional as MF
from conftest import (
    ALL_DTYPES,
    BN_LAYOUTS,
    LOW_PRECISION,
    assert_close,
    bn_full_mask,
    bn_input_shape,
    bn_mask_shape,
    bn_pack,
    copy_state,
    fwd_bwd,
    init_bn_state,
    make_bn_pair,
    make_mask,
    noncontig_copy,
    param_grads,
    poison,
    random_lengths_mask,
    ref_bn,
    zero_param_grads,
    zip_strict,
)

N, C, L = 5, 3, 4

# (training, constructor kwargs)
MODES = {
    "train": (True, {}),
    "eval": (False, {}),
    "train_momentum_0.3": (True, {"momentum": 0.3}),
    "train_cumulative_avg": (True, {"momentum": None}),
    "no_track_train": (True, {"track_running_stats": False}),
    "no_track_eval": (False, {"track_running_stats": False}),
    "no_affine_train": (True, {"affine": False}),
    "no_affine_eval": (False, {"affine": False}),
}


def _call(m, x, mask):
    return m(x) if mask is None else m(x, padding_mask=mask)


def _assert_buffers_match(m, r, exact_nbt=True):
    for name in ("running_mean", "running_var"):
        a, b = getattr(m, name), getattr(r, name)
        if b is None:
            assert a is None, f"{name} should be None (track_running_stats=False)"
        else:
            assert a is not None, f"{name} missing"
            assert_close(a, b)
    a, b = m.num_batches_tracked, r.num_batches_tracked
    if b is None:
        assert a is None
    else:
        assert a is not None and a.dtype == torch.long
        assert int(a) == int(b)


def _check_step(m, r, x, mask, cl, g=None):
    g = torch.randn_like(x) if g is None else g
    zero_param_grads(m, r)
    y, gx = fwd_bwd(lambda t: _call(m, t, mask), x, g)
    yr, gxr = fwd_bwd(lambda t: ref_bn(r, t, mask, cl), x, g)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, yr)
    assert_close(gx, gxr)
    pm, pr = param_grads(m), param_grads(r)
    assert len(pm) == len(pr)
    for a, b in zip(pm, pr):
        assert_close(a, b)
    return y, gx


# ---------------------------------------------------------------------------
# parity: no mask / all-False mask / random mask, every mode, every layout
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", [None, "all_false", "random"])
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("mode", list(MODES))
def test_parity_with_nn_batchnorm(mode, layout, mask_kind):
    training, kw = MODES[mode]
    cl = layout == "3d_cl"
    m, r = make_bn_pair(C, channels_last=cl, **kw)
    m.train(training)
    r.train(training)
    for step in range(3):
        x = torch.randn(bn_input_shape(layout, N, C, L)) * 2 + 0.5 * step
        mask = make_mask(mask_kind, bn_mask_shape(layout, N, L))
        y, gx = _check_step(m, r, x, mask, cl)
        if mask is not None:
            full = bn_full_mask(mask, x, cl)
            assert (y[full] == 0).all()
            assert (gx[full] == 0).all()
        _assert_buffers_match(m, r)
    if training and kw.get("track_running_stats", True):
        assert int(m.num_batches_tracked) == 3


@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_masked_differs_from_unmasked(layout):
    """Sanity: the mask really changes statistics (padding is not counted)."""
    cl = layout == "3d_cl"
    m, _ = make_bn_pair(C, channels_last=cl)
    x = torch.randn(bn_input_shape(layout, N, C, L))
    mask = make_mask("random", bn_mask_shape(layout, N, L))
    full = bn_full_mask(mask, x, cl)
    y_masked = m(x, padding_mask=mask)
    y_plain = m(x)
    assert not torch.allclose(y_masked[~full], y_plain[~full], atol=1e-4)


@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_padded_outputs_and_grads_exactly_zero(layout, training):
    cl = layout == "3d_cl"
    m, _ = make_bn_pair(C, channels_last=cl)
    m.train(training)
    x = torch.randn(bn_input_shape(layout, N, C, L)) + 3.0  # nonzero bias -> nonzero unmasked outputs
    mask = make_mask("random", bn_mask_shape(layout, N, L))
    full = bn_full_mask(mask, x, cl)
    y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x, torch.randn_like(x))
    assert full.any() and (~full).any()
    assert torch.equal(y[full], torch.zeros_like(y[full]))
    assert torch.equal(gx[full], torch.zeros_like(gx[full]))
    assert (y[~full] != 0).any()


@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("mode", ["train", "eval", "train_cumulative_avg", "no_track_eval"])
def test_nan_inf_in_padding_never_leak(layout, mode):
    training, kw = MODES[mode]
    cl = layout == "3d_cl"
    m, r = make_bn_pair(C, channels_last=cl, **kw)
    m.train(training)
    r.train(training)
    for _ in range(2):
        x = torch.randn(bn_input_shape(layout, N, C, L))
        g = torch.randn_like(x)
        mask = make_mask("random", bn_mask_shape(layout, N, L))
        full = bn_full_mask(mask, x, cl)
        x_bad, g_bad = poison(x, full), poison(g, full)
        assert not torch.isfinite(x_bad).all() and not torch.isfinite(g_bad).all()
        zero_param_grads(m, r)
        y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x_bad, g_bad)
        yr, gxr = fwd_bwd(lambda t: ref_bn(r, t, mask, cl), x, g)
        assert torch.isfinite(y).all(), "NaN/inf leaked into outputs"
        assert torch.isfinite(gx).all(), "NaN/inf leaked into input grad"
        assert (y[full] == 0).all() and (gx[full] == 0).all()
        assert_close(y, yr)
        assert_close(gx, gxr)
        for a, b in zip_strict(param_grads(m), param_grads(r)):
            assert torch.isfinite(a).all(), "NaN/inf leaked into parameter grads"
            assert_close(a, b)
        if m.running_mean is not None:
            assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()
        _assert_buffers_match(m, r)


# ---------------------------------------------------------------------------
# degenerate batches
# ---------------------------------------------------------------------------


def _one_valid_case(layout):
    if layout == "2d":
        x = torch.randn(4, C)
        mask = torch.tensor([True, False, True, True])
    else:
        shape = bn_input_shape(layout, 2, C, 3)
        x = torch.randn(shape)
        mask = torch.ones(2, 3, dtype=torch.bool)
        mask[1, 0] = False
    return x, mask


@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_one_valid_value_in_training_raises_value_error(layout):
    cl = layout == "3d_cl"
    m, _ = make_bn_pair(C, channels_last=cl)
    x, mask = _one_valid_case(layout)
    before = (m.running_mean.clone(), m.running_var.clone())
    with pytest.raises(ValueError):
        m(x, padding_mask=mask)
    assert torch.equal(m.running_mean, before[0]) and torch.equal(m.running_var, before[1])
    with pytest.raises(ValueError):
        MF.batch_norm(x, None, None, training=True, padding_mask=mask, channels_last=cl)
    # track_running_stats=False uses batch statistics in eval too (as nn.BatchNorm1d)
    m2, _ = make_bn_pair(C, channels_last=cl, track_running_stats=False)
    m2.eval()
    with pytest.raises(ValueError):
        m2(x, padding_mask=mask)


@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_one_valid_value_in_eval_is_fine(layout):
    cl = layout == "3d_cl"
    m, r = make_bn_pair(C, channels_last=cl)
    m.eval()
    r.eval()
    x, mask = _one_valid_case(layout)
    _check_step(m, r, x, mask, cl)


def test_one_value_without_mask_raises_like_torch():
    m = masknorm.MaskedBatchNorm1d(C)
    with pytest.raises(ValueError):
        m(torch.randn(1, C))
    with pytest.raises(ValueError):
        m(torch.randn(1, C, 1))
    m_cl = masknorm.MaskedBatchNorm1d(C, channels_last=True)
    with pytest.raises(ValueError):
        m_cl(torch.randn(1, 1, C))


@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_all_padded_batch(layout, momentum):
    cl = layout == "3d_cl"
    m, r = make_bn_pair(C, channels_last=cl, momentum=momentum)
    x = torch.randn(bn_input_shape(layout, N, C, L))
    mask = torch.ones(bn_mask_shape(layout, N, L), dtype=torch.bool)
    x_bad = poison(x, bn_full_mask(mask, x, cl))
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x_bad, torch.randn_like(x))
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.equal(gx, torch.zeros_like(gx))
    for p in param_grads(m):  # None (not connected) or exactly zero
        assert p is None or torch.equal(p, torch.zeros_like(p))
    assert torch.equal(m.running_mean, rm) and torch.equal(m.running_var, rv)
    assert int(m.num_batches_tracked) == 1
    # the packed reference sees an empty batch: same bookkeeping as torch
    ref_bn(r, x, mask, cl)
    _assert_buffers_match(m, r)
    # the next (normal) batch continues exactly like nn.BatchNorm1d
    x2 = torch.randn(bn_input_shape(layout, N, C, L))
    mask2 = make_mask("random", bn_mask_shape(layout, N, L))
    _check_step(m, r, x2, mask2, cl)
    _assert_buffers_match(m, r)
    # eval on an all-padded batch: zeros, nothing NaN
    m.eval()
    y = m(x_bad, padding_mask=mask)
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_like_torch(layout, training, with_mask):
    cl = layout == "3d_cl"
    m, r = make_bn_pair(C, channels_last=cl)
    m.train(training)
    r.train(training)
    x = torch.randn(bn_input_shape(layout, 0, C, L))
    mask = torch.zeros(bn_mask_shape(layout, 0, L), dtype=torch.bool) if with_mask else None
    xl = x.clone().requires_grad_(True)
    y = _call(m, xl, mask)
    yr = ref_bn(r, x, None, cl)
    assert y.shape == yr.shape == x.shape
    assert y.dtype == x.dtype
    _assert_buffers_match(m, r)
    y.sum().backward()
    assert xl.grad is not None and xl.grad.shape == x.shape


# ---------------------------------------------------------------------------
# dtypes / memory layout
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_dtypes(dtype, layout, training):
    cl = layout == "3d_cl"
    ref_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
    m, r = make_bn_pair(C, channels_last=cl, dtype=dtype, ref_dtype=ref_dtype)
    m.train(training)
    r.train(training)
    for _ in range(2):
        x = (torch.randn(bn_input_shape(layout, N, C, L)) * 2 + 1).to(dtype)
        g = torch.randn(x.shape).to(dtype)
        mask = make_mask("random", bn_mask_shape(layout, N, L))
        zero_param_grads(m, r)
        y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x, g)
        yr, gxr = fwd_bwd(lambda t: ref_bn(r, t, mask, cl), x.to(ref_dtype), g.to(ref_dtype))
        assert y.dtype == dtype and gx.dtype == dtype
        assert m.weight.grad.dtype == dtype and m.bias.grad.dtype == dtype
        assert_close(y, yr)
        assert_close(gx, gxr)
        for a, b in zip_strict(param_grads(m), param_grads(r)):
            assert_close(a, b)
        full = bn_full_mask(mask, x, cl)
        assert (y[full] == 0).all()
    assert m.running_mean.dtype == dtype and m.running_var.dtype == dtype
    assert_close(m.running_mean, r.running_mean)
    assert_close(m.running_var, r.running_var)


def _noncontig_view(layout, shape):
    """Non-contiguous tensor of ``shape`` plus the leaf it is a view of."""
    if layout == "2d":
        n, c = shape
        leaf = torch.randn(n, 2 * c).requires_grad_(True)
        return leaf, lambda t: t[:, ::2]
    n, a, b = shape
    leaf = torch.randn(n, b, a).requires_grad_(True)
    return leaf, lambda t: t.transpose(1, 2)


@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_non_contiguous_input(layout, training, masked):
    cl = layout == "3d_cl"
    m, r = make_bn_pair(C, channels_last=cl)
    m.train(training)
    r.train(training)
    shape = bn_input_shape(layout, N, C, L)
    leaf, view = _noncontig_view(layout, shape)
    x = view(leaf)
    assert x.shape == shape and not x.is_contiguous()
    mask = make_mask("random", bn_mask_shape(layout, N, L)) if masked else None
    mask_nc = noncontig_copy(mask) if masked else None
    g = torch.randn(shape)
    g_nc = noncontig_copy(g)
    y = _call(m, x, mask_nc)
    y.backward(g_nc)
    gx = view(leaf.grad)
    yr, gxr = fwd_bwd(lambda t: ref_bn(r, t, mask, cl), x.detach().contiguous(), g)
    assert_close(y, yr)
    assert_close(gx, gxr)
    for a, b in zip_strict(param_grads(m), param_grads(r)):
        assert_close(a, b)
    _assert_buffers_match(m, r)


# ---------------------------------------------------------------------------
# state_dict compatibility
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
def test_state_dict_loads_both_ways(channels_last):
    # nn.BatchNorm1d -> MaskedBatchNorm1d
    ref = nn.BatchNorm1d(C)
    init_bn_state(ref)
    ref(torch.randn(6, C))  # num_batches_tracked = 1, stats moved
    m = masknorm.MaskedBatchNorm1d(C, channels_last=channels_last)
    assert set(m.state_dict().keys()) == set(ref.state_dict().keys())
    m.load_state_dict(ref.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    m.eval()
    ref.eval()
    x = torch.randn(4, C, L)
    xin = x.transpose(1, 2) if channels_last else x
    y = m(xin)
    y = y.transpose(1, 2) if channels_last else y
    assert_close(y, ref(x))

    # MaskedBatchNorm1d (trained with a mask) -> nn.BatchNorm1d
    m2 = masknorm.MaskedBatchNorm1d(C, channels_last=channels_last)
    init_bn_state(m2)
    for _ in range(2):
        xx = torch.randn(bn_input_shape("3d_cl" if channels_last else "3d", N, C, L))
        m2(xx, padding_mask=random_lengths_mask(N, L))
    ref2 = nn.BatchNorm1d(C)
    ref2.load_state_dict(m2.state_dict(), strict=True)
    assert int(ref2.num_batches_tracked) == 2
    for k, v in m2.state_dict().items():
        assert torch.equal(ref2.state_dict()[k], v), k


def test_parameters_and_buffers_like_nn():
    m = masknorm.MaskedBatchNorm1d(C)
    r = nn.BatchNorm1d(C)
    assert sorted(n for n, _ in m.named_parameters()) == sorted(n for n, _ in r.named_parameters())
    assert sorted(n for n, _ in m.named_buffers()) == sorted(n for n, _ in r.named_buffers())
    sd_m, sd_r = m.state_dict(), r.state_dict()
    assert set(sd_m) == set(sd_r)
    for k in sd_r:
        assert torch.equal(sd_m[k], sd_r[k]), k
    m = masknorm.MaskedBatchNorm1d(C, affine=False, track_running_stats=False)
    assert m.weight is None and m.bias is None
    assert m.running_mean is None and m.running_var is None
    m64 = masknorm.MaskedBatchNorm1d(C, dtype=torch.float64)
    assert m64.weight.dtype == torch.float64 and m64.running_mean.dtype == torch.float64


# ---------------------------------------------------------------------------
# functional.batch_norm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("masked", [False, True])
def test_functional_batch_norm_updates_running_stats_in_place(layout, masked):
    cl = layout == "3d_cl"
    rm = torch.rand(C) - 0.5
    rv = torch.rand(C) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    rm0, rv0 = rm.clone(), rv.clone()
    rm_ptr, rv_ptr = rm.data_ptr(), rv.data_ptr()
    w, b = torch.rand(C) + 0.5, torch.rand(C) - 0.5
    for _ in range(2):
        x = torch.randn(bn_input_shape(layout, N, C, L))
        mask = make_mask("random", bn_mask_shape(layout, N, L)) if masked else None
        y = MF.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2, eps=1e-3,
                          padding_mask=mask, channels_last=cl)
        yr = ref_bn(lambda t: F.batch_norm(t, rm_ref, rv_ref, w, b, True, 0.2, 1e-3), x, mask, cl)
        assert_close(y, yr)
        assert_close(rm, rm_ref)
        assert_close(rv, rv_ref)
    assert rm.data_ptr() == rm_ptr and rv.data_ptr() == rv_ptr
    assert not torch.allclose(rm, rm0) and not torch.allclose(rv, rv0)

    # eval: uses the running stats, does not touch them
    x = torch.randn(bn_input_shape(layout, N, C, L))
    mask = make_mask("random", bn_mask_shape(layout, N, L)) if masked else None
    before = rm.clone(), rv.clone()
    y = MF.batch_norm(x, rm, rv, w, b, training=False, momentum=0.2, eps=1e-3,
                      padding_mask=mask, channels_last=cl)
    yr = ref_bn(lambda t: F.batch_norm(t, rm_ref, rv_ref, w, b, False, 0.2, 1e-3), x, mask, cl)
    assert_close(y, yr)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_functional_batch_norm_without_running_stats(layout):
    cl = layout == "3d_cl"
    x = torch.randn(bn_input_shape(layout, N, C, L))
    mask = make_mask("random", bn_mask_shape(layout, N, L))
    y = MF.batch_norm(x, None, None, training=True, padding_mask=mask, channels_last=cl)
    yr = ref_bn(lambda t: F.batch_norm(t, None, None, None, None, True, 0.1, 1e-5), x, mask, cl)
    assert_close(y, yr)


# ---------------------------------------------------------------------------
# ops: outputs as documented
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_batch_norm_op_saved_stats_and_count(layout, dtype):
    cl = layout == "3d_cl"
    eps = 1e-5
    x = torch.randn(bn_input_shape(layout, N, C, L)).to(dtype)
    mask = make_mask("random", bn_mask_shape(layout, N, L))
    out, save_mean, save_invstd, count = torch.ops.masknorm.batch_norm(
        x, mask, None, None, None, None, True, eps, cl)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == x.shape and out.dtype == dtype
    assert save_mean.shape == (C,) and save_mean.dtype == stat_dtype
    assert save_invstd.shape == (C,) and save_invstd.dtype == stat_dtype
    assert count.dtype == torch.long and count.dim() == 0
    packed = bn_pack(x, mask, cl).to(torch.float64)
    assert int(count) == packed.shape[0]
    mean = packed.mean(0)
    var = packed.var(0, unbiased=False)
    assert_close(save_mean, mean, dtype=torch.float32 if dtype != torch.float64 else dtype)
    assert_close(save_invstd, 1.0 / torch.sqrt(var + eps), dtype=torch.float32 if dtype != torch.float64 else dtype)

    # eval: running stats required and used
    rm, rv = torch.randn(C).to(dtype), (torch.rand(C) + 0.5).to(dtype)
    out_e, sm, si, cnt = torch.ops.masknorm.batch_norm(x, mask, None, None, rm, rv, False, eps, cl)
    assert sm.shape == (C,) and si.shape == (C,)
    ref = ref_bn(lambda t: F.batch_norm(t.double(), rm.double(), rv.double(), None, None, False, 0.0, eps), x, mask, cl)
    assert_close(out_e, ref)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_batch_norm_update_running_stats_op(momentum):
    eps = 1e-5
    x = torch.randn(N, C, L)
    mask = random_lengths_mask(N, L)
    _, save_mean, save_invstd, count = torch.ops.masknorm.batch_norm(
        x, mask, None, None, None, None, True, eps, False)
    rm, rv = torch.rand(C), torch.rand(C) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    nbt = torch.tensor(4, dtype=torch.long)
    torch.ops.masknorm.batch_norm_update_running_stats(
        rm, rv, save_mean, save_invstd, count, eps, momentum, nbt if momentum is None else None)
    packed = bn_pack(x, mask)
    f = 0.25 if momentum is None else momentum
    assert_close(rm, (1 - f) * rm0 + f * packed.mean(0))
    assert_close(rv, (1 - f) * rv0 + f * packed.var(0, unbiased=True))
    assert int(nbt) == 4  # only read, not written

    # count == 0: no-op
    rm1, rv1 = rm.clone(), rv.clone()
    torch.ops.masknorm.batch_norm_update_running_stats(
        rm, rv, save_mean, save_invstd, torch.tensor(0, dtype=torch.long), eps, momentum,
        nbt if momentum is None else None)
    assert torch.equal(rm, rm1) and torch.equal(rv, rv1)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_backward_op_output_mask(training):
    eps = 1e-5
    x = torch.randn(N, C, L)
    mask = random_lengths_mask(N, L)
    w, b = torch.rand(C) + 0.5, torch.rand(C)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    _, sm, si, _ = torch.ops.masknorm.batch_norm(x, mask, w, b, rm, rv, training, eps, False)
    g = torch.randn_like(x)
    gi, gw, gb = torch.ops.masknorm.batch_norm_backward(g, x, mask, w, sm, si, training, False, [True, True, True])
    assert gi.shape == x.shape and gw.shape == (C,) and gb.shape == (C,)
    # reference via autograd through the packed nn reference
    xl = x.clone().requires_grad_(True)
    wl, bl = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    yr = ref_bn(lambda t: F.batch_norm(t, rm.clone(), rv.clone(), wl, bl, training, 0.1, eps), xl, mask)
    yr.backward(g)
    assert_close(gi, xl.grad)
    assert_close(gw, wl.grad)
    assert_close(gb, bl.grad)
    gi2, gw2, gb2 = torch.ops.masknorm.batch_norm_backward(g, x, mask, w, sm, si, training, False, [True, False, False])
    assert gw2 is None and gb2 is None
    assert_close(gi2, gi)
    gi3, gw3, gb3 = torch.ops.masknorm.batch_norm_backward(g, x, mask, w, sm, si, training, False, [False, True, True])
    assert gi3 is None
    assert_close(gw3, gw)
    assert_close(gb3, gb)


# ---------------------------------------------------------------------------
# bigger shapes (vectorised tails, multi-threaded reductions) and numerics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_large_shapes(layout, training, dtype):
    """Odd channel counts (SIMD tails) and > GRAIN_SIZE elements (several threads)."""
    n, c, l = (700, 67, 1) if layout == "2d" else (16, 67, 129)
    cl = layout == "3d_cl"
    ref_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
    m, r = make_bn_pair(c, channels_last=cl, dtype=dtype, ref_dtype=ref_dtype)
    m.train(training)
    r.train(training)
    for _ in range(2):
        x = (torch.randn(bn_input_shape(layout, n, c, l)) * 2 + 0.7).to(dtype)
        g = torch.randn(x.shape).to(dtype)
        if layout == "2d":
            mask = torch.rand(n) < 0.3
        else:
            mask = random_lengths_mask(n, l)
        zero_param_grads(m, r)
        y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x, g)
        yr, gxr = fwd_bwd(lambda t: ref_bn(r, t, mask, cl), x.to(ref_dtype), g.to(ref_dtype))
        assert_close(y, yr)
        # the reference reduces ~1500 terms in a different order: loosen a bit for float32
        extra = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
        assert_close(gx, gxr, **extra)
        for a, b in zip_strict(param_grads(m), param_grads(r)):
            assert_close(a, b, **({"rtol": 1e-4, "atol": 1e-3} if dtype == torch.float32 else {}))
        full = bn_full_mask(mask, x, cl)
        assert (y[full] == 0).all() and (gx[full] == 0).all()
    assert_close(m.running_mean, r.running_mean)
    assert_close(m.running_var, r.running_var)


@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_large_offset_is_numerically_stable(layout):
    """float32 input around 1000 with unit spread: a naive E[x^2]-E[x]^2 variance
    loses all precision; the result must match a float64 computation."""
    cl = layout == "3d_cl"
    n, c, l = (300, 5, 1) if layout == "2d" else (8, 5, 40)
    m, _ = make_bn_pair(c, channels_last=cl)
    r64 = nn.BatchNorm1d(c, dtype=torch.float64)
    copy_state(r64, m)
    x = torch.randn(bn_input_shape(layout, n, c, l)) + 1000.0
    mask = (torch.rand(n) < 0.3) if layout == "2d" else random_lengths_mask(n, l)
    y = m(x, padding_mask=mask)
    yr = ref_bn(r64, x.double(), mask, cl)
    assert_close(y, yr, rtol=1e-3, atol=1e-3)
    assert_close(m.running_var, r64.running_var, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------
# misc usage
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_channels_last_module_accepts_2d_input(training):
    """channels_last only concerns 3-D input; (N, C) works the same either way."""
    m, r = make_bn_pair(C, channels_last=True)
    m.train(training)
    r.train(training)
    x = torch.randn(7, C)
    _check_step(m, r, x, make_mask("random", (7,)), cl=False)
    _assert_buffers_match(m, r)


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_no_grad_and_inference_mode(layout, ctx):
    cl = layout == "3d_cl"
    m, r = make_bn_pair(C, channels_last=cl)
    x = torch.randn(bn_input_shape(layout, N, C, L))
    mask = make_mask("random", bn_mask_shape(layout, N, L))
    manager = torch.no_grad() if ctx == "no_grad" else torch.inference_mode()
    with manager:
        y = m(x, padding_mask=mask)
        yr = ref_bn(r, x, mask, cl)
    assert not y.requires_grad
    assert_close(y, yr)
    _assert_buffers_match(m, r)
    m.eval()
    r.eval()
    with manager:
        assert_close(m(x, padding_mask=mask), ref_bn(r, x, mask, cl))


@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_param_grads_without_input_grad(layout, training):
    cl = layout == "3d_cl"
    m, r = make_bn_pair(C, channels_last=cl)
    m.train(training)
    r.train(training)
    x = torch.randn(bn_input_shape(layout, N, C, L))  # does not require grad
    mask = make_mask("random", bn_mask_shape(layout, N, L))
    g = torch.randn_like(x)
    m(x, padding_mask=mask).backward(g)
    ref_bn(r, x, mask, cl).backward(g)
    assert_close(m.weight.grad, r.weight.grad)
    assert_close(m.bias.grad, r.bias.grad)


def test_functional_non_contiguous_params():
    x = torch.randn(N, C, L)
    mask = random_lengths_mask(N, L)
    w, b = (torch.rand(2 * C) + 0.5)[::2], torch.randn(2 * C)[::2]
    rm, rv = torch.randn(C, 2)[:, 0], (torch.rand(C, 2) + 0.5)[:, 0]
    assert not w.is_contiguous() and not rm.is_contiguous()
    y = MF.batch_norm(x, rm, rv, w, b, training=False, padding_mask=mask)
    yr = ref_bn(lambda t: F.batch_norm(t, rm, rv, w.contiguous(), b.contiguous(), False), x, mask)
    assert_close(y, yr)
    y = MF.batch_norm(x, None, None, w, b, training=True, padding_mask=mask)
    yr = ref_bn(lambda t: F.batch_norm(t, None, None, w.contiguous(), b.contiguous(), True), x, mask)
    assert_close(y, yr)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_low_precision_input_with_float32_module(dtype, training):
    """bf16/fp16 activations through a float32 module (autocast-style), as nn.BatchNorm1d allows."""
    m, r = make_bn_pair(C)
    m.train(training)
    r.train(training)
    x = torch.randn(N, C, L).to(dtype)
    mask = random_lengths_mask(N, L)
    g = torch.randn(x.shape).to(dtype)
    y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x, g)
    yr, gxr = fwd_bwd(lambda t: ref_bn(r, t, mask), x.float(), g.float())
    assert y.dtype == dtype and gx.dtype == dtype
    assert m.weight.grad.dtype == torch.float32 and m.running_mean.dtype == torch.float32
    assert_close(y, yr)
    assert_close(gx, gxr)
    for a, b in zip_strict(param_grads(m), param_grads(r)):
        assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert_close(m.running_mean, r.running_mean, rtol=1e-2, atol=1e-2)
    assert_close(m.running_var, r.running_var, rtol=1e-2, atol=1e-2)
