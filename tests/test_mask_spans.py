"""Channels-first masks of every shape through the CPU kernels.

For (N, C, L) input the CPU kernels visit each row's runs of valid positions
(reading no padding, ending each run in a whole vector whose lanes past the
run are cleared), or a fragmented row in one pass under its lane masks
(csrc/ops/cpu/norm_utils.h: MaskLanes, for_valid_spans). Both must give the
generic kernels' results, with NaN stored at every padded position (a run's
last vector reads past the run) and rows of every length around the vector
width. Padding shorter than kReadThroughBytes between or after runs is read
(and discarded) by the elementwise loops, longer padding is not: L = 3600
has float32 rows with each (a suffix of 1200 positions, a middle of 900),
float64 only the longer kind.
"""
import pytest
import torch

import masknorm

LENGTHS = (1, 7, 8, 9, 17, 63, 64, 65, 200, 3600)


def masks(L, generator):
    """(name, (4, L) mask) pairs: suffix, prefix and middle padding, holes one
    position wide, fragmented rows (lane-mask path), all-valid and all-padded rows."""
    pos = torch.arange(L)
    rows = {
        "suffix": pos >= max(1, L * 2 // 3),
        "prefix": pos < L // 3,
        "middle": (pos >= L // 4) & (pos < max(L // 4 + 1, L // 2)),
        "holes": (pos % 5 == 3),
        "alternating": pos % 2 == 1,
        "random": torch.rand(L, generator=generator) < 0.4,
        "none": torch.zeros(L, dtype=torch.bool),
        "all": torch.ones(L, dtype=torch.bool),
    }
    names = list(rows)
    # Each mask mixes row kinds, so that one call takes both paths.
    return [(f"{a}+{b}", torch.stack([rows[a], rows[b], rows["none"], rows[a] | rows[b]]))
            for a, b in zip(names, names[1:] + names[:1])]


def nan_padded(x, mask):
    return x.masked_fill(mask[:, None, :], float("nan"))


def native_and_generic(fn):
    results = []
    for generic in (False, True):
        masknorm._C._force_generic_kernels(generic)
        try:
            results.append(fn())
        finally:
            masknorm._C._force_generic_kernels(False)
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", LENGTHS)
def test_batch_norm_stages_agree_with_generic_kernels(L, dtype):
    g = torch.Generator().manual_seed(L)
    ops = torch.ops.masknorm
    C = 3
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for name, mask in masks(L, g):
        x = nan_padded(torch.randn(4, C, L, generator=g, dtype=torch.float64).mul(3).add(5), mask).to(dtype)
        dy = nan_padded(torch.randn(4, C, L, generator=g, dtype=torch.float64), mask).to(dtype)
        opmath = torch.float64 if dtype == torch.float64 else torch.float32
        weight = torch.randn(C, generator=g, dtype=torch.float64).to(opmath)
        bias = torch.randn(C, generator=g, dtype=torch.float64).to(opmath)

        def stages():
            mean, m2, count = ops.batch_norm_stats(x, mask, False)
            invstd = (m2 / count.clamp_min(1) + 1e-5).rsqrt()
            y = ops.batch_norm_elemt(x, mask, weight, bias, mean, invstd, False)
            sum_dy, sum_dy_xhat = ops.batch_norm_backward_reduce(dy, x, mask, mean, invstd, False)
            dx = ops.batch_norm_backward_elemt(dy, x, mask, weight, mean, invstd, sum_dy, sum_dy_xhat, count, False)
            dx_given = ops.batch_norm_backward_elemt(dy, x, mask, weight, mean, invstd, None, None, None, False)
            return mean, m2, count, y, sum_dy, sum_dy_xhat, dx, dx_given

        native, generic = native_and_generic(stages)
        for what, a, b in zip(("mean", "m2", "count", "y", "sum_dy", "sum_dy_xhat", "dx", "dx_given"), native, generic):
            msg = f"{name}, L={L}, {dtype}: {what}"
            assert not a.isnan().any(), msg
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * L, msg=msg)
        for t in native[3], native[6], native[7]:  # padded positions: exact zeros
            assert (t.float().masked_select(mask[:, None, :].expand_as(t)) == 0).all(), name


@pytest.mark.parametrize("L", [5, 32, 4096, 5000])
def test_gradient_sums_over_chunks_of_rows_agree_with_generic_kernels(L):
    """The channels-first gradient sums take one channel's short rows in
    chunks of about 4096 positions (N = 300 rows of 32: three chunks, the
    last partial) and long rows one by one; the result must not depend on
    the chunking or the thread count."""
    g = torch.Generator().manual_seed(L)
    N, C = (300, 3) if L < 1000 else (5, 2)
    x = torch.randn(N, C, L, generator=g, dtype=torch.float64).mul(3).add(5)
    dy = torch.randn(N, C, L, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, L + 1, (N,), generator=g)
    mask = masknorm.padding_mask_from_lengths(lengths, L)
    x, dy = nan_padded(x, mask).float(), nan_padded(dy, mask).float()
    mean = torch.randn(C, generator=g)
    invstd = torch.rand(C, generator=g) + 0.5
    sums = lambda: torch.ops.masknorm.batch_norm_backward_reduce(dy, x, mask, mean, invstd, False)
    native, generic = native_and_generic(sums)
    for a, b in zip(native, generic):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = sums()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(native, one_thread))


@pytest.mark.parametrize("L", LENGTHS)
def test_group_norm_agrees_with_generic_kernels(L):
    g = torch.Generator().manual_seed(L)
    for name, mask in masks(L, g):
        # InstanceNorm's rule: a sample with exactly one valid position raises on the CPU.
        if ((~mask).sum(1) == 1).any():
            continue
        x = nan_padded(torch.randn(4, 6, L, generator=g, dtype=torch.float64), mask).requires_grad_()
        weight = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
        dy = torch.randn(4, 6, L, generator=g, dtype=torch.float64)

        def run():
            y = masknorm.functional.group_norm(x, 3, weight, bias, padding_mask=mask)
            return (y, *torch.autograd.grad(y, (x, weight, bias), dy))

        native, generic = native_and_generic(run)
        for a, b in zip(native, generic):
            assert not a.isnan().any(), name
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"{name}, L={L}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [9, 65, 200])
def test_group_norm_block_loops_agree_bitwise_with_whole_batch_loops(L, dtype):
    """Channels-first group norm runs its (sample, group) blocks one at a
    time, reduction then elementwise loop, when there are blocks enough for
    the threads (N * groups >= 2 per thread), else the whole batch stage by
    stage. Both sum the same rows in the same order, so they must agree bit
    for bit: 3 blocks take the first way on one thread, the second on two."""
    g = torch.Generator().manual_seed(L)
    for name, mask in masks(L, g):
        mask = mask[:3]
        if ((~mask).sum(1) == 1).any():
            continue
        x = nan_padded(torch.randn(3, 6, L, generator=g, dtype=torch.float64), mask).to(dtype).requires_grad_()
        weight = torch.randn(6, generator=g, requires_grad=True)
        bias = torch.randn(6, generator=g, requires_grad=True)
        dy = torch.randn(3, 6, L, generator=g).to(dtype)

        def run(threads):
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                y = masknorm.functional.group_norm(x, 1, weight, bias, padding_mask=mask)
                return (y, *torch.autograd.grad(y, (x, weight, bias), dy))
            finally:
                torch.set_num_threads(before)

        by_blocks, whole_batch = run(1), run(2)
        for a, b in zip(by_blocks, whole_batch):
            assert not a.isnan().any(), name
            assert torch.equal(a, b), f"{name}, L={L}"


@pytest.mark.parametrize("dtype,L", [(torch.float32, 2048), (torch.float32, 2051), (torch.bfloat16, 4099)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_of_8_mib_and_more_agree_with_generic_kernels(dtype, L, channels_last):
    """Outputs this large are written with streaming stores (kStreamingBytes),
    from aligned and unaligned row starts; padded positions exact zeros."""
    g = torch.Generator().manual_seed(L)
    N, C = 16, 64
    lengths = torch.randint(L // 3, L + 1, (N,), generator=g)
    mask = masknorm.padding_mask_from_lengths(lengths, L)
    x = torch.randn(N, C, L, generator=g).to(dtype)
    if channels_last:
        x = x.transpose(1, 2).contiguous()
    assert x.numel() * x.element_size() >= 8 << 20
    x.masked_fill_((mask[:, :, None] if channels_last else mask[:, None, :]), float("nan"))
    x.requires_grad_()
    dy = torch.randn(x.shape, generator=g).to(dtype)

    def run():
        m = masknorm.MaskedBatchNorm1d(C, channels_last=channels_last, dtype=dtype)
        y = m(x, mask)
        (dx,) = torch.autograd.grad(y, x, dy)
        return y, dx

    native, generic = native_and_generic(run)
    pad = (mask[:, :, None] if channels_last else mask[:, None, :]).expand(x.shape)
    for a, b in zip(native, generic):
        assert (a.masked_select(pad) == 0).all()
        torch.testing.assert_close(a, b, rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-3)


@pytest.mark.parametrize("C", [1024, 1027])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_row_norm_outputs_of_8_mib_and_more_agree_with_generic_kernels(norm, C):
    """Layer and RMS norm outputs and input gradients this large are written
    with streaming stores, from aligned (C = 1024) and unaligned row starts;
    padded rows exact zeros."""
    g = torch.Generator().manual_seed(C)
    N, L = 8, 260
    lengths = torch.randint(L // 3, L + 1, (N,), generator=g)
    mask = masknorm.padding_mask_from_lengths(lengths, L)
    x = torch.randn(N, L, C, generator=g)
    assert x.numel() * x.element_size() >= 8 << 20
    x.masked_fill_(mask[:, :, None], float("nan"))
    x.requires_grad_()
    dy = torch.randn(x.shape, generator=g)

    def run():
        m = masknorm.MaskedLayerNorm(C) if norm == "layer" else masknorm.MaskedRMSNorm(C)
        y = m(x, mask)
        (dx,) = torch.autograd.grad(y, x, dy)
        return y, dx

    native, generic = native_and_generic(run)
    pad = mask[:, :, None].expand(x.shape)
    for a, b in zip(native, generic):
        assert (a.masked_select(pad) == 0).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
