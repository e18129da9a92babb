"""Inputs beyond the ops' own layouts (python/masknorm/_layouts.py):

* BatchNorm over (N, C, *spatial): MaskedBatchNorm2d/3d against
  nn.BatchNorm2d/3d on the packed valid positions (outputs, gradients,
  running statistics), masks over all or trailing spatial dims, channels-last
  memory format without a copy;
* jagged NestedTensors: every module on (N, j, C) against the padded path,
  autograd, a training step, torch.compile.
"""
import copy

import pytest
import torch
from torch import nn

import masknorm
from helpers import ALL_DTYPES, assert_close, tol

pytestmark = pytest.mark.kernels


# ------------------------------------------------------------ BatchNorm2d / 3d


def packed_reference(r, x, full):
    """nn.BatchNorm on the valid positions only (packed as (1, C, K)), scattered back."""
    moved = x.movedim(1, -1)
    packed = moved[~full].T.unsqueeze(0)  # (1, C, K)
    spatial_ones = (1,) * (x.dim() - 3)  # (1, C, K, 1) or (1, C, K, 1, 1)
    result = r(packed.reshape(*packed.shape, *spatial_ones))
    out = torch.zeros_like(moved)
    out[~full] = result.reshape(packed.shape[1], -1).T
    return out.movedim(-1, 1)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rank,mask_dims", [(4, "all"), (4, "time"), (5, "all"), (5, "time")])
@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
def test_batch_norm_nd_matches_torch_on_packed_positions(rank, mask_dims, memory, dtype, device):
    C = 6
    shape = (3, C, 5, 7) if rank == 4 else (3, C, 3, 4, 5)
    spatial = shape[2:]
    masked = masknorm.MaskedBatchNorm2d(C) if rank == 4 else masknorm.MaskedBatchNorm3d(C)
    ref = (nn.BatchNorm2d if rank == 4 else nn.BatchNorm3d)(C).double()
    masked = masked.to(device, dtype)
    with torch.no_grad():
        masked.weight.uniform_(0.5, 1.5)
        masked.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict({k: v.double().cpu() if v.is_floating_point() else v.cpu()
                         for k, v in masked.state_dict().items()})
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(device, dtype)
    if memory == "channels_last":
        x = x.to(memory_format=torch.channels_last if rank == 4 else torch.channels_last_3d)
    x.requires_grad_()
    lengths = torch.tensor([spatial[-1], 2, 0])
    time_mask = torch.arange(spatial[-1]) >= lengths[:, None]  # (N, T)
    mask = time_mask if mask_dims == "time" else time_mask.view(3, *([1] * (rank - 3)), -1).expand(3, *spatial).clone()
    full = time_mask.view(3, *([1] * (rank - 3)), -1).expand(3, *spatial)
    dy = torch.randn(shape, dtype=torch.float64).to(device, dtype)
    out = masked(x, mask.to(device))
    out.backward(dy)
    xr = x.detach().double().cpu().requires_grad_()
    ref_out = packed_reference(ref, xr, full)
    ref_out.backward(dy.double().cpu())
    assert_close(out, ref_out)
    assert_close(x.grad, xr.grad)
    t = tol(dtype) if dtype in (torch.float32, torch.float64) else dict(rtol=5e-2, atol=5e-1)
    assert_close(masked.weight.grad, ref.weight.grad, **t)
    assert_close(masked.bias.grad, ref.bias.grad, **t)
    running = dict(rtol=1e-5, atol=1e-6) if dtype in (torch.float32, torch.float64) else tol(dtype)
    assert_close(masked.running_mean, ref.running_mean, **running)
    assert_close(masked.running_var, ref.running_var, **running)
    assert int(masked.num_batches_tracked) == 1
    if memory == "channels_last":
        assert out.stride() == x.stride()
    masked.eval(), ref.eval()
    with torch.no_grad():
        assert_close(masked(x, mask.to(device)), ref(x.detach().double().cpu()).masked_fill(full.unsqueeze(1), 0))


def test_batch_norm_2d_without_mask_is_torch():
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    m, r = masknorm.MaskedBatchNorm2d(3).double(), nn.BatchNorm2d(3).double()
    assert_close(m(x), r(x))
    assert_close(m.running_var, r.running_var)


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (0, 3, 2, 4, 5)])
@pytest.mark.parametrize("mask_dims", ["none", "all", "time"])
@pytest.mark.parametrize("module", ["spatial", "sync"])
def test_batch_norm_nd_of_an_empty_batch(shape, mask_dims, module):
    """N = 0, as torch's BatchNorm2d/3d take it: an empty output and input
    gradient, the running statistics left alone."""
    spatial = shape[2:]
    mask = {"none": None, "all": torch.zeros((0, *spatial), dtype=torch.bool),
            "time": torch.zeros(0, spatial[-1], dtype=torch.bool)}[mask_dims]
    if module == "sync":  # no process group: the module normalizes this process's batch
        m = masknorm.MaskedSyncBatchNorm(3)
    else:
        m = masknorm.MaskedBatchNorm2d(3) if len(shape) == 4 else masknorm.MaskedBatchNorm3d(3)
    x = torch.randn(shape, requires_grad=True)
    out = m(x, mask)
    out.sum().backward()
    assert out.shape == x.grad.shape == shape
    assert torch.equal(m.running_mean, torch.zeros(3)) and torch.equal(m.running_var, torch.ones(3))


@pytest.mark.slow  # compiles
def test_batch_norm_2d_compile_fullgraph_with_changing_shapes():
    """Flattening (N, C, F, T) with symbolic sizes, in both memory formats: compiled = eager."""
    m = masknorm.MaskedBatchNorm2d(4)
    eager = copy.deepcopy(m)
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(0)
    for N, T, memory in ((3, 10, torch.contiguous_format), (2, 7, torch.contiguous_format), (2, 9, torch.channels_last)):
        x = torch.randn(N, 4, 5, T, generator=g).to(memory_format=memory).requires_grad_()
        mask = torch.arange(T) >= torch.randint(1, T + 1, (N, 1), generator=g)
        out, expected = compiled(x, mask), eager(x, mask)
        assert_close(out, expected)
        assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])
    assert_close(m.running_var, eager.running_var)


def test_batch_norm_nd_mask_of_wrong_shape_names_both():
    m = masknorm.MaskedBatchNorm2d(3)
    with pytest.raises(RuntimeError, match=r"padding_mask of shape.*\(2, 4, 5\).*got \(2, 4\)"):
        m(torch.randn(2, 3, 4, 5), torch.zeros(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------------- jagged


def jagged(lengths, C, dtype=torch.float64, device="cpu"):
    torch.manual_seed(sum(lengths))
    return torch.nested.nested_tensor(
        [torch.randn(n, C, dtype=dtype) * 2 + 0.5 for n in lengths], layout=torch.jagged, device=device
    )


def padded_of(nt):
    padded = torch.nested.to_padded_tensor(nt, 0.0)
    lengths = nt.offsets().diff()
    return padded, torch.arange(padded.shape[1], device=padded.device)[None, :] >= lengths[:, None]


C = 8
MODULES = {
    "batch_norm": lambda: masknorm.MaskedBatchNorm1d(C, channels_last=True),
    "layer_norm": lambda: masknorm.MaskedLayerNorm(C),
    "rms_norm": lambda: masknorm.MaskedRMSNorm(C),
    "group_norm": lambda: masknorm.MaskedGroupNorm(2, C, channels_last=True),
    "instance_norm": lambda: masknorm.MaskedInstanceNorm1d(C, affine=True, track_running_stats=True,
                                                           channels_last=True),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", MODULES)
def test_jagged_matches_padded(name, dtype, device):
    m = MODULES[name]().to(device, dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
    ref = copy.deepcopy(m)
    nt = jagged([5, 1, 9, 3] if name != "instance_norm" else [5, 2, 9, 3], C, dtype, device).requires_grad_()
    padded, mask = padded_of(nt.detach())
    padded.requires_grad_()
    out = m(nt)
    assert out.is_nested and out.layout == torch.jagged and out.shape[0] == 4
    assert torch.equal(out.offsets(), nt.offsets())
    ref_out = ref(padded, mask)
    assert_close(torch.nested.to_padded_tensor(out, 0.0), ref_out)
    g = torch.randn_like(ref_out).masked_fill(mask[..., None], 0)
    # gradients: through the jagged values and through the padded tensor alike
    loss = (out.values() * g[~mask]).sum()
    grads = torch.autograd.grad(loss, [nt] + list(m.parameters()))
    ref_grads = torch.autograd.grad((ref_out * g).sum(), [padded] + list(ref.parameters()))
    assert_close(torch.nested.to_padded_tensor(grads[0], 0.0), ref_grads[0])
    t = tol(dtype) if dtype != torch.bfloat16 else dict(rtol=5e-2, atol=1e-1)
    for a, b in zip(grads[1:], ref_grads[1:]):
        assert_close(a, b, **t)
    for name_, buf in m.named_buffers():
        assert_close(buf, dict(ref.named_buffers())[name_])


def test_jagged_training_step_end_to_end():
    """A small model of jagged sequences trains: loss decreases, every
    parameter gets a gradient, batch norm's running statistics describe the tokens."""
    torch.manual_seed(0)
    model = nn.ModuleList([nn.Linear(4, C), masknorm.MaskedBatchNorm1d(C, channels_last=True),
                           masknorm.MaskedGroupNorm(2, C, channels_last=True), masknorm.MaskedLayerNorm(C),
                           nn.Linear(C, 1)])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    nt = torch.nested.nested_tensor([torch.randn(n, 4) * 3 + 2 for n in (7, 3, 11, 5)], layout=torch.jagged)
    target = torch.nested.nested_tensor([torch.ones(n, 1) for n in (7, 3, 11, 5)], layout=torch.jagged)
    losses = []
    for _ in range(20):
        h = model[0](nt)
        h = model[3](model[2](model[1](h)))
        out = model[4](h)
        loss = ((out.values() - target.values()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    tokens = model[0](nt).values().detach()
    assert_close(model[1].running_mean, tokens.mean(0), rtol=0.3, atol=0.3)


@pytest.mark.slow  # compiles every module; test_padding.py compiles in the quick loop
@pytest.mark.parametrize("name", MODULES)
def test_jagged_compile_fullgraph(name):
    m = MODULES[name]().double()
    eager = copy.deepcopy(m)
    compiled = torch.compile(m, fullgraph=True)
    nt = jagged([5, 2, 9, 3], C)
    assert_close(compiled(nt).values(), eager(nt).values())


def test_jagged_refuses_a_mask_and_other_shapes():
    nt = jagged([3, 4], C)
    with pytest.raises(ValueError, match="padding_mask=None"):
        masknorm.MaskedLayerNorm(C)(nt, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(N, j, C\)"):
        masknorm.functional.group_norm(nt.transpose(1, 2), 2)
