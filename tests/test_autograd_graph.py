"""The graph node each forward op records (NormBackward in
csrc/ops/autograd/norm_autograd.cpp), beyond its gradients' values
(test_gradcheck.py): its name, its saved tensors (released after backward,
version-checked, seen by saved-tensor hooks), the gradients a pass asks for,
compiled autograd, and dual tensors refused.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

import samples

DT = torch.float64
ops = torch.ops.masknorm
FORWARD = tuple(op for op in samples.OPS if not op.endswith("_backward")
                and any(s.grad_args and s.args[0].numel() for s in samples.SAMPLES[op](dtype=DT)))
NODE_NAMES = {"batch_norm": "MaskedBatchNormBackward", "layer_norm": "MaskedLayerNormBackward",
              "rms_norm": "MaskedRMSNormBackward", "group_norm": "MaskedGroupNormBackward",
              "instance_norm": "MaskedInstanceNormBackward"}


def _graph_case(op):
    """(f(*leaves) -> output, leaves: input, then weight (and bias), requiring grad),
    from op's first sample that differentiates all three with a mask that pads."""
    schema = getattr(ops, op).default._schema
    names = [a.name for a in schema.arguments]
    written = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    mask_at = names.index("padding_mask")
    sample = next(s for s in samples.SAMPLES[op](dtype=DT)
                  if s.args[0].numel() and s.args[mask_at] is not None and bool(s.args[mask_at].any())
                  and all(isinstance(s.args[i], torch.Tensor) for i in s.grad_args) and len(s.grad_args) >= 2)
    at = list(sample.grad_args)
    leaves = [sample.args[i].detach().clone().requires_grad_() for i in at]

    def f(*tensors):
        args = list(sample.args)
        for i, t in zip(at, tensors):
            args[i] = t
        for i in written:  # running statistics: fresh in every call
            if isinstance(args[i], torch.Tensor):
                args[i] = args[i].clone()
        return getattr(ops, op)(*args)[0]

    return f, leaves


class _BackwardCalls(TorchDispatchMode):
    """The masknorm backward ops called under it, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("masknorm::") and func.name().endswith("_backward"):
            self.calls.append((func.name(), args))
        return func(*args, **(kwargs or {}))


def test_every_forward_op_is_covered():
    assert set(FORWARD) == set(NODE_NAMES)


@pytest.mark.parametrize("op", FORWARD)
def test_node_is_named_after_the_norm(op):
    f, leaves = _graph_case(op)
    y = f(*leaves)
    assert y.grad_fn.name() == NODE_NAMES[op]
    assert [edge[0] is not None for edge in y.grad_fn.next_functions] == [True] * len(leaves)


@pytest.mark.parametrize("op", FORWARD)
def test_saved_tensors_are_released_after_backward(op):
    f, leaves = _graph_case(op)
    y = f(*leaves)
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, leaves, g, retain_graph=True)
    again = torch.autograd.grad(y, leaves, g)  # retained: same gradients
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(y, leaves, g)


@pytest.mark.parametrize("op", FORWARD)
def test_input_changed_in_place_after_forward_is_refused(op):
    f, leaves = _graph_case(op)
    x = leaves[0].clone()  # a non-leaf, so in-place is allowed
    y = f(x, *leaves[1:])
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("op", FORWARD)
def test_saved_tensor_hooks_pack_and_unpack_what_backward_reads(op):
    f, leaves = _graph_case(op)
    g = torch.randn_like(f(*leaves))
    expected = torch.autograd.grad(f(*leaves), leaves, g)
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return t.clone()  # backward must read what unpack gives, not the original

    def unpack(t):
        unpacked.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = f(*leaves)
    assert any(t is leaves[0] for t in packed)  # the input
    assert len(packed) >= 3  # input, weight and a statistic at least
    got = torch.autograd.grad(y, leaves, g)
    assert len(unpacked) == len(packed)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("op", FORWARD)
def test_backward_computes_only_the_gradients_asked_for(op):
    f, leaves = _graph_case(op)
    y = f(*leaves)
    g = torch.randn_like(y)
    with _BackwardCalls() as seen:
        (dx,) = torch.autograd.grad(y, leaves[:1], g, retain_graph=True)
    ((name, args),) = seen.calls
    assert name == f"masknorm::{op.replace('instance_norm', 'group_norm')}_backward"
    mask = list(args[-1])
    assert mask[0] and not any(mask[1:]), mask
    with _BackwardCalls() as seen:
        grads = torch.autograd.grad(y, leaves, g)
    assert all(seen.calls[0][1][-1])
    torch.testing.assert_close(grads[0], dx, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("op", FORWARD)
def test_compiled_autograd_matches_eager(op):
    from torch._dynamo import compiled_autograd

    f, leaves = _graph_case(op)
    g = torch.randn_like(f(*leaves))
    expected = torch.autograd.grad(f(*leaves), leaves, g)
    torch._dynamo.reset()
    with compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
        y = f(*leaves)
        y.backward(g)
    for leaf, e in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, e)


@pytest.mark.parametrize("requires_grad", [True, False], ids=["graph", "no-graph"])
@pytest.mark.parametrize("op", FORWARD)
def test_dual_tensors_are_refused(op, requires_grad):
    f, leaves = _graph_case(op)
    leaves = [t.detach().requires_grad_(requires_grad) for t in leaves]
    with fwAD.dual_level():
        x = fwAD.make_dual(leaves[0], torch.randn_like(leaves[0]))
        with pytest.raises(NotImplementedError, match=f"masknorm::{op}: forward-mode AD is not supported: "
                                                      "expected input without a tangent"):
            f(x, *leaves[1:])


@pytest.mark.parametrize("op", FORWARD)
def test_torch_func_grad_is_refused(op):
    # The node would see torch.func's wrapped tensors and give wrong
    # gradients: an error instead.
    f, leaves = _graph_case(op)
    leaves = [t.detach() for t in leaves]
    with pytest.raises(NotImplementedError, match=f"masknorm::{op}: torch.func transforms of a call that records a graph"):
        torch.func.grad(lambda *ts: f(*ts).sum(), argnums=tuple(range(len(leaves))))(*leaves)
    # after the transform, plain autograd records graphs again
    f(*[t.requires_grad_() for t in leaves]).sum().backward()
    assert leaves[0].grad is not None
