"""What syncing costs: MaskedSyncBatchNorm against MaskedBatchNorm1d, forward+backward
in training mode, on gloo ranks of this machine.

    python -m benchmarks.sync_overhead            # 2 ranks, 1 thread each, two shapes
    python -m benchmarks.sync_overhead --quick    # tiny shape, few repetitions: checks the script runs

Each rank runs the same (N, L, C) channels-last float32 batch with 30% padding
(the per-rank batch). Both modules run on every rank at the same time, so
they see the same CPU contention; MaskedBatchNorm1d normalizes each rank's
batch alone, MaskedSyncBatchNorm the union of the ranks' batches (one
all_gather in forward, one all_reduce in backward). Timing: torch.utils.benchmark
``Timer.timeit`` with the same number of calls on every rank (adaptive
``blocked_autorange`` would let the ranks disagree on how many collectives to
run), ranks aligned by a barrier before each measurement; the reported time of
a repetition is the slowest rank's mean, and the table gives the median over
repetitions (the four measurements interleaved in each; the overhead is the
median of the per-repetition differences). "collectives alone" times the two collectives with nothing
else, on tensors of the sizes the module sends, and "MaskedBatchNorm1d then
the collectives" the unsynced step followed by them: what any implementation
sending the same two messages would cost, with the ranks' compute in between. The number of collectives of
one step is counted too (c10d ops seen by a dispatch mode).

glibc is told to keep freed memory (as benchmarks/run.py does, see there),
unless --system-malloc.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.utils.benchmark as benchmark
from torch.utils._python_dispatch import TorchDispatchMode

import masknorm

CACHING_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**40)}
SHAPES = ((32, 256, 512), (8, 64, 256))  # (N, L, C) per rank
QUICK_SHAPES = ((4, 16, 32),)


class _CountCollectives(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _batch(shape: Sequence[int], rank: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, L, C = shape
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(N, L, C, generator=g).requires_grad_()
    lengths = (L * (0.4 + 0.6 * torch.rand(N, generator=g))).long().clamp(1, L)  # ~30% padding
    mask = torch.arange(L) >= lengths.unsqueeze(1)
    return x, mask, torch.randn(N, L, C, generator=g)


def _fwd_bwd(bn: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor) -> Callable[[], Any]:
    inputs = (x, bn.weight, bn.bias)
    return lambda: torch.autograd.grad(bn(x, mask), inputs, grad)


def _seconds(fns: Dict[str, Callable[[], Any]], number: int, repeats: int) -> Dict[str, List[float]]:
    """For each repetition and function (interleaved, so that load changes hit
    all alike): the slowest rank's mean seconds per call."""
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
              for name, fn in fns.items()}
    out: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, timer in timers.items():
            dist.barrier()
            mean = torch.tensor([timer.timeit(number).mean], dtype=torch.float64)
            dist.all_reduce(mean, dist.ReduceOp.MAX)
            out[name].append(float(mean))
    return out


def _rank_main(rank: int, world_size: int, port: int, shapes: Sequence[Sequence[int]], number: int,
               repeats: int, results: Dict[str, Any]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    rows = []
    for shape in shapes:
        C = shape[2]
        x, mask, grad = _batch(shape, rank)
        plain = masknorm.MaskedBatchNorm1d(C, channels_last=True)
        synced = masknorm.MaskedSyncBatchNorm(C, channels_last=True)
        run_plain, run_synced = _fwd_bwd(plain, x, mask, grad), _fwd_bwd(synced, x, mask, grad)
        run_synced()  # first call: the one-time num_features check
        with _CountCollectives() as counter:
            run_synced()
        stats = torch.zeros(2 * C + 1)
        sums = torch.zeros(2 * C)
        gathered = [torch.empty_like(stats) for _ in range(world_size)]

        def collectives_alone() -> None:
            dist.all_gather(gathered, stats)
            dist.all_reduce(sums)

        def plain_then_collectives() -> None:
            run_plain()
            collectives_alone()

        times = _seconds({"plain": run_plain, "synced": run_synced, "wire": collectives_alone,
                          "plain+wire": plain_then_collectives}, number, repeats)
        overhead = [s - p for s, p in zip(times["synced"], times["plain"])]
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({
            "shape": list(shape), "valid_fraction": float((~mask).float().mean()),
            "plain_ms": med["plain"] * 1e3, "synced_ms": med["synced"] * 1e3,
            "overhead_ms": statistics.median(overhead) * 1e3,
            "overhead_pct": 100 * statistics.median(overhead) / med["plain"],
            "collectives_alone_ms": med["wire"] * 1e3,
            "plain_then_collectives_ms": med["plain+wire"] * 1e3,
            "plain_ms_all": [t * 1e3 for t in times["plain"]], "synced_ms_all": [t * 1e3 for t in times["synced"]],
            "collectives_per_step": counter.ops,
        })
    if rank == 0:
        results["rows"] = rows
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """Runs the benchmark, prints a table; returns its rows."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sync_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--number", type=int, default=50, help="calls per repetition")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="tiny shape, few calls")
    parser.add_argument("--system-malloc", action="store_true", help="glibc's default malloc settings")
    args = parser.parse_args(list(argv))
    shapes = QUICK_SHAPES if args.quick else SHAPES
    number, repeats = (5, 3) if args.quick else (args.number, args.repeats)
    if not args.system_malloc:
        os.environ.update(CACHING_MALLOC_ENV)  # read by the spawned ranks' glibc at startup
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_rank_main, args=(args.world_size, _free_port(), shapes, number, repeats, results),
                           nprocs=args.world_size, start_method="spawn")
        rows = list(results["rows"])
    print(f"torch {torch.__version__}, {args.world_size} gloo ranks x 1 thread, {os.cpu_count()} CPUs; "
          f"channels-last float32, forward+backward (input, weight, bias gradients); "
          f"{repeats} repetitions x {number} calls, median")
    print("| per-rank shape (N, L, C) | valid | MaskedBatchNorm1d ms | MaskedSyncBatchNorm ms | overhead ms "
          "| overhead % | collectives alone ms | MaskedBatchNorm1d then the collectives ms | collectives per step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {tuple(r['shape'])} | {100 * r['valid_fraction']:.0f}% | {r['plain_ms']:.3f} | {r['synced_ms']:.3f} "
              f"| {r['overhead_ms']:.3f} | {r['overhead_pct']:.1f}% | {r['collectives_alone_ms']:.3f} "
              f"| {r['plain_then_collectives_ms']:.3f} "
              f"| {', '.join(r['collectives_per_step'])} |")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
