"""torch.compile(module, fullgraph=True) gives eager results (forward, backward,
running stats and num_batches_tracked)."""

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import masknorm
from conftest import (
    assert_close,
    bn_input_shape,
    bn_mask_shape,
    fwd_bwd,
    init_affine,
    init_bn_state,
    make_mask,
    param_grads,
    zero_param_grads,
)

N, C, L = 4, 3, 5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # every test compiles a new module: avoid hitting the recompile limit (which
    # would silently fall back to eager) and cross-test cache effects
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(module):
    cnt = CompileCounterWithBackend("inductor")  # the default backend, plus a frame counter
    return torch.compile(module, fullgraph=True, backend=cnt), cnt


def _call(m, x, mask):
    return m(x) if mask is None else m(x, padding_mask=mask)


def _compare_step(eager, compiled, m_comp, x, mask):
    g = torch.randn_like(x)
    zero_param_grads(eager, m_comp)
    y_e, gx_e = fwd_bwd(lambda t: _call(eager, t, mask), x, g)
    y_c, gx_c = fwd_bwd(lambda t: _call(compiled, t, mask), x, g)
    assert y_c.shape == y_e.shape and y_c.dtype == y_e.dtype
    assert_close(y_c, y_e)
    assert_close(gx_c, gx_e)
    pe, pc = param_grads(eager), param_grads(m_comp)
    assert len(pe) == len(pc)
    for a, b in zip(pc, pe):
        assert_close(a, b)


def _compare_buffers(m_comp, eager):
    for name in ("running_mean", "running_var"):
        a, b = getattr(m_comp, name), getattr(eager, name)
        assert (a is None) == (b is None)
        if b is not None:
            assert_close(a, b)
    if eager.num_batches_tracked is not None:
        assert int(m_comp.num_batches_tracked) == int(eager.num_batches_tracked)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", ["2d", "3d", "3d_cl"])
def test_compile_batch_norm_train_running_stats(layout, masked):
    cl = layout == "3d_cl"
    eager = masknorm.MaskedBatchNorm1d(C, channels_last=cl)
    init_bn_state(eager)
    m_comp = copy.deepcopy(eager)
    compiled, cnt = _compile(m_comp)
    for step in range(2):
        x = torch.randn(bn_input_shape(layout, N, C, L)) + step
        mask = make_mask("random", bn_mask_shape(layout, N, L)) if masked else None
        _compare_step(eager, compiled, m_comp, x, mask)
        _compare_buffers(m_comp, eager)
    assert int(m_comp.num_batches_tracked) == 2
    assert cnt.frame_count >= 1, "nothing was compiled"


def test_compile_batch_norm_cumulative_average():
    eager = masknorm.MaskedBatchNorm1d(C, momentum=None)
    init_bn_state(eager)
    m_comp = copy.deepcopy(eager)
    compiled, cnt = _compile(m_comp)
    for step in range(3):
        x = torch.randn(N, C, L) * (step + 1)
        _compare_step(eager, compiled, m_comp, x, make_mask("random", (N, L)))
        _compare_buffers(m_comp, eager)
    assert int(m_comp.num_batches_tracked) == 3
    assert cnt.frame_count >= 1


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", ["3d", "3d_cl"])
def test_compile_batch_norm_eval(layout, masked):
    cl = layout == "3d_cl"
    eager = masknorm.MaskedBatchNorm1d(C, channels_last=cl)
    init_bn_state(eager)
    eager.eval()
    m_comp = copy.deepcopy(eager)
    compiled, cnt = _compile(m_comp)
    x = torch.randn(bn_input_shape(layout, N, C, L))
    mask = make_mask("random", bn_mask_shape(layout, N, L)) if masked else None
    _compare_step(eager, compiled, m_comp, x, mask)
    _compare_buffers(m_comp, eager)
    assert int(m_comp.num_batches_tracked) == 0
    assert cnt.frame_count >= 1


@pytest.mark.parametrize("masked", [False, True])
def test_compile_layer_norm(masked):
    eager = masknorm.MaskedLayerNorm(8)
    init_affine(eager)
    m_comp = copy.deepcopy(eager)
    compiled, cnt = _compile(m_comp)
    x = torch.randn(N, L, 8)
    mask = make_mask("random", (N, L)) if masked else None
    _compare_step(eager, compiled, m_comp, x, mask)
    assert cnt.frame_count >= 1


@pytest.mark.parametrize("masked", [False, True])
def test_compile_rms_norm(masked):
    eager = masknorm.MaskedRMSNorm(8)
    init_affine(eager)
    m_comp = copy.deepcopy(eager)
    compiled, cnt = _compile(m_comp)
    x = torch.randn(N, L, 8)
    mask = make_mask("random", (N, L)) if masked else None
    _compare_step(eager, compiled, m_comp, x, mask)
    assert cnt.frame_count >= 1


@pytest.mark.parametrize("kind", ["bn", "bn_cl", "ln", "rms"])
def test_compile_changing_shapes(kind):
    """Recompiles for new (N, L) (dynamic shapes through the fake kernels) and stays exact."""
    if kind.startswith("bn"):
        eager = masknorm.MaskedBatchNorm1d(C, channels_last=kind == "bn_cl")
        init_bn_state(eager)
        make_x = (lambda n, l: torch.randn(n, l, C)) if kind == "bn_cl" else (lambda n, l: torch.randn(n, C, l))
    else:
        eager = masknorm.MaskedLayerNorm(8) if kind == "ln" else masknorm.MaskedRMSNorm(8)
        init_affine(eager)
        make_x = lambda n, l: torch.randn(n, l, 8)  # noqa: E731
    m_comp = copy.deepcopy(eager)
    compiled, cnt = _compile(m_comp)
    for n, l in [(4, 5), (6, 7), (3, 9)]:
        _compare_step(eager, compiled, m_comp, make_x(n, l), make_mask("random", (n, l)))
        if kind.startswith("bn"):
            _compare_buffers(m_comp, eager)
    assert cnt.frame_count >= 1


def test_compile_batch_norm_one_valid_value_raises():
    m = masknorm.MaskedBatchNorm1d(C)
    compiled, _ = _compile(m)
    x = torch.randn(2, C, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    with pytest.raises(ValueError):
        compiled(x, padding_mask=mask)
