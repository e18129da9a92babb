"""The fake kernels (python/masknorm/_ops.py) check arguments as the C++ ops
do: for every op, tracing with a wrong-shaped, wrong-dtype or other-device
argument (mask, weight, running statistic, saved statistic, count, ...)
raises an error naming the argument at trace time, under FakeTensorMode and
under torch.compile(fullgraph=True); and every op runs on the meta device,
giving the shapes and dtypes the CPU gives.

The wrong arguments are samples.wrong_cases() (test_errors.py runs the same
through the real ops).
"""

import pytest
import torch
import torch._dynamo
from torch._subclasses.fake_tensor import FakeTensorMode

import samples
from samples.common import by_name

ops = torch.ops.masknorm
ERR = (RuntimeError, ValueError)

WRONG_CASES = list(samples.wrong_cases())

def test_every_op_and_argument_kind_is_corrupted():
    assert {op for op, *_ in WRONG_CASES} == set(samples.OPS)
    assert {what for _, _, what, _ in WRONG_CASES} == {"size", "dim", "dtype", "device"}

@pytest.mark.parametrize("op,arg,what,sample", WRONG_CASES, ids=[s.name for *_, s in WRONG_CASES])
def test_fake_tensor_mode_names_the_wrong_argument(op, arg, what, sample):
    mode = FakeTensorMode()
    fake = sample.map(mode.from_tensor)
    with mode, pytest.raises(ERR, match=rf"masknorm::{op}: .*\b{arg}\b"):
        fake.call(getattr(ops, op))

# one wrong size per op, traced by dynamo
COMPILE_CASES = [case for case in WRONG_CASES if case[2] == "size"]
COMPILE_CASES = [next(c for c in COMPILE_CASES if c[0] == op) for op in samples.OPS]

@pytest.mark.parametrize("op,arg,what,sample", COMPILE_CASES, ids=[s.name for *_, s in COMPILE_CASES])
def test_compile_names_the_wrong_argument_at_trace_time(op, arg, what, sample):
    torch._dynamo.reset()
    fn = getattr(ops, op)
    tensors = [i for i, a in enumerate(sample.args) if isinstance(a, torch.Tensor)]

    def call(*ts):
        args = list(sample.args)
        for i, t in zip(tensors, ts):
            args[i] = t
        return fn(*args)

    compiled = torch.compile(call, fullgraph=True, backend="eager")
    # dynamo's error for a failing fake kernel: raised while tracing, before any kernel runs
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match=rf"masknorm::{op}: .*\b{arg}\b"):
        compiled(*(sample.args[i] for i in tensors))
    torch._dynamo.reset()

# ------------------------------------------------------------------ meta device

META_CASES = [(op, s.name) for op, make in samples.SAMPLES.items() for s in make()]

def _flat(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]

@pytest.mark.parametrize("op,name", META_CASES, ids=[f"{op}-{name}" for op, name in META_CASES])
def test_meta_device_gives_shapes_and_dtypes(op, name):
    sample = by_name(samples.SAMPLES[op](), name)
    fn = getattr(ops, op)
    meta = sample.to("meta")
    expected = _flat(sample.clone().call(fn))
    actual = _flat(meta.call(fn))
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert (a is None) == (e is None)
        if e is not None:
            assert a.device.type == "meta"
            assert (a.shape, a.dtype) == (e.shape, e.dtype)


# 2-D (N, C) input ignores channels_last: the fake kernels must too (a fake
# reading C from dim 2 fails torch.compile of MaskedBatchNorm1d(channels_last=True))
NC_CASES = [(op, s.name) for op, make in samples.SAMPLES.items() for s in make() if s.args[0].dim() == 2
            and "channels_last" in [a.name for a in getattr(ops, op).default._schema.arguments]]

def test_every_op_with_channels_last_has_a_2d_sample():
    # instance norm refuses 2-D input: one spatial position per sample
    with_channels_last = {op for op in samples.OPS if "channels_last" in _argument_names(op)}
    assert {op for op, _ in NC_CASES} == with_channels_last - {"instance_norm"}

def _argument_names(op):
    return [a.name for a in getattr(ops, op).default._schema.arguments]

@pytest.mark.parametrize("op,name", NC_CASES, ids=[f"{op}-{name}" for op, name in NC_CASES])
def test_fake_kernels_take_2d_input_with_channels_last(op, name):
    at = _argument_names(op).index("channels_last")
    sample = by_name(samples.SAMPLES[op](), name).replace(f"{name}-channels_last", **{f"a{at}": True})
    assert sample.args[0].dim() == 2
    fn = getattr(ops, op)
    expected = _flat(sample.clone().call(fn))
    mode = FakeTensorMode()
    with mode:
        actual = _flat(sample.map(mode.from_tensor).call(fn))
    for a, e in zip(actual, expected, strict=True):
        assert (a is None) == (e is None)
        if e is not None:
            assert (a.shape, a.dtype) == (e.shape, e.dtype)
