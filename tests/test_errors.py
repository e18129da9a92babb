"""Bad inputs raise a clear RuntimeError/ValueError naming the argument, through
the modules, the functional API and the raw ops (torch.ops.masknorm.*, the
batch-norm stage ops included): wrong sizes, dtypes and devices ("meta" is the
second device on a CPU-only machine).

test_fuzz.py generates the raw ops' cases from their schemas and samples
(every tensor argument of wrong size, rank, dtype or device, bad eps,
momentum and counts, through the real ops and the fake kernels); the raw-op
tests here are the checks it does not generate."""

import re

import pytest
import torch

import masknorm
import masknorm.functional as MF
from helpers import BN_LAYOUTS, bn_input_shape, is_channels_last
import samples
from samples.common import lengths_mask

ERR = (RuntimeError, ValueError)
ops = torch.ops.masknorm
N, C, L, D = 4, 3, 5, 8

FEATURES = r"(?i)input|num_features|channel|feature|weight|running_mean"
NDIM = r"(?i)input|dim"
NS = r"(?i)input|normalized_shape"


def _good_bn_mask(layout):
    return torch.zeros(N, dtype=torch.bool) if layout == "NC" else lengths_mask([5, 3, 2, 5], 5)


def _bn_x(layout, c=C):
    return torch.randn(bn_input_shape(layout, N, c, L))


# ---------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------

BAD_BN_MASK_SHAPES = {
    "NC": [(N, L), (N + 1,), (1,)],
    "NCL": [(N,), (N, L + 1), (N + 1, L), (N, C), (N, L, 1)],
    "NLC": [(N,), (N, L + 1), (N, C), (L, N)],
}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "layout,shape", [(lay, s) for lay, shapes in BAD_BN_MASK_SHAPES.items() for s in shapes]
)
def test_bn_module_mask_wrong_shape(layout, shape, training):
    m = masknorm.MaskedBatchNorm1d(C, channels_last=is_channels_last(layout))
    m.train(training)
    with pytest.raises(ERR, match="padding_mask"):
        m(_bn_x(layout), padding_mask=torch.zeros(shape, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_bn_module_mask_wrong_dtype(layout, dtype):
    m = masknorm.MaskedBatchNorm1d(C, channels_last=is_channels_last(layout))
    mask = _good_bn_mask(layout).to(dtype)
    with pytest.raises(ERR, match="padding_mask"):
        m(_bn_x(layout), padding_mask=mask)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_bn_module_wrong_feature_count(layout, training, masked):
    m = masknorm.MaskedBatchNorm1d(C, channels_last=is_channels_last(layout))
    m.train(training)
    mask = _good_bn_mask(layout) if masked else None
    with pytest.raises(ERR, match=FEATURES):
        m(_bn_x(layout, c=C + 1), padding_mask=mask)


@pytest.mark.parametrize("shape", [(C,), (N, C, L, 2), ()])
def test_bn_module_wrong_ndim(shape):
    m = masknorm.MaskedBatchNorm1d(C)
    with pytest.raises(ERR, match=NDIM):
        m(torch.randn(shape))


@pytest.mark.parametrize("shape", [(N, D), (N, L, D)])
def test_ln_rms_module_mask_wrong_shape_and_dtype(shape):
    x = torch.randn(shape)
    bs = x.shape[:-1]
    bad_shapes = [tuple(bs) + (1,), (N + 1,) + tuple(bs[1:]), tuple(x.shape)]
    if len(bs) == 2:
        bad_shapes.append((N,))
    for mod in (masknorm.MaskedLayerNorm(D), masknorm.MaskedRMSNorm(D)):
        for s in bad_shapes:
            with pytest.raises(ERR, match="padding_mask"):
                mod(x, padding_mask=torch.zeros(s, dtype=torch.bool))
        for dt in (torch.uint8, torch.float32, torch.int64):
            with pytest.raises(ERR, match="padding_mask"):
                mod(x, padding_mask=torch.zeros(bs, dtype=dt))


def test_ln_rms_module_multi_dim_ns_mask_shape():
    x = torch.randn(N, L, 3, 4)
    for mod in (masknorm.MaskedLayerNorm((3, 4)), masknorm.MaskedRMSNorm((3, 4))):
        mod(x, padding_mask=torch.zeros(N, L, dtype=torch.bool))  # fine
        for s in [(N, L, 3), (N,), (N, L, 3, 4)]:
            with pytest.raises(ERR, match="padding_mask"):
                mod(x, padding_mask=torch.zeros(s, dtype=torch.bool))


@pytest.mark.parametrize("masked", [False, True])
def test_ln_rms_module_wrong_feature_count(masked):
    x = torch.randn(N, L, D + 1)
    mask = lengths_mask([5, 3, 2, 5], 5) if masked else None
    for mod in (masknorm.MaskedLayerNorm(D), masknorm.MaskedRMSNorm(D)):
        with pytest.raises(ERR, match=NS):
            mod(x, padding_mask=mask)
    # multi-dim normalized_shape (3, 4) vs trailing (5, 9); the mask would be ambiguous here
    for mod in (masknorm.MaskedLayerNorm((3, 4)), masknorm.MaskedRMSNorm((3, 4))):
        with pytest.raises(ERR, match=NS):
            mod(x)


# ---------------------------------------------------------------------------
# functional API: parameter / buffer sizes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("bad", ["weight", "bias", "running_mean", "running_var"])
def test_bn_functional_wrong_param_size(bad, layout, training):
    args = dict(running_mean=torch.zeros(C), running_var=torch.ones(C), weight=torch.ones(C), bias=torch.zeros(C))
    args[bad] = torch.ones(C + 1)
    x = _bn_x(layout)
    with pytest.raises(ERR, match=bad):
        MF.batch_norm(x, args["running_mean"], args["running_var"], args["weight"], args["bias"],
                      training=training, padding_mask=_good_bn_mask(layout), channels_last=is_channels_last(layout))


@pytest.mark.parametrize("fn,bad", [("layer_norm", "weight"), ("layer_norm", "bias"), ("rms_norm", "weight")])
def test_ln_rms_functional_wrong_param_size(fn, bad):
    x = torch.randn(N, L, D)
    mask = lengths_mask([5, 3, 2, 5], 5)
    for wrong in (torch.ones(D + 1), torch.ones(1, D)):
        with pytest.raises(ERR, match=bad):
            if fn == "rms_norm":
                MF.rms_norm(x, (D,), wrong, None, padding_mask=mask)
            else:
                kw = dict(weight=torch.ones(D), bias=torch.zeros(D))
                kw[bad] = wrong
                MF.layer_norm(x, (D,), kw["weight"], kw["bias"], 1e-5, padding_mask=mask)


# ---------------------------------------------------------------------------
# raw ops
# ---------------------------------------------------------------------------


def _bn_op(x=None, mask="default", w=None, b=None, rm=None, rv=None, training=True, cl=False):
    x = torch.randn(N, C, L) if x is None else x
    mask = lengths_mask([5, 3, 2, 5], 5) if isinstance(mask, str) else mask
    return ops.batch_norm(x, mask, w, b, rm, rv, None, training, 0.1, 1e-5, cl)


def test_op_batch_norm_bad_inputs():
    _bn_op()  # sanity: the good call works
    with pytest.raises(ERR, match="padding_mask"):
        _bn_op(mask=torch.zeros(N, L + 1, dtype=torch.bool))
    with pytest.raises(ERR, match="padding_mask"):
        _bn_op(mask=torch.zeros(N, dtype=torch.bool))
    with pytest.raises(ERR, match="padding_mask"):
        _bn_op(mask=torch.zeros(N, L, dtype=torch.uint8))
    with pytest.raises(ERR, match="padding_mask"):
        _bn_op(mask=torch.zeros(N, L, dtype=torch.float32))
    with pytest.raises(ERR, match="padding_mask"):  # channels_last expects (N, L) = x.shape[:2]
        _bn_op(x=torch.randn(N, L, C), mask=torch.zeros(N, C, dtype=torch.bool), cl=True)
    with pytest.raises(ERR, match="weight"):
        _bn_op(w=torch.ones(C + 1))
    with pytest.raises(ERR, match="bias"):
        _bn_op(b=torch.zeros(C - 1))
    with pytest.raises(ERR, match="running_mean"):
        _bn_op(rm=torch.zeros(C + 1), rv=torch.ones(C), training=False)
    with pytest.raises(ERR, match="running_var"):
        _bn_op(rm=torch.zeros(C), rv=torch.ones(C + 1), training=False)
    with pytest.raises(ERR, match="running_mean|running_var"):
        _bn_op(training=False)  # eval needs running stats
    with pytest.raises(ERR, match="both given or both None"):
        _bn_op(rm=torch.zeros(C))
    with pytest.raises(ERR, match=NDIM):
        _bn_op(x=torch.randn(N, C, L, 2), mask=None)
    with pytest.raises(ERR, match=NDIM):
        _bn_op(x=torch.randn(C), mask=None)
    x, mask, rm, rv = torch.randn(N, C, L), lengths_mask([5, 3, 2, 5], 5), torch.zeros(C), torch.ones(C)
    with pytest.raises(ValueError, match="momentum"):
        ops.batch_norm(x, mask, None, None, rm, rv, None, True, 1.5, 1e-5, False)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        ops.batch_norm(x, mask, None, None, rm, rv, None, True, None, 1e-5, False)
    with pytest.raises(ERR, match="num_batches_tracked"):
        ops.batch_norm(x, mask, None, None, rm, rv, torch.tensor(1.0), True, None, 1e-5, False)


def test_op_batch_norm_backward_bad_inputs():
    x = torch.randn(N, C, L)
    mask = lengths_mask([5, 3, 2, 5], 5)
    w = torch.ones(C)
    _, sm, si = ops.batch_norm(x, mask, w, None, None, None, None, True, 0.1, 1e-5, False)
    g = torch.randn_like(x)
    om = [True, True, True]
    ops.batch_norm_backward(g, x, mask, w, sm, si, True, False, om)  # sanity
    with pytest.raises(ERR, match="grad_output"):
        ops.batch_norm_backward(torch.randn(N, C, L + 1), x, mask, w, sm, si, True, False, om)
    with pytest.raises(ERR, match="padding_mask"):
        ops.batch_norm_backward(g, x, mask.float(), w, sm, si, True, False, om)
    with pytest.raises(ERR, match="padding_mask"):
        ops.batch_norm_backward(g, x, mask[:, :-1], w, sm, si, True, False, om)
    with pytest.raises(ERR, match="weight"):
        ops.batch_norm_backward(g, x, mask, torch.ones(C + 1), sm, si, True, False, om)
    with pytest.raises(ERR, match="save_mean"):
        ops.batch_norm_backward(g, x, mask, w, torch.zeros(C + 1), si, True, False, om)
    with pytest.raises(ERR, match="save_invstd"):
        ops.batch_norm_backward(g, x, mask, w, sm, torch.ones(C + 1), True, False, om)


def test_op_batch_norm_stage_specific_errors():
    x, mask = torch.randn(N, C, L), lengths_mask([5, 3, 2, 5], 5)
    mean, m2, count = ops.batch_norm_stats(x, mask, False)
    P = lambda t: t[None]  # noqa: E731  (one part)
    with pytest.raises(ERR, match=NDIM):
        ops.batch_norm_stats(torch.randn(N, C, L, 2), None, False)
    with pytest.raises(ERR, match="input"):
        ops.batch_norm_stats(x.int(), None, False)
    # merge_stats: mean is (parts, C) float32 / float64; count (parts,); eps, momentum
    with pytest.raises(ERR, match="mean"):
        ops.batch_norm_merge_stats(mean, m2, count, None, None, None, 0.1, 1e-5)  # 1-D
    with pytest.raises(ERR, match="mean"):
        ops.batch_norm_merge_stats(P(mean).half(), P(m2), P(count), None, None, None, 0.1, 1e-5)
    with pytest.raises(ERR, match="count"):
        ops.batch_norm_merge_stats(P(mean), P(m2), count.repeat(2), None, None, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="eps"):
        ops.batch_norm_merge_stats(P(mean), P(m2), P(count), None, None, None, 0.1, 0.0)
    rm, rv = torch.zeros(C), torch.ones(C)
    with pytest.raises(ValueError, match="momentum"):
        ops.batch_norm_merge_stats(P(mean), P(m2), P(count), rm, rv, None, -0.1, 1e-5)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        ops.batch_norm_merge_stats(P(mean), P(m2), P(count), rm, rv, None, None, 1e-5)
    with pytest.raises(ERR, match="both given or both None"):
        ops.batch_norm_merge_stats(P(mean), P(m2), P(count), rm, None, None, 0.1, 1e-5)
    # backward_elemt: sums and count all given or all None
    g = torch.randn_like(x)
    sum_dy, sum_dy_xhat = ops.batch_norm_backward_reduce(g, x, mask, mean, mean + 1, False)
    with pytest.raises(ERR, match="all given"):
        ops.batch_norm_backward_elemt(g, x, mask, None, mean, mean + 1, sum_dy, sum_dy_xhat, None, False)
    with pytest.raises(ERR, match="all given"):
        ops.batch_norm_backward_elemt(g, x, mask, None, mean, mean + 1, sum_dy, None, count, False)


def test_op_layer_norm_bad_inputs():
    x = torch.randn(N, L, D)
    mask = lengths_mask([5, 3, 2, 5], 5)
    w, b = torch.ones(D), torch.zeros(D)
    ops.layer_norm(x, [D], mask, w, b, 1e-5)  # sanity
    with pytest.raises(ERR, match="padding_mask"):
        ops.layer_norm(x, [D], mask[:, :-1], w, b, 1e-5)
    with pytest.raises(ERR, match="padding_mask"):
        ops.layer_norm(x, [D], mask.to(torch.uint8), w, b, 1e-5)
    with pytest.raises(ERR, match="padding_mask"):
        ops.layer_norm(x, [L, D], mask, None, None, 1e-5)  # mask must then be (N,)
    with pytest.raises(ERR, match=NS):
        ops.layer_norm(x, [D + 1], mask, None, None, 1e-5)
    with pytest.raises(ERR, match="weight"):
        ops.layer_norm(x, [D], mask, torch.ones(D + 1), b, 1e-5)
    with pytest.raises(ERR, match="bias"):
        ops.layer_norm(x, [D], mask, w, torch.zeros(D - 1), 1e-5)
    _, mean, rstd = ops.layer_norm(x, [D], mask, w, b, 1e-5)
    g = torch.randn_like(x)
    om = [True, True, True]
    ops.layer_norm_backward(g, x, [D], mask, mean, rstd, w, om)  # sanity
    with pytest.raises(ERR, match="grad_output"):
        ops.layer_norm_backward(torch.randn(N, L + 1, D), x, [D], mask, mean, rstd, w, om)
    with pytest.raises(ERR, match="mean"):
        ops.layer_norm_backward(g, x, [D], mask, mean[:, :-1], rstd, w, om)
    with pytest.raises(ERR, match="rstd"):
        ops.layer_norm_backward(g, x, [D], mask, mean, rstd[:-1], w, om)
    with pytest.raises(ERR, match="weight"):
        ops.layer_norm_backward(g, x, [D], mask, mean, rstd, torch.ones(D + 1), om)


def test_op_rms_norm_bad_inputs():
    x = torch.randn(N, L, D)
    mask = lengths_mask([5, 3, 2, 5], 5)
    w = torch.ones(D)
    ops.rms_norm(x, [D], mask, w, None)  # sanity
    with pytest.raises(ERR, match="padding_mask"):
        ops.rms_norm(x, [D], mask[:-1], w, None)
    with pytest.raises(ERR, match="padding_mask"):
        ops.rms_norm(x, [D], mask.float(), w, None)
    with pytest.raises(ERR, match=NS):
        ops.rms_norm(x, [2, D], mask, None, None)
    with pytest.raises(ERR, match="weight"):
        ops.rms_norm(x, [D], mask, torch.ones(2 * D), None)
    _, rstd = ops.rms_norm(x, [D], mask, w, None)
    g = torch.randn_like(x)
    ops.rms_norm_backward(g, x, [D], mask, rstd, w, [True, True])  # sanity
    with pytest.raises(ERR, match="grad_output"):
        ops.rms_norm_backward(torch.randn(N, L, D + 1), x, [D], mask, rstd, w, [True, True])
    with pytest.raises(ERR, match="rstd"):
        ops.rms_norm_backward(g, x, [D], mask, rstd[:, :-1], w, [True, True])
    with pytest.raises(ERR, match="weight"):
        ops.rms_norm_backward(g, x, [D], mask, rstd, torch.ones(D - 1), [True, True])


# ---------------------------------------------------------------------------
# padding_mask_from_lengths
# ---------------------------------------------------------------------------


def test_padding_mask_from_lengths_values():
    m = masknorm.padding_mask_from_lengths(torch.tensor([3, 1, 0, 2]), 4)
    assert m.dtype == torch.bool and m.shape == (4, 4)
    expected = torch.tensor([
        [False, False, False, True],
        [False, True, True, True],
        [True, True, True, True],
        [False, False, True, True],
    ])
    assert torch.equal(m, expected)
    # max_len defaults to the longest length
    m2 = masknorm.padding_mask_from_lengths(torch.tensor([3, 1, 2]))
    assert m2.shape == (3, 3)
    assert torch.equal(m2, torch.tensor([[False, False, False], [False, True, True], [False, False, True]]))


def test_padding_mask_from_lengths_too_long():
    """A length above max_len is rejected, naming max_len (it would silently
    drop tokens otherwise)."""
    with pytest.raises(ValueError, match=r"max_len=3 is shorter than the longest length 5"):
        masknorm.padding_mask_from_lengths(torch.tensor([5, 2]), 3)


def test_padding_mask_from_lengths_negative_length():
    with pytest.raises(ERR, match="length"):
        masknorm.padding_mask_from_lengths(torch.tensor([3, -1]), 4)


# ---------------------------------------------------------------------------
# wrong device (the only other device on a CPU-only machine is "meta")
# ---------------------------------------------------------------------------


def _meta_bool(*shape):
    return torch.zeros(shape, dtype=torch.bool, device="meta")


@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_bn_mask_wrong_device(layout):
    m = masknorm.MaskedBatchNorm1d(C, channels_last=is_channels_last(layout))
    mask = _meta_bool(N) if layout == "NC" else _meta_bool(N, L)
    with pytest.raises(ERR, match="padding_mask"):
        m(_bn_x(layout), padding_mask=mask)
    assert int(m.num_batches_tracked) == 0  # checked before anything is counted
    assert torch.equal(m.running_mean, torch.zeros(C))  # no garbage written


def test_ln_rms_mask_wrong_device():
    x = torch.randn(N, L, D)
    for mod in (masknorm.MaskedLayerNorm(D), masknorm.MaskedRMSNorm(D)):
        with pytest.raises(ERR, match="padding_mask"):
            mod(x, padding_mask=_meta_bool(N, L))


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_bn_training_needs_positive_eps_like_torch(eps):
    # nn.BatchNorm1d raises ValueError for eps <= 0 in training: a constant
    # channel would otherwise divide by zero
    with pytest.raises(ValueError, match="eps"):
        torch.nn.BatchNorm1d(C, eps=eps)(torch.randn(N, C))
    with pytest.raises(ValueError, match="eps"):
        masknorm.MaskedBatchNorm1d(C, eps=eps)(torch.randn(N, C))
    with pytest.raises(ValueError, match="eps"):
        ops.batch_norm(torch.randn(N, C, L), None, None, None, None, None, None, True, 0.1, eps, False)


def test_bn_eval_takes_eps_zero_and_rejects_negative_eps():
    # eval normalizes with the running variance: eps = 0 is fine (as torch);
    # a negative eps raises (as torch >= 2.13 does), instead of NaN where the
    # running variance is below -eps
    m = masknorm.MaskedBatchNorm1d(C, eps=0.0).eval()
    x = torch.randn(N, C)
    torch.testing.assert_close(m(x), torch.nn.functional.batch_norm(x, m.running_mean, m.running_var, eps=0.0))
    with pytest.raises(ValueError, match=r"masknorm::batch_norm: expected eps to be finite and >= 0 in eval"):
        masknorm.MaskedBatchNorm1d(C, eps=-1e-5).eval()(x)


# ---------------------------------------------------------------------------
# num_batches_tracked: checked whenever given, in every mode
# ---------------------------------------------------------------------------

BAD_NBT = {
    "meta": lambda: torch.tensor(0, device="meta"),
    "float": lambda: torch.tensor(0.0),
    "int32": lambda: torch.tensor(0, dtype=torch.int32),
    "three": lambda: torch.zeros(3, dtype=torch.long),
}


def _nbt_calls():
    x = torch.randn(N, C, L)
    mean, m2, count = ops.batch_norm_stats(x, None, False)
    return {
        "batch_norm-train-no-running": lambda nbt: ops.batch_norm(x, None, None, None, None, None, nbt, True, 0.1,
                                                                  1e-5, False),
        "batch_norm-eval": lambda nbt: ops.batch_norm(x, None, None, None, torch.zeros(C), torch.ones(C), nbt, False,
                                                      0.1, 1e-5, False),
        "batch_norm_merge_stats-no-running": lambda nbt: ops.batch_norm_merge_stats(
            mean[None], m2[None], count[None], None, None, nbt, 0.1, 1e-5),
    }


@pytest.mark.parametrize("bad", list(BAD_NBT))
@pytest.mark.parametrize("call", list(_nbt_calls()))
def test_num_batches_tracked_is_checked_whenever_given(call, bad):
    """Without running statistics, or in eval, num_batches_tracked went
    unchecked: a meta one sent the CPU call to the fake kernel, which returned
    uninitialized outputs; a float or int32 one raised from inside the kernel
    without naming it; a (3,) one was counted in its first element."""
    nbt = BAD_NBT[bad]()
    before = nbt.clone() if nbt.device.type != "meta" else None
    op = call.split("-")[0]
    with pytest.raises(ERR, match=rf"masknorm::{op}: expected num_batches_tracked"):
        _nbt_calls()[call](nbt)
    if before is not None:
        assert torch.equal(nbt, before)  # nothing counted


# ---------------------------------------------------------------------------
# tensors updated in place: no internal overlap, no memory shared
# ---------------------------------------------------------------------------


def _aliased_running_stats():
    """(name of the argument the error names, running_mean, running_var, nbt, x) for batch_norm."""
    x = torch.randn(N, C, L)
    buf = torch.zeros(2 * C)
    nbt = torch.tensor(0)
    return {
        "expanded_mean": ("running_mean", torch.zeros(1).expand(C), torch.ones(C), nbt, x),
        "expanded_var": ("running_var", torch.zeros(C), torch.ones(1).expand(C), nbt, x),
        "same_tensor": ("running_var", buf[:C], buf[:C], nbt, x),
        "overlapping": ("running_var", buf[:C], buf[1:C + 1], nbt, x),
        "mean_in_input": ("input", x.view(-1)[:C], torch.ones(C), nbt, x),
        "nbt_in_mean": ("num_batches_tracked", torch.zeros(C, dtype=torch.float64), torch.ones(C), None, x),
    }


@pytest.mark.parametrize("case", list(_aliased_running_stats()))
@pytest.mark.parametrize("op", ["batch_norm", "batch_norm_merge_stats"])
def test_tensors_updated_in_place_must_not_alias(op, case):
    """An expanded running statistic made the update fail halfway (after
    num_batches_tracked was counted) with an error naming no argument; running
    statistics sharing memory with each other or with the input were updated
    silently wrong (the same tensor twice: the variance overwrote the mean)."""
    name, rm, rv, nbt, x = _aliased_running_stats()[case]
    if nbt is None:  # num_batches_tracked inside the float64 running mean's memory
        nbt = rm.view(torch.int64)[:1].view(())
    if op == "batch_norm_merge_stats":
        mean, m2, count = ops.batch_norm_stats(x, None, False)
        if name == "input":  # the running mean inside the parts' means
            name, rm = "mean", mean.view(-1)
        call = lambda: ops.batch_norm_merge_stats(mean[None], m2[None], count[None], rm, rv, nbt, 0.1, 1e-5)  # noqa
    else:
        call = lambda: ops.batch_norm(x, None, None, None, rm, rv, nbt, True, 0.1, 1e-5, False)  # noqa
    saved = [t.clone() for t in (rm, rv, nbt, x)]
    with pytest.raises(RuntimeError, match=rf"masknorm::{op}: expected .*\b{name}\b"):
        call()
    for before, t in zip(saved, (rm, rv, nbt, x)):
        assert torch.equal(before, t)  # checked before anything is written


# ---------------------------------------------------------------------------
# counts: whole numbers >= 0 (CPU tensors; accelerators with data checks on)
# ---------------------------------------------------------------------------

BAD_COUNTS = {
    "fraction": [2.5], "nan": [float("nan")], "inf": [float("inf")], "negative": [-1], "negative_float": [-3.0],
    "huge_float": [1e30], "int64_max": [2**63 - 1], "total_overflows": [2**62, 2**62],
}


def _count_tensor(values):
    return torch.tensor(values, dtype=torch.float64 if any(isinstance(v, float) for v in values) else torch.long)


@pytest.mark.parametrize("bad", list(BAD_COUNTS))
@pytest.mark.parametrize("op", ["batch_norm_merge_stats", "batch_norm_backward_elemt"])
def test_counts_must_be_whole_and_non_negative(op, bad):
    """Fractional counts were rounded, NaN and too large float counts became
    INT64_MIN, negative counts and overflowing totals were used as they came:
    silently wrong statistics and gradients."""
    count = _count_tensor(BAD_COUNTS[bad])
    x = torch.randn(N, C, L)
    mean, m2, _ = ops.batch_norm_stats(x, None, False)
    if op == "batch_norm_merge_stats":
        P = count.numel()
        rm, rv, nbt = torch.zeros(C), torch.ones(C), torch.tensor(0)
        with pytest.raises(ValueError, match=r"masknorm::batch_norm_merge_stats: expected count to"):
            ops.batch_norm_merge_stats(mean.expand(P, C), m2.expand(P, C), count, rm, rv, nbt, 0.1, 1e-5)
        assert int(nbt) == 0 and torch.equal(rm, torch.zeros(C))  # checked before anything is written
    else:
        if count.numel() > 1:
            pytest.skip("backward_elemt takes one count")
        g = torch.randn_like(x)
        sum_dy, sum_dy_xhat = ops.batch_norm_backward_reduce(g, x, None, mean, m2.rsqrt(), False)
        with pytest.raises(ValueError, match=r"masknorm::batch_norm_backward_elemt: expected count to"):
            ops.batch_norm_backward_elemt(g, x, None, None, mean, m2.rsqrt(), sum_dy, sum_dy_xhat, count.reshape(()),
                                          False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.int64], ids=str)
def test_whole_counts_of_any_dtype_are_taken(dtype):
    x = torch.randn(N, C, L)
    mean, m2, count = ops.batch_norm_stats(x, None, False)
    P = lambda t: t[None]  # noqa: E731
    expected = ops.batch_norm_merge_stats(P(mean), P(m2), P(count), None, None, None, 0.1, 1e-5)
    actual = ops.batch_norm_merge_stats(P(mean), P(m2), P(count).to(dtype), None, None, None, 0.1, 1e-5)
    for a, b in zip(actual, expected):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# None for a tensor the schema requires
# ---------------------------------------------------------------------------


def _required_tensor_cases():
    for op in samples.OPS:
        sample = samples.common.by_name(samples.SAMPLES[op](), samples.WRONG[op][0])
        for i, arg in enumerate(getattr(ops, op).default._schema.arguments):
            if isinstance(arg.type, torch.TensorType):
                yield op, arg.name, sample.replace(f"{sample.name}-{arg.name}-none", **{f"a{i}": None})


REQUIRED_NONE = list(_required_tensor_cases())


@pytest.mark.parametrize("op,arg,sample", REQUIRED_NONE, ids=[s.name for *_, s in REQUIRED_NONE])
def test_none_for_a_required_tensor_is_named(op, arg, sample):
    """torch's op binding passes None for a required tensor as an undefined
    tensor: the ops met it deep inside ("tensor does not have a device")."""
    with pytest.raises(RuntimeError, match=rf"masknorm::{op}: expected {arg} to be a tensor, but got None"):
        sample.call(getattr(ops, op))
