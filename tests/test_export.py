"""torch.export.export of small models using each masked module: the exported
program gives the eager results (outputs, input gradients, running statistics
in training), with static and dynamic batch / sequence sizes, before and after
run_decompositions (in training the batch_norm op updates running_mean,
running_var and num_batches_tracked itself; functionalized, that becomes an
auto_functionalized op and three buffer mutations), and after
torch.export.save/load.

Note: the exported program's state_dict holds the exported module's own
parameter and buffer tensors, so running ep.module() in training mode updates
the original module's running statistics too; each test keeps an eager deep
copy made before the export.
"""

import copy
import io

import pytest
import torch
from torch import nn
from torch.export import Dim

import masknorm
from helpers import assert_close, init_affine, init_bn_state, running_tol
from samples.common import make_mask

pytestmark = pytest.mark.slow  # torch.export traces and runs decompositions

C_IN, C, N, L = 4, 6, 3, 5
KINDS = ["NCL", "NLC", "ln", "rms"]  # batch norm in its two 3-D layouts, layer norm, RMS norm


class Net(nn.Module):
    """Linear -> masked norm -> Linear on (N, L, C_IN) tokens with an (N, L) padding mask."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.inp = nn.Linear(C_IN, C)
        if kind in ("NCL", "NLC"):
            self.norm = masknorm.MaskedBatchNorm1d(C, channels_last=kind == "NLC")
            init_bn_state(self.norm)
        else:
            self.norm = masknorm.MaskedLayerNorm(C) if kind == "ln" else masknorm.MaskedRMSNorm(C)
            init_affine(self.norm)
        self.out = nn.Linear(C, 2)

    def forward(self, x, padding_mask):
        h = self.inp(x)
        if self.kind == "NCL":  # channels-first BatchNorm takes (N, C, L)
            return self.out(self.norm(h.transpose(1, 2), padding_mask).transpose(1, 2))
        return self.out(self.norm(h, padding_mask))


def _inputs(n=N, l=L):
    return torch.randn(n, l, C_IN), make_mask("padded", (n, l))


def _export(model, dynamic, strict=False):
    x, mask = _inputs()
    shapes = None
    if dynamic:
        batch, seq = Dim("batch", min=2), Dim("seq", min=2)
        shapes = {"x": {0: batch, 1: seq}, "padding_mask": {0: batch, 1: seq}}
    return torch.export.export(model, (x, mask), dynamic_shapes=shapes, strict=strict)


def _assert_same_buffers(exported_module, eager):
    for name, buf in eager.named_buffers():
        assert torch.equal(exported_module.get_buffer(name), buf), name


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize(
    # train/eval only changes batch norm
    "kind,training", [(k, t) for k in KINDS for t in ((False, True) if k in ("NCL", "NLC") else (True,))]
)
def test_export_matches_eager(kind, training, dynamic):
    model = Net(kind).train(training)
    eager = copy.deepcopy(model)
    ep = _export(model, dynamic)
    exported = ep.module()
    sizes = [(N, L), (5, 7), (2, 3)] if dynamic else [(N, L), (N, L)]
    for n, l in sizes:
        x, mask = _inputs(n, l)
        # same ops on the same values: bit-identical
        assert torch.equal(exported(x, mask), eager(x, mask))
        _assert_same_buffers(exported, eager)
    if kind in ("NCL", "NLC") and training:
        assert int(exported.get_buffer("norm.num_batches_tracked")) == len(sizes)


@pytest.mark.parametrize("kind", KINDS)
def test_export_gradients_match_eager(kind):
    model = Net(kind).train()
    eager = copy.deepcopy(model)
    exported = _export(model, dynamic=True).module()
    x, mask = _inputs(4, 6)
    xe, xx = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(4, 6, 2)
    eager(xe, mask).backward(g)
    exported(xx, mask).backward(g)
    assert torch.equal(xx.grad, xe.grad)
    for (name, p), pe in zip(exported.named_parameters(), eager.parameters()):
        assert torch.equal(p.grad, pe.grad), name


@pytest.mark.parametrize("training", [False, True])
def test_export_run_decompositions_functionalizes_running_stats(training):
    model = Net("NLC").train(training)
    eager = copy.deepcopy(model)
    ep = _export(model, dynamic=True)
    # one op call updates the running statistics and num_batches_tracked (no separate add_)
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    (bn,) = [n for n in calls if n.target == torch.ops.masknorm.batch_norm.default]
    assert not any(n.target == torch.ops.aten.add_.Tensor for n in calls)
    buffers = {ep.graph_signature.inputs_to_buffers.get(a.name) for a in bn.args if isinstance(a, torch.fx.Node)}
    assert {"norm.running_mean", "norm.running_var"} <= buffers
    assert ("norm.num_batches_tracked" in buffers) == training
    ep = ep.run_decompositions()
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    if training:
        assert mutated == {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
    else:
        # The schema declares running_mean/running_var mutable (Tensor(a!)?) in eval too, so
        # functionalization may write them back (unchanged, checked below); nothing else.
        assert mutated <= {"norm.running_mean", "norm.running_var"}
    exported = ep.module()
    before = {name: buf.clone() for name, buf in exported.named_buffers()}
    for n, l in [(N, L), (4, 8)]:
        x, mask = _inputs(n, l)
        # decomposed Linear (addmm) may round differently from eager linear
        assert_close(exported(x, mask), eager(x, mask))
        for name, buf in eager.named_buffers():
            if buf.is_floating_point():
                assert_close(exported.get_buffer(name), buf, **running_tol(buf.dtype))
            else:
                assert torch.equal(exported.get_buffer(name), buf), name
    if not training:
        for name, buf in exported.named_buffers():
            assert torch.equal(buf, before[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_export_strict(kind):
    model = Net(kind).eval()
    eager = copy.deepcopy(model)
    exported = _export(model, dynamic=False, strict=True).module()
    x, mask = _inputs()
    assert torch.equal(exported(x, mask), eager(x, mask))


@pytest.mark.parametrize("kind", ["NLC", "ln"])
def test_export_save_load_round_trip(kind):
    model = Net(kind).eval()
    eager = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.export.save(_export(model, dynamic=True), buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    x, mask = _inputs(4, 9)
    assert torch.equal(loaded(x, mask), eager(x, mask))
