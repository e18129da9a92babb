"""masknorm.convert_model: nn.BatchNorm1d / nn.LayerNorm / nn.RMSNorm swapped for
the masked modules with their state kept.

Converted and original models are compared with tolerances (helpers.tol: 1e-9
in float64, rtol 1e-4 / atol 1e-5 in float32; for parameter gradients atol is
relative to the largest one), not torch.equal: masknorm's kernels sum in
another order than torch's (vectorized two-pass / Welford moments), so the two
agree to rounding, not bit for bit.
"""

import copy

import pytest
import torch
from torch import nn

import masknorm
from helpers import BN_TAKES_BIAS, assert_close, init_affine, init_bn_state, tol

# torch's norm -> masknorm's, for every module masknorm exports (MaskedSyncBatchNorm: test_sync_batch_norm.py)
NORM_TYPES = {getattr(nn, name[len("Masked"):]): getattr(masknorm, name) for name in masknorm.__all__
              if name.startswith("Masked") and name != "MaskedSyncBatchNorm"}
# constructor arguments and an input for each torch norm
EXAMPLES = {nn.BatchNorm1d: ((5,), (4, 5)), nn.BatchNorm2d: ((5,), (2, 5, 3, 2)), nn.BatchNorm3d: ((5,), (2, 5, 2, 2, 2)),
            nn.LayerNorm: ((5,), (4, 5)), nn.RMSNorm: ((5,), (4, 5)), nn.GroupNorm: ((5, 5), (2, 5, 3)),
            nn.InstanceNorm1d: ((5,), (2, 5, 3)), nn.InstanceNorm2d: ((5,), (2, 5, 3, 2)),
            nn.InstanceNorm3d: ((5,), (2, 5, 2, 2, 2))}


class Model(nn.Module):
    """Nested norms of every kind and configuration, on (N, L, 4) input."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        d = dict(dtype=dtype)
        self.inp = nn.Linear(4, 6, **d)
        self.bn = nn.BatchNorm1d(6, **d)  # channels-first (N, C, L)
        self.block = nn.Sequential(
            nn.LayerNorm(6, **d),
            nn.Linear(6, 6, **d),
            nn.RMSNorm(6, eps=1e-6, **d),
            nn.ModuleList([nn.LayerNorm(6, elementwise_affine=False, **d), nn.LayerNorm(6, bias=False, **d)]),
        )
        self.heads = nn.ModuleDict({
            "cumulative": nn.BatchNorm1d(6, momentum=None, **d),
            "no_affine": nn.BatchNorm1d(6, affine=False, **d),
            "no_running": nn.BatchNorm1d(6, track_running_stats=False, **d),
            **({"no_bias": nn.BatchNorm1d(6, bias=False, eps=1e-3, **d)} if BN_TAKES_BIAS else {}),
            "rms_plain": nn.RMSNorm(6, elementwise_affine=False, **d),
        })
        self.shared = self.block[0]  # the same LayerNorm registered twice

    def forward(self, x):
        h = self.inp(x)
        h = self.bn(h.transpose(1, 2)).transpose(1, 2)
        h = self.block[2](self.block[1](self.block[0](h)))
        for ln in self.block[3]:
            h = ln(h)
        h = self.shared(h)
        for name in ("cumulative", "no_affine", "no_running", "no_bias")[: 4 if BN_TAKES_BIAS else 3]:
            h = self.heads[name](h.reshape(-1, 6)).reshape(h.shape)  # 2-D (N*L, C)
        return self.heads["rms_plain"](h)


def _model(dtype=torch.float32):
    model = Model(dtype)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            init_bn_state(m)
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            init_affine(m)
    return model


def _norms(model):
    return [m for m in model.modules() if isinstance(m, tuple(NORM_TYPES))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_converted_model_gives_the_same_results_without_mask(training, dtype):
    model = _model(dtype).train(training)
    reference = copy.deepcopy(model)
    converted = masknorm.convert_model(model)
    assert converted is model
    norms = _norms(converted)
    assert len(norms) == 10  # the shared LayerNorm once
    assert all(type(m) in NORM_TYPES.values() for m in norms)
    for step in range(3):
        x = torch.randn(3, 5, 4, dtype=dtype) + step
        g = torch.randn(3, 5, 6, dtype=dtype)
        xr, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yr, yc = reference(xr), converted(xc)
        assert_close(yc, yr)
        yr.backward(g)
        yc.backward(g)
        assert_close(xc.grad, xr.grad)
        # Some parameter gradients are exactly 0 in theory (a bias followed by
        # a norm using batch statistics) and rounding noise in practice: atol
        # is relative to the largest gradient.
        scale = max(float(p.grad.abs().max()) for p in reference.parameters())
        for pc, pr in zip(converted.parameters(), reference.parameters()):
            assert_close(pc.grad, pr.grad, atol=tol(dtype)["atol"] * scale)
        for (name, bc), (name_r, br) in zip(converted.named_buffers(), reference.named_buffers()):
            assert name == name_r
            if bc.is_floating_point():
                assert_close(bc, br)
            else:
                assert torch.equal(bc, br), name
    assert int(converted.bn.num_batches_tracked) == (3 if training else 0)


def test_state_is_taken_over_not_copied():
    model = _model().eval()
    model.bn.weight.requires_grad_(False)
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    converted = masknorm.convert_model(model)
    assert list(converted.state_dict()) == keys
    assert all(p is params[n] for n, p in converted.named_parameters())  # same Parameter objects
    assert all(b is buffers[n] for n, b in converted.named_buffers())
    assert not converted.bn.weight.requires_grad and converted.bn.bias.requires_grad
    assert not converted.training and not any(m.training for m in converted.modules())
    assert converted.shared is converted.block[0]
    if BN_TAKES_BIAS:
        assert converted.heads["no_bias"].bias is None and converted.heads["no_bias"].eps == 1e-3
    assert converted.heads["cumulative"].momentum is None
    assert converted.heads["no_running"].running_mean is None
    assert converted.block[2].eps == 1e-6
    # an optimizer made before the conversion still trains the converted model
    before = converted.bn.bias.detach().clone()
    converted.train()
    converted(torch.randn(2, 5, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(converted.bn.bias, before)
    # checkpoints load both ways
    model_again = _model()
    model_again.load_state_dict(converted.state_dict())
    converted.load_state_dict(model_again.state_dict())


def test_dtype_device_and_hooks_kept():
    model = nn.Sequential(nn.Linear(3, 4).double(), nn.LayerNorm(4, dtype=torch.float64))
    seen = []
    handle = model[1].register_forward_hook(lambda mod, args, out: seen.append(type(mod)))
    model[1].qconfig = "kept"
    converted = masknorm.convert_model(model)
    assert converted[1].weight.dtype == torch.float64 and converted[1].weight.device == model[0].weight.device
    assert converted[1].qconfig == "kept"
    converted(torch.randn(2, 3, dtype=torch.float64))
    assert seen == [masknorm.MaskedLayerNorm]
    handle.remove()
    converted(torch.randn(2, 3, dtype=torch.float64))
    assert len(seen) == 1


@pytest.mark.parametrize("flag", ["batch_norm", "layer_norm", "rms_norm"])
def test_flags_leave_a_kind_alone(flag):
    kept = {"batch_norm": nn.BatchNorm1d, "layer_norm": nn.LayerNorm, "rms_norm": nn.RMSNorm}[flag]
    converted = masknorm.convert_model(_model(), **{flag: False})
    for m in _norms(converted):
        if isinstance(m, kept):
            assert type(m) is kept
        else:
            assert type(m) in NORM_TYPES.values()


@pytest.mark.parametrize("torch_cls", list(NORM_TYPES), ids=lambda c: c.__name__)
def test_top_level_norm_is_replaced(torch_cls):
    assert torch_cls in EXAMPLES, f"no example for {torch_cls.__name__}: add one to EXAMPLES"
    args, shape = EXAMPLES[torch_cls]
    module = torch_cls(*args).eval()
    if torch_cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
        module = torch_cls(*args, affine=True)
    converted = masknorm.convert_model(module)
    assert type(converted) is NORM_TYPES[torch_cls] and converted is not module
    assert converted.weight is module.weight and converted.training == module.training
    if torch_cls is nn.BatchNorm1d:
        assert converted.channels_last is False
    x = torch.randn(shape)
    assert_close(converted(x), module(x))


def test_masked_and_custom_subclasses_left_alone():
    class CustomBN(nn.BatchNorm1d):
        def forward(self, x):
            return super().forward(x) * 2

    class PlainSubclass(nn.LayerNorm):
        pass

    class Positive(nn.Module):
        def forward(self, w):
            return w.abs()

    masked = masknorm.MaskedBatchNorm1d(3, channels_last=True)
    parametrized = nn.LayerNorm(3)
    torch.nn.utils.parametrize.register_parametrization(parametrized, "weight", Positive())
    model = nn.ModuleList([masked, CustomBN(3), PlainSubclass(3), parametrized])
    converted = masknorm.convert_model(model)
    assert converted[0] is masked and converted[0].channels_last
    assert type(converted[1]) is CustomBN
    assert type(converted[2]) is masknorm.MaskedLayerNorm  # torch's forward: converted
    assert converted[3] is parametrized


def test_converted_model_takes_a_padding_mask():
    # The README's pattern: the model's forward passes padding_mask to its norms.
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 6)
            self.norm = nn.LayerNorm(6)

        def forward(self, x, padding_mask=None):
            h = self.proj(x)
            return self.norm(h) if padding_mask is None else self.norm(h, padding_mask=padding_mask)

    model = masknorm.convert_model(Encoder())
    x = torch.randn(2, 5, 4)
    mask = masknorm.padding_mask_from_lengths(torch.tensor([5, 3]), 5)
    x[mask] = float("nan")
    y = model(x, padding_mask=mask)
    assert (y[mask] == 0).all() and torch.isfinite(y).all()
    assert_close(y[~mask], nn.functional.layer_norm(model.proj(x[~mask]), (6,), model.norm.weight, model.norm.bias))
