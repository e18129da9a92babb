"""Sample inputs for the masknorm ops, one module per op family:

* ``samples.batch_norm``: batch_norm, batch_norm_backward and the stages
  batch_norm_stats, batch_norm_merge_stats, batch_norm_elemt,
  batch_norm_backward_reduce and batch_norm_backward_elemt;
* ``samples.row_norm``: layer_norm, layer_norm_backward, rms_norm and
  rms_norm_backward;
* ``samples.group_norm``: group_norm, group_norm_backward and instance_norm;
* ``samples.common``: the ``Sample`` record, seeded data, the mask vocabulary
  and wrong-argument variants.

Each module's ``SAMPLES`` maps an op's name to ``fn(device, dtype)`` giving
its samples; ``WRONG`` names the sample and the arguments error tests
corrupt. The parity, gradcheck, opcheck, fake-kernel, meta, compile and export
tests all draw from here.
"""

from samples import batch_norm, group_norm, row_norm  # noqa: E402

SAMPLES = {**batch_norm.SAMPLES, **row_norm.SAMPLES, **group_norm.SAMPLES}
WRONG = {**batch_norm.WRONG, **row_norm.WRONG, **group_norm.WRONG}
OPS = tuple(SAMPLES)


def wrong_cases():
    """(op, argument, what is wrong, sample) for every op: samples.common.wrong_variants
    of the sample WRONG names (shared by test_fuzz.py, through the real ops,
    and test_fake_kernels.py, through the fake kernels)."""
    from samples.common import by_name, wrong_variants
    import torch

    for op, (name, positions) in WRONG.items():
        base = by_name(SAMPLES[op](), name)
        for arg, what, sample in wrong_variants(base, getattr(torch.ops.masknorm, op), positions):
            yield op, arg, what, sample
