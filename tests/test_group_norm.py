"""Masked GroupNorm and InstanceNorm1d against torch's modules on every
sample cropped to its valid positions (outputs, input and parameter
gradients, running statistics), in every dtype and layout, with the native
and the generic kernels; gradcheck of the backward op (the forward ops': test_gradcheck.py); errors;
padding that never leaks. Samples: tests/samples/group_norm.py.
"""
import copy

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

import masknorm
import samples
from helpers import ALL_DTYPES, assert_close, tol
from samples import group_norm as SG
from samples.common import by_name

pytestmark = pytest.mark.kernels

ops = torch.ops.masknorm
LAYOUTS = ("NCL", "NLC")
GRAD_TOL = dict(eps=1e-6, atol=1e-5, rtol=1e-4)


def channels_first(x, channels_last):
    """(N, C, L) view of an input of either layout."""
    return x.transpose(1, 2) if channels_last else x


def reference(module, x, mask, channels_last, dy):
    """torch's ``module`` (float64) run on every sample cropped to its valid
    positions: (output, input gradient) with zeros at padding, and the
    summed parameter gradients."""
    xf = channels_first(x, channels_last).double()
    dyf = channels_first(dy, channels_last).double()
    out = torch.zeros_like(xf)
    dx = torch.zeros_like(xf)
    for n in range(xf.shape[0]):
        valid = torch.ones(xf.shape[2], dtype=torch.bool) if mask is None else ~mask[n].cpu()
        idx = valid.nonzero().view(-1)
        if idx.numel() == 0:
            continue
        xn = xf[n][:, idx].unsqueeze(0).detach().requires_grad_()
        yn = module(xn)
        yn.backward(dyf[n][:, idx].unsqueeze(0))
        out[n][:, idx] = yn[0].detach()
        dx[n][:, idx] = xn.grad[0]
    grads = [None if p is None or p.grad is None else p.grad.clone() for p in (module.weight, module.bias)]
    return channels_first(out, channels_last), channels_first(dx, channels_last), grads


def make_lengths_mask(N, L, lengths, device):
    return masknorm.padding_mask_from_lengths(torch.tensor(lengths), L).to(device)


# ------------------------------------------------------------------ group norm


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("groups", [1, 4, 16])
def test_group_norm_module_matches_torch_on_cropped_samples(groups, layout, dtype, device):
    N, C, L = 5, 16, 37
    channels_last = layout == "NLC"
    lengths = [30, 37, 0, 2, 19]
    mask = make_lengths_mask(N, L, lengths, device)
    shape = (N, L, C) if channels_last else (N, C, L)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(device, dtype).requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64).to(device, dtype)
    m = masknorm.MaskedGroupNorm(groups, C, channels_last=channels_last).to(device, dtype)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    r = nn.GroupNorm(groups, C).double()
    r.load_state_dict({k: v.double().cpu() for k, v in m.state_dict().items()})
    out = m(x, mask)
    out.backward(dy)
    ref_out, ref_dx, (ref_dw, ref_db) = reference(r, x.detach().cpu(), mask, channels_last, dy.cpu())
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref_out)
    assert_close(x.grad, ref_dx)
    t = tol(dtype) if dtype in (torch.float64, torch.float32) else dict(rtol=5e-2, atol=5e-2 * N * L)
    assert_close(m.weight.grad, ref_dw, **t)
    assert_close(m.bias.grad, ref_db, **t)
    padded = channels_first(out, channels_last).transpose(1, 2)[mask]
    assert padded.eq(0).all() and channels_first(x.grad, channels_last).transpose(1, 2)[mask].eq(0).all()


@pytest.mark.parametrize("shape,mask_shape", [((3, 8, 5), None), ((4, 8), (4,)), ((3, 8, 4, 6), (3, 4, 6)),
                                              ((3, 8, 4, 6), (3, 6)), ((2, 8, 3, 4, 5), (2, 5))])
def test_group_norm_any_rank_matches_torch(shape, mask_shape, device):
    """(N, C, *spatial) with a mask over all or trailing spatial dims."""
    x = torch.randn(shape, dtype=torch.float64, device=device)
    m = masknorm.MaskedGroupNorm(4, 8).double().to(device)
    r = nn.GroupNorm(4, 8).double()
    if mask_shape is None:
        assert_close(m(x), r(x.cpu()))
        return
    mask = torch.rand(mask_shape, device=device) < 0.3
    mask.view(-1)[0] = False
    out = m(x, mask)
    spatial = shape[2:]
    leading_ones = (1,) * (len(spatial) - (mask.dim() - 1))
    full = mask.view(shape[0], *leading_ones, *mask.shape[1:]).expand(shape[0], *spatial).reshape(shape[0], -1)
    flat = x.reshape(shape[0], shape[1], -1)
    ref = torch.zeros_like(flat)
    for n in range(shape[0]):
        idx = (~full[n]).nonzero().view(-1)
        if idx.numel():
            ref[n][:, idx] = r(flat[n][:, idx].cpu().unsqueeze(0))[0].to(device)
    assert_close(out.reshape(flat.shape), ref)


def test_group_norm_channels_last_memory_format_is_not_copied():
    x = torch.randn(2, 8, 5, 6).to(memory_format=torch.channels_last)
    mask = torch.zeros(2, 5, 6, dtype=torch.bool)
    mask[1, 3:] = True
    m = masknorm.MaskedGroupNorm(2, 8)
    copies = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default,
                        torch.ops.aten._to_copy.default) and args[0].dim() == 3:
                copies.append(func)
            return func(*args, **(kwargs or {}))

    with Spy():
        out = m(x, mask)
    assert copies == []
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, m(x.contiguous(), mask))


def test_group_norm_nan_at_padding_never_leaks():
    x = torch.randn(3, 8, 6, requires_grad=True)
    mask = make_lengths_mask(3, 6, [4, 6, 0], "cpu")
    poisoned = x.detach().clone()
    poisoned.transpose(1, 2)[mask] = float("nan")
    poisoned.requires_grad_()
    dy = torch.randn(3, 8, 6)
    dy.transpose(1, 2)[mask] = float("inf")
    m = masknorm.MaskedGroupNorm(4, 8)
    out = m(poisoned, mask)
    out.backward(dy)
    assert torch.isfinite(out).all() and torch.isfinite(poisoned.grad).all()
    assert torch.isfinite(m.weight.grad).all() and torch.isfinite(m.bias.grad).all()
    assert out[2].eq(0).all() and poisoned.grad[2].eq(0).all()  # no valid position: zeros


@pytest.mark.slow  # gradcheck of the backward op on every "-double" sample
def test_group_norm_backward_op_gradcheck(device):
    """The backward op's own derivatives (the composite double backward runs),
    with the statistics recomputed from the input as autograd uses it."""
    for sample in samples.SAMPLES["group_norm_backward"](device=device, dtype=torch.float64):
        if not sample.name.endswith("-double"):
            continue
        g, x, mask, w, _, _, groups, channels_last, output_mask = sample.args

        def fn(g, x, w):
            _, mean, rstd = ops.group_norm(x.detach(), mask, w.detach(), None, groups, 1e-5, channels_last)
            return ops.group_norm_backward(g, x, mask, w, mean, rstd, groups, channels_last, output_mask)

        assert gradcheck(fn, (g, x, w), **GRAD_TOL), sample.name


def test_backward_op_matches_autograd_of_forward(device):
    sample = by_name(samples.SAMPLES["group_norm"](device=device, dtype=torch.float64), "NLC-g2-float64").with_grad()
    out, mean, rstd = ops.group_norm(*sample.args)
    dy = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, (sample.args[0], sample.args[2], sample.args[3]), dy)
    x, mask, w, b, groups, eps, cl = sample.args
    dx, dw, db = ops.group_norm_backward(dy, x.detach(), mask, w.detach(), mean, rstd, groups, cl, [True, True, True])
    assert_close(dx, gx)
    assert_close(dw, gw)
    assert_close(db, gb)


# ----------------------------------------------------------------- instance norm


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_module_matches_torch_on_cropped_samples(affine, layout, dtype, device):
    N, C, L = 4, 6, 23
    channels_last = layout == "NLC"
    lengths = [23, 0, 5, 17]
    mask = make_lengths_mask(N, L, lengths, device)
    shape = (N, L, C) if channels_last else (N, C, L)
    x = (torch.randn(shape, dtype=torch.float64) * 2 - 1).to(device, dtype).requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64).to(device, dtype)
    m = masknorm.MaskedInstanceNorm1d(C, affine=affine, track_running_stats=True, channels_last=channels_last)
    m = m.to(device, dtype)
    if affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    r = nn.InstanceNorm1d(C, affine=affine).double()
    if affine:
        r.load_state_dict({k: v.double().cpu() for k, v in m.state_dict().items() if k in ("weight", "bias")})
    out = m(x, mask)
    out.backward(dy)
    ref_out, ref_dx, (ref_dw, ref_db) = reference(r, x.detach().cpu(), mask, channels_last, dy.cpu())
    assert_close(out, ref_out)
    assert_close(x.grad, ref_dx)
    if affine:
        t = tol(dtype) if dtype in (torch.float64, torch.float32) else dict(rtol=5e-2, atol=5e-2 * N * L)
        assert_close(m.weight.grad, ref_dw, **t)
        assert_close(m.bias.grad, ref_db, **t)
    # running statistics: momentum towards the average over samples (>= 2 valid positions)
    xf = channels_first(x.detach(), channels_last).double().cpu()
    means = torch.stack([xf[n][:, :l].mean(1) for n, l in enumerate(lengths) if l >= 2])
    variances = torch.stack([xf[n][:, :l].var(1) for n, l in enumerate(lengths) if l >= 2])
    # (the buffers are of the module's dtype: bfloat16/float16 hold 3 or 4 digits)
    running = dict(rtol=1e-5, atol=1e-6) if dtype in (torch.float32, torch.float64) else tol(dtype)
    assert_close(m.running_mean, 0.1 * means.mean(0), **running)
    assert_close(m.running_var, 0.9 + 0.1 * variances.mean(0), **running)
    # eval: normalized with the running statistics, padding 0
    m.eval()
    with torch.no_grad():
        out = m(x, mask)
    xs = channels_first(x.detach(), channels_last).double()
    ref = (xs - m.running_mean.double()[:, None]) / (m.running_var.double()[:, None] + m.eps).sqrt()
    if affine:
        ref = ref * m.weight.double()[:, None] + m.bias.double()[:, None]
    ref = ref.masked_fill(mask[:, None, :], 0)
    assert_close(channels_first(out, channels_last), ref)


@pytest.mark.parametrize("momentum", [0.1, None, 1.0])
def test_instance_norm_running_stats_match_torch_without_mask(momentum, device):
    """Equal lengths: nn.InstanceNorm1d's batched update itself."""
    x = torch.randn(5, 4, 9, dtype=torch.float64, device=device)
    m = masknorm.MaskedInstanceNorm1d(4, momentum=momentum, track_running_stats=True).double().to(device)
    r = nn.InstanceNorm1d(4, momentum=momentum, track_running_stats=True).double()
    for _ in range(3):
        assert_close(m(x), r(x.cpu()))
    assert_close(m.running_mean, r.running_mean)
    assert_close(m.running_var, r.running_var)
    m.eval(), r.eval()
    assert_close(m(x), r(x.cpu()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank,mask_dims", [(4, "time"), (4, "all"), (5, "time")])
@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
def test_instance_norm_2d_3d_match_torch_on_cropped_samples(rank, mask_dims, memory, dtype, device):
    """MaskedInstanceNorm2d/3d on (N, C, F, T) / (N, C, D, F, T) with time lengths: each sample's
    output and input gradient are nn.InstanceNorm2d/3d's on the sample cropped to its length, the
    parameter gradients their sum, the running statistics the average over samples."""
    N, C, T = 4, 3, 7
    lead = (5,) if rank == 4 else (2, 3)
    lengths = [7, 0, 2, 5]
    time_mask = make_lengths_mask(N, T, lengths, "cpu")
    full = time_mask.view(N, *([1] * len(lead)), T).expand(N, *lead, T)
    mask = (time_mask if mask_dims == "time" else full.clone()).to(device)
    shape = (N, C, *lead, T)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(device, dtype)
    if memory == "channels_last":
        x = x.to(memory_format=torch.channels_last if rank == 4 else torch.channels_last_3d)
    x.requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64).to(device, dtype)
    masked_cls, torch_cls = ((masknorm.MaskedInstanceNorm2d, nn.InstanceNorm2d) if rank == 4
                             else (masknorm.MaskedInstanceNorm3d, nn.InstanceNorm3d))
    m = masked_cls(C, affine=True, track_running_stats=True).to(device, dtype)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    out = m(x, mask)
    out.backward(dy)
    r = torch_cls(C, affine=True).double()
    r.load_state_dict({k: v.double().cpu() for k, v in m.state_dict().items() if k in ("weight", "bias")})
    xd, dyd = x.detach().double().cpu(), dy.double().cpu()
    ref_out, ref_dx = torch.zeros_like(xd), torch.zeros_like(xd)
    for n, length in enumerate(lengths):
        if length == 0:
            continue
        xn = xd[n:n + 1, ..., :length].clone().requires_grad_()
        yn = r(xn)
        yn.backward(dyd[n:n + 1, ..., :length])
        ref_out[n:n + 1, ..., :length], ref_dx[n:n + 1, ..., :length] = yn.detach(), xn.grad
    assert_close(out, ref_out)
    assert_close(x.grad, ref_dx)
    t = tol(dtype) if dtype != torch.bfloat16 else dict(rtol=5e-2, atol=5e-1)
    assert_close(m.weight.grad, r.weight.grad, **t)
    assert_close(m.bias.grad, r.bias.grad, **t)
    crops = [xd[n, ..., :length].reshape(C, -1) for n, length in enumerate(lengths) if length >= 2]
    running = dict(rtol=1e-5, atol=1e-6) if dtype != torch.bfloat16 else tol(dtype)
    assert_close(m.running_mean, 0.1 * torch.stack([c.mean(1) for c in crops]).mean(0), **running)
    assert_close(m.running_var, 0.9 + 0.1 * torch.stack([c.var(1) for c in crops]).mean(0), **running)
    if memory == "channels_last":
        assert out.stride() == x.stride()


@pytest.mark.parametrize("cls,torch_cls,shape", [
    (masknorm.MaskedInstanceNorm2d, nn.InstanceNorm2d, (3, 4, 5, 6)),
    (masknorm.MaskedInstanceNorm3d, nn.InstanceNorm3d, (3, 4, 2, 5, 6)),
])
def test_instance_norm_2d_3d_without_mask_are_torch(cls, torch_cls, shape):
    """No mask: torch's module, batched and unbatched, its running statistics over steps, eval,
    constructor defaults and repr."""
    m, r = cls(4, affine=True, track_running_stats=True).double(), torch_cls(4, affine=True,
                                                                               track_running_stats=True).double()
    assert repr(m) == repr(r).replace(torch_cls.__name__, cls.__name__)
    assert repr(cls(4)) == repr(torch_cls(4)).replace(torch_cls.__name__, cls.__name__)
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64) + step
        assert_close(m(x), r(x))
        assert_close(m(x[0]), r(x[0]))
    assert_close(m.running_mean, r.running_mean)
    assert_close(m.running_var, r.running_var)
    m.eval(), r.eval()
    assert_close(m(x), r(x))
    assert_close(m(x[0]), r(x[0]))


def test_instance_norm_unbatched_input_matches_torch():
    x = torch.randn(4, 9, dtype=torch.float64)
    m = masknorm.MaskedInstanceNorm1d(4, affine=True).double()
    r = nn.InstanceNorm1d(4, affine=True).double()
    r.load_state_dict(m.state_dict())
    assert_close(m(x), r(x))
    mask = torch.zeros(9, dtype=torch.bool)
    mask[6:] = True
    out = m(x, mask)
    assert_close(out[:, :6], r(x[:, :6]))
    assert out[:, 6:].eq(0).all()


# ------------------------------------------------------------------------ errors


def test_group_norm_errors_name_the_argument():
    x = torch.randn(2, 6, 5)
    with pytest.raises(ValueError, match="divisible by num_groups.*num_groups=4"):
        ops.group_norm(x, None, None, None, 4, 1e-5, False)
    with pytest.raises(ValueError, match="num_groups to be positive"):
        ops.group_norm(x, None, None, None, 0, 1e-5, False)
    with pytest.raises(RuntimeError, match="padding_mask of shape"):
        masknorm.MaskedGroupNorm(3, 6)(x, torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="weight of shape"):
        ops.group_norm(x, None, torch.ones(5), None, 3, 1e-5, False)
    with pytest.raises(ValueError, match="eps"):
        ops.group_norm(x, None, None, None, 3, float("nan"), False)
    with pytest.raises(RuntimeError, match="looks like \\(N, L, C\\)"):
        masknorm.MaskedGroupNorm(3, 6)(torch.randn(2, 5, 6))
    with pytest.raises(RuntimeError, match="padding_mask of shape \\(N, \\*spatial\\)"):
        masknorm.MaskedGroupNorm(3, 6)(torch.randn(2, 6, 4, 5), torch.zeros(2, 4, dtype=torch.bool))


def test_instance_norm_refuses_a_single_value():
    m = masknorm.MaskedInstanceNorm1d(3)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        m(torch.randn(2, 3, 1))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        nn.InstanceNorm1d(3)(torch.randn(2, 3, 1))  # torch's behaviour, followed
    mask = make_lengths_mask(3, 5, [5, 1, 0], "cpu")
    with pytest.raises(ValueError, match="sample 1 has 1"):
        m(torch.randn(3, 3, 5), mask)
    out = m(torch.randn(3, 3, 5), make_lengths_mask(3, 5, [5, 2, 0], "cpu"))
    assert out[2].eq(0).all()
    with pytest.raises(RuntimeError, match="running_mean and running_var both given"):
        ops.instance_norm(torch.randn(2, 3, 4), None, None, None, torch.zeros(3), None, 0.1, 1e-5, False)
    with pytest.raises(ValueError, match="momentum in \\[0, 1\\]"):
        ops.instance_norm(torch.randn(2, 3, 4), None, None, None, torch.zeros(3), torch.ones(3), 2.0, 1e-5, False)


# ------------------------------------------------------------- compile, export


@pytest.mark.slow  # compiles; test_padding.py compiles in the quick loop
@pytest.mark.parametrize("module", ["group", "instance", "instance2d"])
def test_compile_fullgraph_matches_eager(module):
    if module == "group":
        m = masknorm.MaskedGroupNorm(2, 8, channels_last=True)
    elif module == "instance":
        m = masknorm.MaskedInstanceNorm1d(8, affine=True, track_running_stats=True, channels_last=True)
    else:  # (N, C, F, T) with a time mask
        m = masknorm.MaskedInstanceNorm2d(8, affine=True, track_running_stats=True)
    eager = copy.deepcopy(m)
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    for N, L in ((3, 10), (4, 7)):
        x = torch.randn((N, 8, 3, L) if module == "instance2d" else (N, L, 8), requires_grad=True)
        mask = make_lengths_mask(N, L, [L, 3, 0, 5][:N], "cpu")
        out = compiled(x, mask)
        expected = eager(x, mask)
        assert_close(out, expected)
        gx, = torch.autograd.grad(out.sum(), x)
        ex, = torch.autograd.grad(expected.sum(), x)
        assert_close(gx, ex)
    if module != "group":
        assert_close(m.running_mean, eager.running_mean)
        assert_close(m.running_var, eager.running_var)


@pytest.mark.parametrize("module", ["group", "instance"])
def test_export_matches_eager(module):
    m = masknorm.MaskedGroupNorm(2, 8) if module == "group" else masknorm.MaskedInstanceNorm1d(8, affine=True)
    m.eval()
    x = torch.randn(3, 8, 10)
    mask = make_lengths_mask(3, 10, [10, 4, 0], "cpu")
    N, L = torch.export.Dim("N"), torch.export.Dim("L")
    ep = torch.export.export(m, (x, mask), dynamic_shapes=({0: N, 2: L}, {0: N, 1: L}))
    x2 = torch.randn(5, 8, 12)
    mask2 = make_lengths_mask(5, 12, [12, 4, 0, 7, 2], "cpu")
    assert_close(ep.module()(x2, mask2), m(x2, mask2))


# ------------------------------------------------------------------- conversion


def test_convert_model_converts_group_and_instance_norm():
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.GroupNorm(2, 8), nn.InstanceNorm1d(8, affine=True),
                          nn.BatchNorm2d(8), nn.BatchNorm3d(8), nn.InstanceNorm2d(8, track_running_stats=True),
                          nn.InstanceNorm3d(8, affine=True, bias=False))
    params = [p for p in model.parameters()]
    keys = list(model.state_dict())
    masknorm.convert_model(model)
    assert type(model[1]) is masknorm.MaskedGroupNorm and type(model[2]) is masknorm.MaskedInstanceNorm1d
    assert type(model[3]) is masknorm.MaskedBatchNorm2d and type(model[4]) is masknorm.MaskedBatchNorm3d
    assert type(model[5]) is masknorm.MaskedInstanceNorm2d and type(model[6]) is masknorm.MaskedInstanceNorm3d
    assert model[5].track_running_stats and not model[5].affine and model[6].affine and model[6].bias is None
    kept = masknorm.convert_model(nn.Sequential(nn.InstanceNorm2d(8)), instance_norm=False)
    assert type(kept[0]) is nn.InstanceNorm2d
    assert [p for p in model.parameters()] == params and list(model.state_dict()) == keys
    assert model[1].num_groups == 2 and model[2].affine and not model[2].track_running_stats
    kept = masknorm.convert_model(nn.Sequential(nn.GroupNorm(2, 8)), group_norm=False)
    assert type(kept[0]) is nn.GroupNorm
    # conversion to synchronized batch norm touches batch norms only
    synced = masknorm.MaskedSyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(nn.BatchNorm1d(8), nn.GroupNorm(2, 8), nn.InstanceNorm1d(8), nn.BatchNorm2d(8)))
    assert [type(m) for m in synced] == [masknorm.MaskedSyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
                                         masknorm.MaskedSyncBatchNorm]
