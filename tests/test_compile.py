"""torch.compile(module, fullgraph=True) gives eager results (forward, backward,
running statistics and num_batches_tracked, which the batch_norm op updates
inside the graph) for the three norms, the batch-norm layouts NC / NCL / NLC,
with and without masks, and for changing shapes; inputs from tests/samples/."""

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import masknorm
from helpers import (
    BN_LAYOUTS,
    assert_buffers_match,
    call_masked,
    check_step,
    init_affine,
    init_bn_state,
)
from samples import batch_norm as S
from samples import row_norm as R
from samples.common import make_mask

pytestmark = pytest.mark.slow  # torch.compile (Inductor compiles C++)

C = 3


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


def _compare_step(eager, compiled, m_comp, x, mask):
    """Eager module against the compiled copy: outputs, input and parameter gradients."""
    check_step(eager, m_comp, lambda t: call_masked(compiled, t, mask), x, mask)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", BN_LAYOUTS)
def test_compile_batch_norm_train_running_stats(layout, masked):
    case = S.parity_case(layout, "padded" if masked else None)
    eager = masknorm.MaskedBatchNorm1d(case.C, channels_last=case.channels_last)
    init_bn_state(eager)
    m_comp = copy.deepcopy(eager)
    compiled, cnt = _compile(m_comp)
    for step in range(2):
        x, mask = S.inputs(case, tag=str(step), offset=step)
        _compare_step(eager, compiled, m_comp, x, mask)
        assert_buffers_match(m_comp, eager)
    assert int(m_comp.num_batches_tracked) == 2
    assert cnt.frame_count >= 1, "nothing was compiled"


def test_compile_batch_norm_cumulative_average():
    eager = masknorm.MaskedBatchNorm1d(S.PARITY_SIZES["NCL"][1], momentum=None)
    init_bn_state(eager)
    m_comp = copy.deepcopy(eager)
    compiled, cnt = _compile(m_comp)
    for step in range(3):
        x, mask = S.inputs(S.parity_case("NCL"), tag=str(step), scale=step + 1)
        _compare_step(eager, compiled, m_comp, x, mask)
        assert_buffers_match(m_comp, eager)
    assert int(m_comp.num_batches_tracked) == 3
    assert cnt.frame_count >= 1


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", ["NCL", "NLC"])
def test_compile_batch_norm_eval(layout, masked):
    case = S.parity_case(layout, "padded" if masked else None)
    eager = masknorm.MaskedBatchNorm1d(case.C, channels_last=case.channels_last)
    init_bn_state(eager)
    eager.eval()
    m_comp = copy.deepcopy(eager)
    compiled, cnt = _compile(m_comp)
    x, mask = S.inputs(case)
    _compare_step(eager, compiled, m_comp, x, mask)
    assert_buffers_match(m_comp, eager)
    assert int(m_comp.num_batches_tracked) == 0
    assert cnt.frame_count >= 1


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_compile_row_norm(norm, masked):
    case = R.parity_case("seq", "padded" if masked else None)
    eager = (masknorm.MaskedLayerNorm if norm == "layer_norm" else masknorm.MaskedRMSNorm)(case.ns)
    init_affine(eager)
    m_comp = copy.deepcopy(eager)
    compiled, cnt = _compile(m_comp)
    x, mask = R.inputs(case)
    _compare_step(eager, compiled, m_comp, x, mask)
    assert cnt.frame_count >= 1


@pytest.mark.parametrize("kind", ["NCL", "NLC", "ln", "rms"])
def test_compile_changing_shapes(kind):
    """Recompiles for new (N, L) (dynamic shapes through the fake kernels) and stays exact."""
    if kind in BN_LAYOUTS:
        eager = masknorm.MaskedBatchNorm1d(C, channels_last=kind == "NLC")
        init_bn_state(eager)
        make_x = (lambda n, l: torch.randn(n, l, C)) if kind == "NLC" else (lambda n, l: torch.randn(n, C, l))
    else:
        eager = masknorm.MaskedLayerNorm(8) if kind == "ln" else masknorm.MaskedRMSNorm(8)
        init_affine(eager)
        make_x = lambda n, l: torch.randn(n, l, 8)  # noqa: E731
    m_comp = copy.deepcopy(eager)
    compiled, cnt = _compile(m_comp)
    for n, l in [(4, 5), (6, 7), (3, 9)]:
        _compare_step(eager, compiled, m_comp, make_x(n, l), make_mask("padded", (n, l)))
        if kind in BN_LAYOUTS:
            assert_buffers_match(m_comp, eager)
    assert cnt.frame_count >= 1


def test_compile_batch_norm_one_valid_value_raises():
    m = masknorm.MaskedBatchNorm1d(C)
    compiled, _ = _compile(m)
    x = torch.randn(2, C, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    with pytest.raises(ValueError):
        compiled(x, padding_mask=mask)
