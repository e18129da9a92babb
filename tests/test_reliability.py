"""Leaks, threads and determinism:

* memory stays flat over 10,000 forward+backward calls of the three norms
  (with the stage ops and double backward in between): resident set size and
  glibc's heap in use, measured, with bounds;
* calls from several Python threads at once give bitwise the results of the
  same calls made one after another;
* results are bitwise the same run to run for a given thread count (1 to 4
  threads, and in a fresh process), and the statistics equal a float64
  reference at every thread count (1 to 16: each thread's chunks, and the
  threads' partial moments, merged).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import os
import subprocess
import sys
from typing import Callable, Dict, List

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import masknorm  # noqa: E402
from samples.common import lengths_mask  # noqa: E402

pytestmark = pytest.mark.slow  # 10,000-call leak checks, threads, processes

ops = torch.ops.masknorm


# ---------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> int:
    """Bytes of glibc's heap in use (mallinfo2: small blocks plus mmapped ones)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def _small_workload() -> List[Callable[[], None]]:
    """Forward+backward calls of every norm on small tensors (and, among
    them, the stage ops and a double backward)."""
    torch.manual_seed(0)
    mask = lengths_mask([8, 5, 3, 8], 8)
    x = torch.randn(4, 8, 16)
    bn_nlc = masknorm.MaskedBatchNorm1d(16, channels_last=True)
    bn_ncl = masknorm.MaskedBatchNorm1d(16)
    ln, rms = masknorm.MaskedLayerNorm(16), masknorm.MaskedRMSNorm(16)

    def fwd_bwd(module, t):
        def call():
            xi = t.clone().requires_grad_(True)
            module(xi, mask).sum().backward()
        return call

    def stages():
        mean, m2, count = ops.batch_norm_stats(x, mask, True)
        mean, invstd, count = ops.batch_norm_merge_stats(mean[None], m2[None], count[None], None, None, None, 0.1,
                                                         1e-5)
        ops.batch_norm_elemt(x, mask, None, None, mean, invstd, True)
        g = torch.ones_like(x)
        sum_dy, sum_dy_xhat = ops.batch_norm_backward_reduce(g, x, mask, mean, invstd, True)
        ops.batch_norm_backward_elemt(g, x, mask, None, mean, invstd, sum_dy, sum_dy_xhat, count, True)

    def double_backward():
        xi = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(ln(xi, mask).pow(2).sum(), xi, create_graph=True)
        gx.sum().backward()

    calls = [fwd_bwd(bn_nlc, x), fwd_bwd(bn_ncl, x.transpose(1, 2)), fwd_bwd(ln, x), fwd_bwd(rms, x)]
    return calls * 12 + [stages, double_backward]  # 50 calls, 48 of them forward+backward


def _under_address_sanitizer() -> bool:
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


# Under AddressSanitizer (docs/reliability.md: the suite with the runtime
# preloaded) malloc is ASan's, so glibc's counters read nothing, and freed
# memory waits in ASan's quarantine (up to 256 MB), which RSS counts.
@pytest.mark.skipif(_under_address_sanitizer(), reason="ASan's allocator and quarantine: RSS and glibc's heap mean nothing")
def test_memory_stays_flat_over_10000_calls():
    """10,000 forward+backward calls (plus stage ops and double backward every
    50th) after 1,000 to warm up: measured growth 44 KB of RSS and none of
    glibc's heap; a leak of one small tensor per call (a few hundred bytes)
    would add megabytes."""
    calls = _small_workload()
    for i in range(1000):
        calls[i % len(calls)]()
    rss0, heap0 = rss_bytes(), heap_in_use()
    for i in range(10_000):
        calls[i % len(calls)]()
    rss_growth, heap_growth = rss_bytes() - rss0, heap_in_use() - heap0
    assert heap_growth < 256 * 1024, f"glibc heap grew by {heap_growth / 1024:.0f} KB over 10,000 calls"
    assert rss_growth < 2 * 1024 * 1024, f"RSS grew by {rss_growth / 1024:.0f} KB over 10,000 calls"


# ---------------------------------------------------------------------------
# threads and determinism
# ---------------------------------------------------------------------------


def _workload() -> Dict[str, Callable[[], List[torch.Tensor]]]:
    """Calls large enough for several parallel tasks and several 64-row
    chunks per task (CPU kernels' per-thread buffers and merges), every norm,
    forward and backward, float32 and bfloat16. Each returns its results."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[1]
        x = (torch.randn(8, 256, 96, generator=gen) * 2 + 3).to(dtype)
        g = torch.randn(8, 256, 96, generator=gen).to(dtype)
        mask = lengths_mask(torch.randint(100, 257, (8,), generator=gen).tolist(), 256)
        w, b = torch.rand(96, generator=gen) + 0.5, torch.randn(96, generator=gen)

        def bn(x=x, g=g, mask=mask, w=w, b=b, cl=True):
            rm, rv = torch.zeros(96), torch.ones(96)
            xt = x if cl else x.transpose(1, 2).contiguous()
            gt = g if cl else g.transpose(1, 2).contiguous()
            y, mean, invstd = ops.batch_norm(xt, mask, w.to(x.dtype), b.to(x.dtype), rm, rv, None, True, 0.1, 1e-5,
                                             cl)
            grads = ops.batch_norm_backward(gt, xt, mask, w.to(x.dtype), mean, invstd, True, cl, [True, True, True])
            return [y, mean, invstd, rm, rv, *grads]

        def ln(x=x, g=g, mask=mask, w=w, b=b):
            y, mean, rstd = ops.layer_norm(x, [96], mask, w, b, 1e-5)
            return [y, mean, rstd, *ops.layer_norm_backward(g, x, [96], mask, mean, rstd, w, [True, True, True])]

        def rms(x=x, g=g, mask=mask, w=w):
            y, rstd = ops.rms_norm(x, [96], mask, w, None)
            return [y, rstd, *ops.rms_norm_backward(g, x, [96], mask, rstd, w, [True, True])]

        out[f"bn-NLC-{name}"] = bn
        out[f"bn-NCL-{name}"] = lambda bn=bn: bn(cl=False)
        out[f"ln-{name}"] = ln
        out[f"rms-{name}"] = rms
    return out


def _digest(results: Dict[str, List[torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name in sorted(results):
        for t in results[name]:
            h.update(name.encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t is not None else b"none")
    return h.hexdigest()


def _run(workload) -> Dict[str, List[torch.Tensor]]:
    return {name: fn() for name, fn in workload.items()}


def _assert_bitwise_equal(a, b, what):
    assert a.keys() == b.keys()
    for name in a:
        for i, (x, y) in enumerate(zip(a[name], b[name])):
            assert torch.equal(x.view(torch.uint8) if x.is_floating_point() else x,
                               y.view(torch.uint8) if y.is_floating_point() else y), f"{what}: {name} output {i}"


@pytest.fixture
def threads():
    """Sets torch's thread count for a test, and restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_python_threads_give_serial_results(threads):
    """Four Python threads calling every op at once (each its own order, three
    rounds) get bitwise the results of serial calls."""
    threads(2)
    workload = _workload()
    serial = _run(workload)
    names = list(workload)

    def worker(k):
        torch.set_num_threads(2)  # a Python thread has its own OpenMP settings
        got = {}
        for _ in range(3):
            for name in names[k:] + names[:k]:
                got[name] = workload[name]()
        return got

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(worker, range(4)))
    for k, got in enumerate(results):
        _assert_bitwise_equal(got, serial, f"thread {k}")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_bitwise_deterministic_for_a_thread_count(n, threads):
    threads(n)
    workload = _workload()
    first = _run(workload)
    _assert_bitwise_equal(_run(workload), first, f"{n} threads, second run")


CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(2)
import test_reliability as t
print(t._digest(t._run(t._workload())))
"""


def test_bitwise_deterministic_across_processes(threads):
    threads(2)
    here = _digest(_run(_workload()))
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", CHILD, tests_dir], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1] == here


@pytest.mark.parametrize("layout", ["NC", "NLC", "NCL"])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 16])
def test_statistics_exact_at_every_thread_count(n, layout, threads):
    """Rows whose mean drifts (each 64-row chunk has its own mean): the merged
    mean and M2 equal float64 statistics at every thread count. Dropping the
    between-chunk (or between-thread) term of Chan's merge (channels first), or
    the shift's correction of M2 (channels last), is off by far more than the
    tolerance, however the rows are split."""
    threads(n)
    gen = torch.Generator().manual_seed(n)
    rows, C = 20_000, 5
    drift = torch.linspace(-50, 50, rows, dtype=torch.float64)[:, None]
    x64 = drift + torch.randn(rows, C, generator=gen, dtype=torch.float64)
    mask = torch.rand(rows, generator=gen) < 0.25
    if layout == "NC":
        x, m, cl = x64.float(), mask, False
    elif layout == "NLC":
        x, m, cl = x64.float().view(40, 500, C), mask.view(40, 500), True
    else:
        x, m, cl = x64.float().view(40, 500, C).transpose(1, 2).contiguous(), mask.view(40, 500), False
    mean, m2, count = ops.batch_norm_stats(x, m, cl)
    packed = x64.float().double()[~mask]
    assert int(count) == packed.shape[0]
    torch.testing.assert_close(mean.double(), packed.mean(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(m2.double(), ((packed - packed.mean(0)) ** 2).sum(0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", ["NC", "NLC"])
@pytest.mark.parametrize("n", [1, 2])
def test_statistics_when_the_first_rows_are_off(n, layout, threads):
    """Channels-last statistics sum deviations from the mean of the first 64
    rows from the first valid one. Here those rows sit 100 standard deviations
    from the rest (a batch sorted by some feature), so that the shift would
    cancel about 8 bits of M2 in float: the second pass, from the mean the first
    gives, keeps M2 as exact as float64 statistics of the same values."""
    threads(n)
    gen = torch.Generator().manual_seed(7)
    rows, C = 20_000, 5
    x64 = 1e4 + torch.randn(rows, C, generator=gen, dtype=torch.float64)
    x64[:70] += 100
    mask = torch.rand(rows, generator=gen) < 0.25
    mask[:3] = True  # the first valid row is not row 0
    x = x64.float()
    if layout == "NC":
        mean, m2, count = ops.batch_norm_stats(x, mask, False)
    else:
        mean, m2, count = ops.batch_norm_stats(x.view(40, 500, C), mask.view(40, 500), True)
    packed = x.double()[~mask]
    assert int(count) == packed.shape[0]
    torch.testing.assert_close(mean.double(), packed.mean(0), rtol=1e-7, atol=0)  # float rounding
    torch.testing.assert_close(m2.double(), ((packed - packed.mean(0)) ** 2).sum(0), rtol=1e-6, atol=0)


if __name__ == "__main__":
    print(_digest(_run(_workload())))
