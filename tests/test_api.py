"""The public API: docstrings on every public name, type hints, py.typed, and
module reprs in torch's format."""

import inspect
import pathlib
import typing

import pytest
import torch
from torch import nn

import masknorm
import masknorm.functional
import samples
from helpers import BN_TAKES_BIAS


def _public_names():
    for name in masknorm.__all__:
        yield name, getattr(masknorm, name)
    for name in masknorm.functional.__all__:
        yield f"functional.{name}", getattr(masknorm.functional, name)


PUBLIC = dict(_public_names())
FUNCTIONS = {n: f for n, f in PUBLIC.items() if inspect.isfunction(f)}
CLASSES = {n: c for n, c in PUBLIC.items() if inspect.isclass(c)}


# the registered ops (their schemas), and those a user calls: the differentiable forward ops
REGISTERED_OPS = {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("masknorm::")}
NORM_OPS = {op for op in samples.OPS if not op.endswith("_backward")
            and any(s.grad_args for s in samples.SAMPLES[op](dtype=torch.float64))}


def test_every_registered_op_has_samples():
    # the samples registry (tests/samples/) feeds the gradcheck, opcheck, fake-kernel, fuzz and error tests:
    # an op without samples would be tested by none of them
    assert REGISTERED_OPS, "no masknorm:: schemas registered"
    missing = REGISTERED_OPS - set(samples.OPS)
    assert not missing, f"ops without samples in tests/samples/: {sorted(missing)}"
    assert set(samples.OPS) <= REGISTERED_OPS, set(samples.OPS) - REGISTERED_OPS


def test_all_names_exist():
    assert set(masknorm.__all__) >= {
        "MaskedBatchNorm1d", "functional", "padding_mask_from_lengths", "convert_model", "build_info",
    }
    # every norm op has a functional form of the same name, and a module
    assert set(masknorm.functional.__all__) == NORM_OPS
    assert len(MODULES) >= len(NORM_OPS)


@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_name_has_a_docstring(name):
    doc = PUBLIC[name].__doc__
    assert doc and doc.strip(), f"masknorm.{name} has no docstring"


@pytest.mark.parametrize("name", list(CLASSES))
def test_module_methods_have_docstrings(name):
    cls = CLASSES[name]
    for method in ("forward", "extra_repr"):
        if method in vars(cls):  # defined by masknorm, not inherited from torch
            assert (getattr(cls, method).__doc__ or "").strip(), f"{name}.{method} has no docstring"


# public functions, and the methods masknorm's modules define (not inherited from torch)
ANNOTATED = dict(FUNCTIONS)
ANNOTATED.update(
    {f"{c}.{m}": vars(cls)[m] for c, cls in CLASSES.items() for m in ("__init__", "forward") if m in vars(cls)}
)


@pytest.mark.parametrize("name", list(ANNOTATED))
def test_public_functions_are_fully_annotated(name):
    fn = ANNOTATED[name]
    hints = typing.get_type_hints(fn)
    params = [p for p in inspect.signature(fn).parameters if p != "self"]
    missing = [p for p in params if p not in hints]
    assert not missing, f"{name}: no type hint for {missing}"
    assert "return" in hints, f"{name}: no return type hint"


def test_py_typed_ships_with_the_package():
    assert (pathlib.Path(masknorm.__file__).parent / "py.typed").is_file()


# every module (a class of masknorm.__all__ named Masked<torch module>): constructor arguments for both
MODULES = {name: cls for name, cls in CLASSES.items() if name.startswith("Masked")}
MODULE_ARGS = {"MaskedGroupNorm": (2, 4)}


@pytest.mark.parametrize("name", list(MODULES))
def test_every_module_has_torchs_repr(name):
    args = MODULE_ARGS.get(name, (4,))
    torch_cls = getattr(nn, name[len("Masked"):])
    assert repr(MODULES[name](*args)) == "Masked" + repr(torch_cls(*args))


@pytest.mark.parametrize(
    "masked,torch_module",
    [
        (masknorm.MaskedBatchNorm1d(512), nn.BatchNorm1d(512)),
        (masknorm.MaskedBatchNorm1d(8, eps=1e-3, momentum=None, affine=False, track_running_stats=False),
         nn.BatchNorm1d(8, eps=1e-3, momentum=None, affine=False, track_running_stats=False)),
        *([(masknorm.MaskedBatchNorm1d(8, bias=False), nn.BatchNorm1d(8, bias=False))] if BN_TAKES_BIAS else []),
        (masknorm.MaskedLayerNorm(512), nn.LayerNorm(512)),
        (masknorm.MaskedLayerNorm((2, 4), eps=1e-6, bias=False), nn.LayerNorm((2, 4), eps=1e-6, bias=False)),
        (masknorm.MaskedLayerNorm(4, elementwise_affine=False), nn.LayerNorm(4, elementwise_affine=False)),
        (masknorm.MaskedRMSNorm(512), nn.RMSNorm(512)),
        (masknorm.MaskedRMSNorm(4, eps=1e-6, elementwise_affine=False), nn.RMSNorm(4, eps=1e-6, elementwise_affine=False)),
    ],
    ids=lambda m: repr(m) if isinstance(m, nn.Module) else None,
)
def test_repr_is_torchs(masked, torch_module):
    assert repr(masked) == "Masked" + repr(torch_module)


def test_repr_batch_norm_channels_last():
    expected = repr(nn.BatchNorm1d(512))[:-1] + ", channels_last=True)"
    assert repr(masknorm.MaskedBatchNorm1d(512, channels_last=True)) == "Masked" + expected
    assert repr(masknorm.MaskedBatchNorm1d(512)).startswith(
        "MaskedBatchNorm1d(512, eps=1e-05, momentum=0.1, affine=True, "
    )


# Modules read their parameters and buffers from their own dicts (faster than
# attribute access); what replaces them must still be what forward uses.
STATE_MODULES = {
    "MaskedBatchNorm1d": lambda: masknorm.MaskedBatchNorm1d(4),
    "MaskedBatchNorm2d": lambda: masknorm.MaskedBatchNorm2d(4),
    "MaskedGroupNorm": lambda: masknorm.MaskedGroupNorm(2, 4),
    "MaskedInstanceNorm1d": lambda: masknorm.MaskedInstanceNorm1d(4, affine=True, track_running_stats=True),
    "MaskedInstanceNorm2d": lambda: masknorm.MaskedInstanceNorm2d(4, affine=True, track_running_stats=True),
    "MaskedLayerNorm": lambda: masknorm.MaskedLayerNorm(4),
    "MaskedRMSNorm": lambda: masknorm.MaskedRMSNorm(4),
}


def _state_input(name):
    g = torch.Generator().manual_seed(0)
    if name in ("MaskedLayerNorm", "MaskedRMSNorm"):
        x, mask = torch.randn(2, 5, 4, generator=g), torch.zeros(2, 5, dtype=torch.bool)
    elif name in ("MaskedBatchNorm2d", "MaskedInstanceNorm2d"):
        x, mask = torch.randn(2, 4, 3, 5, generator=g), torch.zeros(2, 3, 5, dtype=torch.bool)
    else:
        x, mask = torch.randn(2, 4, 5, generator=g), torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True
    return x, mask


def _set_state(module):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]:
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(STATE_MODULES))
def test_parametrized_weight_is_the_one_forward_uses(name, training):
    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    plain, parametrized = STATE_MODULES[name](), STATE_MODULES[name]()
    _set_state(plain)
    parametrized.load_state_dict(plain.state_dict())
    torch.nn.utils.parametrize.register_parametrization(parametrized, "weight", Doubled())
    with torch.no_grad():
        plain.weight.mul_(2)
    plain.train(training)
    parametrized.train(training)
    x, mask = _state_input(name)
    torch.testing.assert_close(parametrized(x, mask), plain(x, mask), rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(STATE_MODULES))
def test_functional_call_swaps_parameters_and_buffers(name, training):
    module, loaded = STATE_MODULES[name](), STATE_MODULES[name]()
    _set_state(loaded)
    module.train(training)
    loaded.train(training)
    state = {k: v.clone() for k, v in loaded.state_dict().items()}
    x, mask = _state_input(name)
    swapped = torch.func.functional_call(module, state, (x, mask))
    torch.testing.assert_close(swapped, loaded(x, mask), rtol=0, atol=0)
    for key, value in module.state_dict().items():  # the module's own state untouched
        assert not torch.equal(value, state[key]) or value.dtype == torch.long, key
