"""MaskedBatchNorm1d, masknorm.functional.batch_norm and the batch_norm /
batch_norm_backward ops against nn.BatchNorm1d on the packed valid tokens
(outputs, gradients, running statistics and num_batches_tracked, which the op
updates itself), in the three layouts NC / NCL / NLC, with the native and the
generic kernels, on every device. The stage ops batch_norm is made of are in
test_batch_norm_stages.py.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import masknorm
import masknorm.functional as MF
from helpers import (
    device_data_checks,
    ALL_DTYPES,
    BN_LAYOUTS,
    LOW_PRECISION,
    assert_buffers_match,
    assert_close,
    bn_full_mask,
    bn_input_shape,
    bn_mask_shape,
    bn_pack,
    call_masked,
    check_step,
    copy_state,
    fwd_bwd,
    init_bn_state,
    is_channels_last,
    make_bn_pair,
    noncontig_copy,
    param_grads,
    poison,
    ref_bn,
    running_tol,
    zero_param_grads,
    zip_strict,
)
from samples import batch_norm as S
from samples.common import MASKS, lengths_mask, make_mask, noncanonical_bool

pytestmark = pytest.mark.kernels

ops = torch.ops.masknorm
N, C, L = 5, 3, 4  # small shapes for the tests of one behaviour

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


def _pair(layout, mode, device, C=C, **kw):
    training, mode_kw = MODES[mode]
    m, r = make_bn_pair(C, channels_last=is_channels_last(layout), device=device, **mode_kw, **kw)
    return m.train(training), r.train(training)


def _step(m, r, x, mask, layout, **kw):
    cl = is_channels_last(layout)
    return check_step(m, r, lambda t: ref_bn(r, t, mask, cl), x, mask, **kw)


def _small(layout, device, mask_kind="padded", dtype=torch.float32):
    x = torch.randn(bn_input_shape(layout, N, C, L)).to(device, dtype)
    mask = make_mask(mask_kind, bn_mask_shape(layout, N, L))
    return x, None if mask is None else mask.to(device)


# ---------------------------------------------------------------------------
# parity: no mask / all-False mask / padded, every mode, every layout
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("layout", BN_LAYOUTS)
# the quick loop runs training and eval with the default options, the full suite every mode
@pytest.mark.parametrize("mode", [m if m in ("train", "eval") else pytest.param(m, marks=pytest.mark.slow) for m in MODES])
def test_parity_with_nn_batchnorm(mode, layout, mask_kind, device):
    case = S.parity_case(layout, mask_kind)
    m, r = _pair(layout, mode, device, C=case.C)
    for step in range(3):
        x, mask = S.inputs(case, device=device, tag=str(step), offset=0.5 * step)
        y, gx = _step(m, r, x, mask, layout)
        if mask is not None:
            full = bn_full_mask(mask, x, case.channels_last)
            assert (y[full] == 0).all() and (gx[full] == 0).all()
        assert_buffers_match(m, r)
    training, kw = MODES[mode]
    if training and kw.get("track_running_stats", True):
        assert int(m.num_batches_tracked) == 3


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", [c for c in S.EDGE_CASES if c.N > 0], ids=str)
def test_edge_shapes(case, training, device):
    """Size-1 C, L and N."""
    m, r = make_bn_pair(case.C, channels_last=case.channels_last, device=device)
    m.train(training), r.train(training)
    x, mask = S.inputs(case, device=device)
    _step(m, r, x, mask, case.layout)
    assert_buffers_match(m, r)


@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_running_var_is_unbiased(layout, device):
    """Few valid values (n/(n-1) is large): the tolerance of assert_buffers_match
    tells the unbiased running variance from the biased one."""
    m, r = make_bn_pair(C, channels_last=is_channels_last(layout), device=device, momentum=0.5)
    x, _ = _small(layout, device)
    mask = torch.ones(bn_mask_shape(layout, N, L), dtype=torch.bool, device=device)
    mask.view(-1)[:4] = False  # 4 valid positions per channel
    rv0 = m.running_var.clone()
    m(x, padding_mask=mask)
    ref_bn(r, x, mask, is_channels_last(layout))
    assert_buffers_match(m, r)
    packed = bn_pack(x, mask, is_channels_last(layout)).double()
    biased = 0.5 * rv0.double() + 0.5 * packed.var(0, unbiased=False)
    tol = running_tol(torch.float32)
    assert ((m.running_var.double() - biased).abs() > 100 * (tol["atol"] + tol["rtol"] * biased.abs())).all()


@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_masked_differs_from_unmasked(layout, device):
    """Sanity: the mask really changes statistics (padding is not counted)."""
    m, _ = _pair(layout, "train", device)
    x, mask = _small(layout, device)
    full = bn_full_mask(mask, x, is_channels_last(layout))
    assert not torch.allclose(m(x, padding_mask=mask)[~full], m(x)[~full], atol=1e-4)


@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_padded_outputs_and_grads_exactly_zero(layout, training, device):
    m, _ = _pair(layout, "train" if training else "eval", device)
    x, mask = _small(layout, device)
    x = x + 3.0  # nonzero bias -> nonzero unmasked outputs
    full = bn_full_mask(mask, x, is_channels_last(layout))
    y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x, torch.randn_like(x))
    assert full.any() and (~full).any()
    assert torch.equal(y[full], torch.zeros_like(y[full]))
    assert torch.equal(gx[full], torch.zeros_like(gx[full]))
    assert (y[~full] != 0).any()


@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("mode", ["train", "eval", "train_cumulative_avg", "no_track_eval"])
def test_nan_inf_in_padding_never_leak(layout, mode, device):
    m, r = _pair(layout, mode, device)
    cl = is_channels_last(layout)
    for _ in range(2):
        x, mask = _small(layout, device)
        g = torch.randn_like(x)
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
        assert_buffers_match(m, r)


# ---------------------------------------------------------------------------
# degenerate batches
# ---------------------------------------------------------------------------


def _one_valid_case(layout, device):
    if layout == "NC":
        x = torch.randn(4, C)
        mask = torch.tensor([True, False, True, True])
    else:
        x = torch.randn(bn_input_shape(layout, 2, C, 3))
        mask = torch.ones(2, 3, dtype=torch.bool)
        mask[1, 0] = False
    return x.to(device), mask.to(device)


@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_one_valid_value_in_training_raises_value_error(layout, device):
    cl = is_channels_last(layout)
    m, r = make_bn_pair(C, channels_last=cl, device=device)
    x, mask = _one_valid_case(layout, device)
    before = (m.running_mean.clone(), m.running_var.clone())
    with device_data_checks(device), pytest.raises(ValueError, match="more than 1 valid"):
        m(x, padding_mask=mask)
    assert torch.equal(m.running_mean, before[0]) and torch.equal(m.running_var, before[1])
    # num_batches_tracked counts the batch, as nn.BatchNorm1d's forward does before it raises
    with pytest.raises(ValueError):
        r(bn_pack(x, mask, cl))
    assert int(m.num_batches_tracked) == int(r.num_batches_tracked) == 1
    with device_data_checks(device), pytest.raises(ValueError):
        MF.batch_norm(x, None, None, training=True, padding_mask=mask, channels_last=cl)
    # track_running_stats=False uses batch statistics in eval too (as nn.BatchNorm1d)
    m2, _ = make_bn_pair(C, channels_last=cl, track_running_stats=False, device=device)
    with device_data_checks(device), pytest.raises(ValueError):
        m2.eval()(x, padding_mask=mask)


@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_one_valid_value_in_eval_is_fine(layout, device):
    m, r = _pair(layout, "eval", device)
    x, mask = _one_valid_case(layout, device)
    _step(m, r, x, mask, layout)


def test_one_value_without_mask_raises_like_torch(device):
    for channels_last, shapes in ((False, [(1, C), (1, C, 1)]), (True, [(1, 1, C)])):
        m = masknorm.MaskedBatchNorm1d(C, channels_last=channels_last).to(device)
        for shape in shapes:
            with pytest.raises(ValueError):
                m(torch.randn(shape, device=device))


@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_all_padded_batch(layout, momentum, device):
    cl = is_channels_last(layout)
    m, r = make_bn_pair(C, channels_last=cl, momentum=momentum, device=device)
    x, _ = _small(layout, device)
    mask = torch.ones(bn_mask_shape(layout, N, L), dtype=torch.bool, device=device)
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
    assert_buffers_match(m, r)
    # the next (normal) batch continues exactly like nn.BatchNorm1d
    x2, mask2 = _small(layout, device)
    _step(m, r, x2, mask2, layout)
    assert_buffers_match(m, r)
    # eval on an all-padded batch: zeros, nothing NaN
    y = m.eval()(x_bad, padding_mask=mask)
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_like_torch(layout, training, with_mask, device):
    m, r = _pair(layout, "train" if training else "eval", device)
    case = [c for c in S.EDGE_CASES if c.N == 0 and c.layout == layout][0]
    x, _ = S.inputs(case, device=device)
    mask = torch.zeros(case.mask_shape, dtype=torch.bool, device=device) if with_mask else None
    xl = x.clone().requires_grad_(True)
    y = call_masked(m, xl, mask)
    yr = ref_bn(r, x, None, case.channels_last)
    assert y.shape == yr.shape == x.shape
    assert y.dtype == x.dtype
    assert_buffers_match(m, r)
    y.sum().backward()
    assert xl.grad is not None and xl.grad.shape == x.shape


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_zero_channels(layout, training, masked, device):
    """C = 0 (a SIGFPE in the CPU statistics, which divided by C to size their
    chunks; torch's own nn.BatchNorm1d(0) raises IndexError): empty outputs and
    gradients, num_batches_tracked counted in training, a count of the valid
    positions."""
    cl = is_channels_last(layout)
    m = masknorm.MaskedBatchNorm1d(0, channels_last=cl).to(device).train(training)
    x = torch.randn(bn_input_shape(layout, N, 0, L), device=device)
    mask = make_mask("padded", bn_mask_shape(layout, N, L)).to(device) if masked else None
    xl = x.clone().requires_grad_(True)
    y = call_masked(m, xl, mask)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert xl.grad is not None and xl.grad.shape == x.shape
    assert m.weight.grad.shape == m.bias.grad.shape == (0,)
    assert m.running_mean.shape == m.running_var.shape == (0,)
    assert int(m.num_batches_tracked) == int(training)
    mean, m2, count = ops.batch_norm_stats(x, mask, cl)
    assert mean.shape == m2.shape == (0,)
    valid = N * (1 if layout == "NC" else L) if mask is None else int((~mask).sum())
    assert int(count) == valid


@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_mask_bytes_other_than_one_are_true(layout, training, device):
    """A bool mask holding bytes 2 or 255 (a uint8 tensor viewed as bool) is
    read as torch reads it, nonzero = True: the CPU kernels read such bytes
    as bool (undefined behaviour), and the channels-first loops took them as
    valid, the channels-last count as 2 or 255 padded rows each."""
    case = S.parity_case(layout)
    m, r = make_bn_pair(case.C, channels_last=case.channels_last, device=device)
    m.train(training), r.train(training)
    x, mask = S.inputs(case, device=device)
    raw = noncanonical_bool(mask)
    assert torch.equal(raw.view(torch.uint8) != 0, mask) and not torch.equal(raw.view(torch.uint8), mask.to(torch.uint8))
    y, gx = _step(m, r, x, raw, layout)
    assert (y[bn_full_mask(mask, x, case.channels_last)] == 0).all()
    assert_buffers_match(m, r)
    expected = ops.batch_norm_stats(x, mask, case.channels_last)
    for a, b in zip(ops.batch_norm_stats(x, raw, case.channels_last), expected):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# dtypes / memory layout
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_dtypes(dtype, layout, training, device):
    ref_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
    case = S.parity_case(layout)
    m, r = make_bn_pair(case.C, channels_last=case.channels_last, dtype=dtype, ref_dtype=ref_dtype, device=device)
    m.train(training), r.train(training)
    for step in range(2):
        x, mask = S.inputs(case, dtype=dtype, device=device, tag=str(step))
        y, _ = _step(m, r, x, mask, layout, ref_dtype=ref_dtype)
        assert (y[bn_full_mask(mask, x, case.channels_last)] == 0).all()
    assert m.running_mean.dtype == dtype and m.running_var.dtype == dtype
    assert_buffers_match(m, r)


def _noncontig_view(layout, shape, device):
    """Non-contiguous tensor of ``shape`` plus the leaf it is a view of."""
    if layout == "NC":
        n, c = shape
        leaf = torch.randn(n, 2 * c, device=device).requires_grad_(True)
        return leaf, lambda t: t[:, ::2]
    n, a, b = shape
    leaf = torch.randn(n, b, a, device=device).requires_grad_(True)
    return leaf, lambda t: t.transpose(1, 2)


@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_non_contiguous_input(layout, training, masked, device):
    cl = is_channels_last(layout)
    m, r = _pair(layout, "train" if training else "eval", device)
    shape = bn_input_shape(layout, N, C, L)
    leaf, view = _noncontig_view(layout, shape, device)
    x = view(leaf)
    assert x.shape == shape and not x.is_contiguous()
    _, mask = _small(layout, device, "padded" if masked else None)
    g = torch.randn(shape, device=device)
    y = call_masked(m, x, noncontig_copy(mask) if masked else None)
    y.backward(noncontig_copy(g))
    gx = view(leaf.grad)
    yr, gxr = fwd_bwd(lambda t: ref_bn(r, t, mask, cl), x.detach().contiguous(), g)
    assert_close(y, yr)
    assert_close(gx, gxr)
    for a, b in zip_strict(param_grads(m), param_grads(r)):
        assert_close(a, b)
    assert_buffers_match(m, r)


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
    layout = "NLC" if channels_last else "NCL"
    for _ in range(2):
        m2(*_small(layout, "cpu"))
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
def test_functional_batch_norm_updates_running_stats_in_place(layout, masked, device):
    cl = is_channels_last(layout)
    _, _, rm, rv = S.features(C, "functional", device=device)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    rm0, rv0 = rm.clone(), rv.clone()
    rm_ptr, rv_ptr = rm.data_ptr(), rv.data_ptr()
    w, b = torch.rand(C, device=device) + 0.5, torch.rand(C, device=device) - 0.5
    for _ in range(2):
        x, mask = _small(layout, device, "padded" if masked else None)
        y = MF.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2, eps=1e-3, padding_mask=mask,
                          channels_last=cl)
        yr = ref_bn(lambda t: F.batch_norm(t, rm_ref, rv_ref, w, b, True, 0.2, 1e-3), x, mask, cl)
        assert_close(y, yr)
        assert_close(rm, rm_ref, **running_tol(torch.float32))
        assert_close(rv, rv_ref, **running_tol(torch.float32))
    assert rm.data_ptr() == rm_ptr and rv.data_ptr() == rv_ptr
    assert not torch.allclose(rm, rm0) and not torch.allclose(rv, rv0)

    # eval: uses the running stats, does not touch them
    x, mask = _small(layout, device, "padded" if masked else None)
    before = rm.clone(), rv.clone()
    y = MF.batch_norm(x, rm, rv, w, b, training=False, momentum=0.2, eps=1e-3, padding_mask=mask, channels_last=cl)
    yr = ref_bn(lambda t: F.batch_norm(t, rm_ref, rv_ref, w, b, False, 0.2, 1e-3), x, mask, cl)
    assert_close(y, yr)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize("momentum", [0.2, None])
@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_functional_batch_norm_increments_num_batches_tracked(layout, momentum, device):
    """num_batches_tracked given: the op increments it (no caller increment), and
    momentum=None averages with factor 1 / num_batches_tracked, as nn.BatchNorm1d."""
    cl = is_channels_last(layout)
    _, _, rm, rv = S.features(C, "nbt", device=device)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    nbt = torch.tensor(2, device=device)
    for step in range(3):
        x, mask = _small(layout, device)
        MF.batch_norm(x, rm, rv, training=True, momentum=momentum, padding_mask=mask, channels_last=cl,
                      num_batches_tracked=nbt)
        assert int(nbt) == 3 + step
        factor = 1 / (3 + step) if momentum is None else momentum
        ref_bn(lambda t: F.batch_norm(t, rm_ref, rv_ref, None, None, True, factor), x, mask, cl)
        assert_close(rm, rm_ref, **running_tol(torch.float32))
        assert_close(rv, rv_ref, **running_tol(torch.float32))
    # eval, or no running statistics: num_batches_tracked is left alone, as nn.BatchNorm1d does
    MF.batch_norm(x, rm, rv, training=False, padding_mask=mask, channels_last=cl, num_batches_tracked=nbt)
    assert int(nbt) == 5
    with pytest.raises(ValueError, match="num_batches_tracked"):
        MF.batch_norm(x, rm, rv, training=True, momentum=None, padding_mask=mask, channels_last=cl)


@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_functional_batch_norm_without_running_stats(layout, device):
    cl = is_channels_last(layout)
    x, mask = _small(layout, device)
    y = MF.batch_norm(x, None, None, training=True, padding_mask=mask, channels_last=cl)
    yr = ref_bn(lambda t: F.batch_norm(t, None, None, None, None, True, 0.1, 1e-5), x, mask, cl)
    assert_close(y, yr)


# ---------------------------------------------------------------------------
# ops: outputs as documented
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_batch_norm_op_saved_stats(layout, dtype, device):
    cl = is_channels_last(layout)
    eps = 1e-5
    x, mask = _small(layout, device, dtype=dtype)
    out, save_mean, save_invstd = ops.batch_norm(x, mask, None, None, None, None, None, True, 0.1, eps, cl)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == x.shape and out.dtype == dtype
    assert save_mean.shape == (C,) and save_mean.dtype == stat_dtype
    assert save_invstd.shape == (C,) and save_invstd.dtype == stat_dtype
    packed = bn_pack(x, mask, cl).to(torch.float64)
    assert_close(save_mean, packed.mean(0), dtype=stat_dtype)
    assert_close(save_invstd, 1.0 / torch.sqrt(packed.var(0, unbiased=False) + eps), dtype=stat_dtype)

    # eval: running stats required and used; the saved statistics are theirs
    rm, rv = torch.randn(C, device=device).to(dtype), (torch.rand(C, device=device) + 0.5).to(dtype)
    out_e, sm, si = ops.batch_norm(x, mask, None, None, rm, rv, None, False, 0.1, eps, cl)
    assert_close(sm, rm, dtype=stat_dtype) and assert_close(si, (rv.double() + eps).rsqrt(), dtype=stat_dtype)
    ref = ref_bn(lambda t: F.batch_norm(t.double(), rm.double(), rv.double(), None, None, False, 0.0, eps), x, mask,
                 cl)
    assert_close(out_e, ref)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_batch_norm_op_updates_running_stats(layout, momentum, device):
    eps = 1e-5
    cl = is_channels_last(layout)
    x, mask = _small(layout, device)
    _, _, rm, rv = S.features(C, "op", device=device)
    rm0, rv0 = rm.clone(), rv.clone()
    nbt = torch.tensor(3, device=device)
    ops.batch_norm(x, mask, None, None, rm, rv, nbt, True, momentum, eps, cl)
    assert int(nbt) == 4
    packed = bn_pack(x, mask, cl).double()
    f = 0.25 if momentum is None else momentum
    tol = running_tol(torch.float32)
    assert_close(rm, (1 - f) * rm0.double() + f * packed.mean(0), **tol)
    assert_close(rv, (1 - f) * rv0.double() + f * packed.var(0, unbiased=True), **tol)

    # no valid value: running statistics untouched, the batch counted
    rm1, rv1 = rm.clone(), rv.clone()
    ops.batch_norm(x, torch.ones_like(mask), None, None, rm, rv, nbt, True, momentum, eps, cl)
    assert torch.equal(rm, rm1) and torch.equal(rv, rv1) and int(nbt) == 5
    # eval: nothing changes
    ops.batch_norm(x, mask, None, None, rm, rv, nbt, False, momentum, eps, cl)
    assert torch.equal(rm, rm1) and torch.equal(rv, rv1) and int(nbt) == 5


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_batch_norm_backward_op_output_mask(layout, training, device):
    eps = 1e-5
    cl = is_channels_last(layout)
    x, mask = _small(layout, device)
    w, b = torch.rand(C, device=device) + 0.5, torch.rand(C, device=device)
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    _, sm, si = ops.batch_norm(x, mask, w, b, rm.clone(), rv.clone(), None, training, 0.1, eps, cl)
    g = torch.randn_like(x)
    gi, gw, gb = ops.batch_norm_backward(g, x, mask, w, sm, si, training, cl, [True, True, True])
    assert gi.shape == x.shape and gw.shape == (C,) and gb.shape == (C,)
    # reference via autograd through the packed nn reference
    xl = x.clone().requires_grad_(True)
    wl, bl = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ref_bn(lambda t: F.batch_norm(t, rm.clone(), rv.clone(), wl, bl, training, 0.1, eps), xl, mask, cl).backward(g)
    assert_close(gi, xl.grad)
    assert_close(gw, wl.grad)
    assert_close(gb, bl.grad)
    gi2, gw2, gb2 = ops.batch_norm_backward(g, x, mask, w, sm, si, training, cl, [True, False, False])
    assert gw2 is None and gb2 is None
    assert torch.equal(gi2, gi)
    gi3, gw3, gb3 = ops.batch_norm_backward(g, x, mask, w, sm, si, training, cl, [False, True, True])
    assert gi3 is None
    assert torch.equal(gw3, gw) and torch.equal(gb3, gb)
    for only in (1, 2):  # one parameter gradient alone
        out = ops.batch_norm_backward(g, x, mask, w, sm, si, training, cl, [False, only == 1, only == 2])
        assert [t is None for t in out] == [True, only != 1, only != 2]
        assert torch.equal(out[only], (gw, gb)[only - 1])


# ---------------------------------------------------------------------------
# bigger shapes (vectorised tails, multi-threaded reductions) and numerics
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_large_shapes(layout, training, dtype, device):
    """Odd channel counts (SIMD tails) and > GRAIN_SIZE elements (several threads)."""
    case = S.Case(layout, 700, 67) if layout == "NC" else S.Case(layout, 16, 67, 129)
    ref_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
    m, r = make_bn_pair(case.C, channels_last=case.channels_last, dtype=dtype, ref_dtype=ref_dtype, device=device)
    m.train(training), r.train(training)
    for step in range(2):
        x, mask = S.inputs(case, dtype=dtype, device=device, tag=str(step), offset=0.7)
        # the reference reduces ~1500 terms in another order: a bit looser in float32
        extra = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
        y, gx = _step(m, r, x, mask, layout, ref_dtype=ref_dtype, **extra)
        full = bn_full_mask(mask, x, case.channels_last)
        assert (y[full] == 0).all() and (gx[full] == 0).all()
    assert_buffers_match(m, r)


@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_large_offset_is_numerically_stable(layout, device):
    """float32 input around 1000 with unit spread: a naive E[x^2]-E[x]^2 variance
    loses all precision; the result must match a float64 computation (measured:
    output 2.0e-5 off, running variance 4.7e-8 relative, running mean 4.8e-6 on
    values of 100, in every layout)."""
    case = S.Case(layout, 300, 5) if layout == "NC" else S.Case(layout, 8, 5, 40)
    m, _ = make_bn_pair(case.C, channels_last=case.channels_last, device=device)
    r64 = nn.BatchNorm1d(case.C, dtype=torch.float64).to(device)
    copy_state(r64, m)
    x, mask = S.inputs(case, device=device, scale=1.0, offset=1000.0)
    y = m(x, padding_mask=mask)
    assert_close(y, ref_bn(r64, x.double(), mask, case.channels_last), rtol=1e-4, atol=1e-4)
    assert_close(m.running_mean, r64.running_mean, **running_tol(torch.float32))
    assert_close(m.running_var, r64.running_var, **running_tol(torch.float32))


# ---------------------------------------------------------------------------
# misc usage
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_channels_last_module_accepts_nc_input(training, device):
    """channels_last only concerns 3-D input; (N, C) works the same either way."""
    m, r = make_bn_pair(C, channels_last=True, device=device)
    m.train(training), r.train(training)
    x, mask = _small("NC", device)
    _step(m, r, x, mask, "NC")
    assert_buffers_match(m, r)


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_no_grad_and_inference_mode(layout, ctx, device):
    cl = is_channels_last(layout)
    m, r = _pair(layout, "train", device)
    x, mask = _small(layout, device)
    manager = torch.no_grad() if ctx == "no_grad" else torch.inference_mode()
    with manager:
        y = m(x, padding_mask=mask)
        yr = ref_bn(r, x, mask, cl)
    assert not y.requires_grad
    assert_close(y, yr)
    assert_buffers_match(m, r)
    m.eval(), r.eval()
    with manager:
        assert_close(m(x, padding_mask=mask), ref_bn(r, x, mask, cl))


@pytest.mark.parametrize("frozen", [None, "weight", "bias"])
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_param_grads_without_input_grad(layout, training, frozen, device):
    """Parameter gradients alone (x needs none), one parameter frozen too:
    bias-only fine-tuning asks the backward for the bias gradient only."""
    cl = is_channels_last(layout)
    m, r = _pair(layout, "train" if training else "eval", device)
    if frozen:
        getattr(m, frozen).requires_grad_(False), getattr(r, frozen).requires_grad_(False)
    x, mask = _small(layout, device)  # x does not require grad
    g = torch.randn_like(x)
    m(x, padding_mask=mask).backward(g)
    ref_bn(r, x, mask, cl).backward(g)
    for name in ("weight", "bias"):
        got, want = getattr(m, name).grad, getattr(r, name).grad
        assert (got is None) == (name == frozen) == (want is None)
        if want is not None:
            assert want.abs().min() > 1e-3  # not a gradient that zeros would match
            assert_close(got, want)


def test_functional_non_contiguous_params(device):
    x = torch.randn(N, C, L, device=device)
    mask = lengths_mask([4, 3, 2, 4, 1], L).to(device)
    w, b = (torch.rand(2 * C, device=device) + 0.5)[::2], torch.randn(2 * C, device=device)[::2]
    rm, rv = torch.randn(C, 2, device=device)[:, 0], (torch.rand(C, 2, device=device) + 0.5)[:, 0]
    assert not w.is_contiguous() and not rm.is_contiguous()
    y = MF.batch_norm(x, rm, rv, w, b, training=False, padding_mask=mask)
    yr = ref_bn(lambda t: F.batch_norm(t, rm, rv, w.contiguous(), b.contiguous(), False), x, mask)
    assert_close(y, yr)
    y = MF.batch_norm(x, None, None, w, b, training=True, padding_mask=mask)
    yr = ref_bn(lambda t: F.batch_norm(t, None, None, w.contiguous(), b.contiguous(), True), x, mask)
    assert_close(y, yr)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_low_precision_input_with_float32_module(dtype, training, device):
    """bf16/fp16 activations through a float32 module (autocast-style), as nn.BatchNorm1d allows."""
    m, r = _pair("NCL", "train" if training else "eval", device)
    x, mask = _small("NCL", device, dtype=dtype)
    g = torch.randn(x.shape, device=device).to(dtype)
    y, gx = fwd_bwd(lambda t: m(t, padding_mask=mask), x, g)
    yr, gxr = fwd_bwd(lambda t: ref_bn(r, t, mask), x.float(), g.float())
    assert y.dtype == dtype and gx.dtype == dtype
    assert m.weight.grad.dtype == torch.float32 and m.running_mean.dtype == torch.float32
    assert_close(y, yr)
    assert_close(gx, gxr)
    for a, b in zip_strict(param_grads(m), param_grads(r)):
        assert_close(a, b, rtol=2e-2, atol=2e-2)
    # statistics of the same (half-precision) values, accumulated in float32
    assert_buffers_match(m, r)
