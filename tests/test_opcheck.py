"""torch.library.opcheck on every op of the contract.

All four default sub-tests (test_schema, test_autograd_registration,
test_faketensor, test_aot_dispatch_dynamic) are run for every sample: none of
them is skipped.  The forward ops (batch_norm, layer_norm, rms_norm) get
samples with requires_grad inputs so that the autograd registration and the
backward under AOT dispatch are exercised.  The backward ops get samples
without grad (their fast kernel) and, as variant "double", samples whose
grad_output, input and weight require grad (their differentiable composite,
which double backward runs).  batch_norm_update_running_stats is not
differentiable, so its samples do not require grad.
"""

import pytest
import torch

import masknorm  # noqa: F401
from conftest import lengths_mask

ops = torch.ops.masknorm
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _check(op, args):
    result = torch.library.opcheck(op, args, test_utils=ALL_UTILS)
    assert set(result) == set(ALL_UTILS)
    assert all(v == "SUCCESS" for v in result.values()), result


def _rg(t, flag=True):
    return t.detach().clone().requires_grad_(flag) if t is not None else None


def _double(sample, w_at):
    """The backward-op sample with grad_output, input and weight (positions 0,
    1 and w_at) requiring grad, as in double backward."""
    s = list(sample)
    s[0], s[1], s[w_at] = _rg(s[0]), _rg(s[1]), _rg(s[w_at])
    return tuple(s)


# ---------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------


def bn_samples():
    torch.manual_seed(1)
    C, N, L = 3, 4, 5
    mask3 = lengths_mask([5, 3, 2, 5], 5)
    mask2 = torch.tensor([False, True, False, False])
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    s = {}
    # (input, padding_mask, weight, bias, running_mean, running_var, training, eps, channels_last)
    s["train_3d_masked_grad"] = (_rg(torch.randn(N, C, L)), mask3, _rg(w), _rg(b), None, None, True, 1e-5, False)
    s["train_3d_cl_masked_grad"] = (_rg(torch.randn(N, L, C)), mask3, _rg(w), _rg(b), None, None, True, 1e-5, True)
    s["train_2d_nomask_noaffine_grad"] = (_rg(torch.randn(N, C)), None, None, None, None, None, True, 1e-5, False)
    s["train_2d_masked_running_given"] = (torch.randn(N, C), mask2, w, b, rm.clone(), rv.clone(), True, 1e-3, False)
    s["eval_3d_masked_grad"] = (_rg(torch.randn(N, C, L)), mask3, _rg(w), _rg(b), rm.clone(), rv.clone(), False, 1e-5, False)
    s["eval_3d_cl_nomask"] = (torch.randn(N, L, C), None, w, b, rm.clone(), rv.clone(), False, 1e-5, True)
    s["train_3d_f64_masked_grad"] = (_rg(torch.randn(N, C, L, dtype=torch.float64)), mask3, None, None, None, None, True, 1e-5, False)
    s["train_3d_bf16_masked"] = (torch.randn(N, C, L).bfloat16(), mask3, w.bfloat16(), b.bfloat16(), None, None, True, 1e-5, False)
    return s


BN_NAMES = [
    "train_3d_masked_grad", "train_3d_cl_masked_grad", "train_2d_nomask_noaffine_grad",
    "train_2d_masked_running_given", "eval_3d_masked_grad", "eval_3d_cl_nomask",
    "train_3d_f64_masked_grad", "train_3d_bf16_masked",
]
BN_FLOAT = [n for n in BN_NAMES if "bf16" not in n]
BN_AFFINE = [n for n in BN_FLOAT if "noaffine" not in n and "f64" not in n]


@pytest.mark.parametrize("name", BN_NAMES)
def test_opcheck_batch_norm(name):
    _check(ops.batch_norm.default, bn_samples()[name])


def bn_backward_sample(name, variant):
    x, mask, w, b, rm, rv, training, eps, cl = bn_samples()[name]
    x = x.detach()
    w = w.detach() if w is not None else None
    b = b.detach() if b is not None else None
    _, sm, si, _ = ops.batch_norm(x, mask, w, b, rm, rv, training, eps, cl)
    g = torch.randn_like(x)
    om = {
        "all": [True, w is not None, b is not None],
        "input_only": [True, False, False],
        "params_only": [False, True, True],
        "double": [True, w is not None, b is not None],
    }[variant]
    sample = (g, x, mask, w, sm, si, training, cl, om)
    return _double(sample, 3) if variant == "double" else sample


@pytest.mark.parametrize(
    "name,variant",
    [(n, v) for n in BN_FLOAT for v in ("all", "input_only", "double")] + [(n, "params_only") for n in BN_AFFINE],
)
def test_opcheck_batch_norm_backward(name, variant):
    _check(ops.batch_norm_backward.default, bn_backward_sample(name, variant))


def bn_update_samples():
    torch.manual_seed(2)
    C = 3
    x = torch.randn(4, C, 5)
    mask = lengths_mask([5, 3, 2, 5], 5)
    _, sm, si, count = ops.batch_norm(x, mask, None, None, None, None, True, 1e-5, False)
    x64 = x.double()
    _, sm64, si64, count64 = ops.batch_norm(x64, mask, None, None, None, None, True, 1e-5, False)
    zero = torch.tensor(0, dtype=torch.long)
    nbt = torch.tensor(3, dtype=torch.long)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    s = {
        # (running_mean, running_var, save_mean, save_invstd, count, eps, momentum, num_batches_tracked)
        "momentum": (rm.clone(), rv.clone(), sm, si, count, 1e-5, 0.1, None),
        "momentum_with_nbt": (rm.clone(), rv.clone(), sm, si, count, 1e-5, 0.1, nbt.clone()),
        "cumulative_avg": (rm.clone(), rv.clone(), sm, si, count, 1e-5, None, nbt.clone()),
        "count_zero": (rm.clone(), rv.clone(), sm, si, zero, 1e-5, 0.1, None),
        "float64": (rm.double(), rv.double(), sm64, si64, count64, 1e-5, 0.3, None),
    }
    return s


@pytest.mark.parametrize("name", ["momentum", "momentum_with_nbt", "cumulative_avg", "count_zero", "float64"])
def test_opcheck_batch_norm_update_running_stats(name):
    _check(ops.batch_norm_update_running_stats.default, bn_update_samples()[name])


def ln_samples():
    torch.manual_seed(3)
    mask = lengths_mask([5, 3, 1, 0], 5)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    w2, b2 = torch.rand(2, 4) + 0.5, torch.randn(2, 4)
    return {
        # (input, normalized_shape, padding_mask, weight, bias, eps)
        "masked_affine_grad": (_rg(torch.randn(4, 5, 8)), [8], mask, _rg(w), _rg(b), 1e-5),
        "nomask_affine_grad": (_rg(torch.randn(4, 5, 8)), [8], None, _rg(w), _rg(b), 1e-5),
        "masked_weight_only_grad": (_rg(torch.randn(4, 5, 8)), [8], mask, _rg(w), None, 1e-5),
        "masked_noaffine_grad": (_rg(torch.randn(4, 5, 8)), [8], mask, None, None, 1e-3),
        "multi_ns_masked_grad": (_rg(torch.randn(4, 5, 2, 4)), [2, 4], mask, _rg(w2), _rg(b2), 1e-5),
        "masked_no_grad": (torch.randn(4, 5, 8), [8], mask, w, b, 1e-5),
        "bf16_masked": (torch.randn(4, 5, 8).bfloat16(), [8], mask, w.bfloat16(), b.bfloat16(), 1e-5),
    }


LN_NAMES = [
    "masked_affine_grad", "nomask_affine_grad", "masked_weight_only_grad", "masked_noaffine_grad",
    "multi_ns_masked_grad", "masked_no_grad", "bf16_masked",
]


@pytest.mark.parametrize("name", LN_NAMES)
def test_opcheck_layer_norm(name):
    _check(ops.layer_norm.default, ln_samples()[name])


def ln_backward_sample(name, variant):
    x, ns, mask, w, b, eps = ln_samples()[name]
    x = x.detach()
    w = w.detach() if w is not None else None
    b = b.detach() if b is not None else None
    _, mean, rstd = ops.layer_norm(x, ns, mask, w, b, eps)
    g = torch.randn_like(x)
    om = {
        "all": [True, w is not None, b is not None],
        "input_only": [True, False, False],
        "params_only": [False, True, True],
        "double": [True, w is not None, b is not None],
    }[variant]
    sample = (g, x, ns, mask, mean, rstd, w, om)
    return _double(sample, 6) if variant == "double" else sample


LN_AFFINE = ["masked_affine_grad", "nomask_affine_grad", "multi_ns_masked_grad", "masked_no_grad"]


@pytest.mark.parametrize(
    "name,variant",
    [(n, v) for n in LN_NAMES if "bf16" not in n for v in ("all", "input_only", "double")]
    + [(n, "params_only") for n in LN_AFFINE],
)
def test_opcheck_layer_norm_backward(name, variant):
    _check(ops.layer_norm_backward.default, ln_backward_sample(name, variant))


def rms_samples():
    torch.manual_seed(4)
    mask = lengths_mask([5, 3, 1, 0], 5)
    w = torch.rand(8) + 0.5
    w2 = torch.rand(2, 4) + 0.5
    return {
        # (input, normalized_shape, padding_mask, weight, eps)
        "masked_weight_grad": (_rg(torch.randn(4, 5, 8)), [8], mask, _rg(w), 1e-6),
        "masked_eps_none_grad": (_rg(torch.randn(4, 5, 8)), [8], mask, _rg(w), None),
        "nomask_weight_grad": (_rg(torch.randn(4, 5, 8)), [8], None, _rg(w), None),
        "masked_noaffine_grad": (_rg(torch.randn(4, 5, 8)), [8], mask, None, 1e-5),
        "multi_ns_masked_grad": (_rg(torch.randn(4, 5, 2, 4)), [2, 4], mask, _rg(w2), None),
        "f64_masked_grad": (_rg(torch.randn(4, 5, 8, dtype=torch.float64)), [8], mask, _rg(w.double()), None),
        "bf16_masked": (torch.randn(4, 5, 8).bfloat16(), [8], mask, w.bfloat16(), None),
    }


RMS_NAMES = [
    "masked_weight_grad", "masked_eps_none_grad", "nomask_weight_grad", "masked_noaffine_grad",
    "multi_ns_masked_grad", "f64_masked_grad", "bf16_masked",
]


@pytest.mark.parametrize("name", RMS_NAMES)
def test_opcheck_rms_norm(name):
    _check(ops.rms_norm.default, rms_samples()[name])


def rms_backward_sample(name, variant):
    x, ns, mask, w, eps = rms_samples()[name]
    x = x.detach()
    w = w.detach() if w is not None else None
    _, rstd = ops.rms_norm(x, ns, mask, w, eps)
    g = torch.randn_like(x)
    om = {"all": [True, w is not None], "double": [True, w is not None], "input_only": [True, False]}.get(
        variant, [False, True]
    )
    sample = (g, x, ns, mask, rstd, w, om)
    return _double(sample, 5) if variant == "double" else sample


@pytest.mark.parametrize(
    "name,variant",
    [(n, v) for n in RMS_NAMES if "bf16" not in n for v in ("all", "input_only", "double")]
    + [(n, "weight_only") for n in RMS_NAMES if "bf16" not in n and "noaffine" not in n],
)
def test_opcheck_rms_norm_backward(name, variant):
    _check(ops.rms_norm_backward.default, rms_backward_sample(name, variant))
