"""torch.library.opcheck on every masknorm op, from the samples of
tests/samples/ (batch_norm.py, row_norm.py, group_norm.py), with the native and the generic
kernels, on every device.

All four default sub-tests (test_schema, test_autograd_registration,
test_faketensor, test_aot_dispatch_dynamic) run for every sample: none is
skipped. The forward ops' samples differentiate input, weight and bias under
AOT dispatch; the backward ops' "double" samples have grad_output, input and
weight requiring grad (the differentiable composite that double backward
runs); the stage ops are not differentiable by themselves and their samples
do not require grad. Every op runs its float32 samples and one sample in each
of float64, bfloat16 and float16.
"""

import pytest
import torch

import samples
from samples.common import DTYPE_NAMES, by_name

pytestmark = pytest.mark.kernels

ops = torch.ops.masknorm
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# the other dtypes: one sample each, at these positions of the op's list (different layouts / cases)
OTHER_DTYPES = {torch.float64: 2, torch.bfloat16: 5, torch.float16: 8}


def _cases():
    for op, make in samples.SAMPLES.items():
        for sample in make():
            yield op, torch.float32, sample.name
        for dtype, at in OTHER_DTYPES.items():
            listed = make(dtype=dtype)
            yield op, dtype, listed[at % len(listed)].name


CASES = list(_cases())
# the quick loop (-m "not slow") opchecks each op's first sample; the full suite all of them
FIRST = {op: i for i, (op, _, _) in reversed(list(enumerate(CASES)))}
PARAMS = [pytest.param(*c, id=f"{c[0]}-{c[2]}", marks=() if FIRST[c[0]] == i else pytest.mark.slow)
          for i, c in enumerate(CASES)]


def test_every_op_has_samples():
    registered = {s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("masknorm::")}
    assert registered == {f"masknorm::{op}" for op in samples.OPS}
    assert {op for op, _, _ in CASES} == set(samples.OPS)


@pytest.mark.parametrize("op,dtype,name", PARAMS)
def test_opcheck(op, dtype, name, device):
    sample = by_name(samples.SAMPLES[op](device=device, dtype=dtype), name)
    assert DTYPE_NAMES[dtype] in name
    result = torch.library.opcheck(getattr(ops, op).default, sample.args, sample.kwargs, test_utils=ALL_UTILS)
    assert set(result) == set(ALL_UTILS)
    assert all(v == "SUCCESS" for v in result.values()), result
