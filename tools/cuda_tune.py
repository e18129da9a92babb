"""Tuning the CUDA kernels on the GPU at hand (run on a CUDA machine; nothing
to run in CI).

    python tools/cuda_tune.py            # row-norm launch shapes, and BN kernel times

1. Row norms: times the layer_norm / rms_norm forward and backward ops (the
   kernels alone, no autograd) for each launch shape of
   masknorm._C._cuda_row_norm_tuning (vectors per thread, threads per block)
   on bf16 and fp32 rows of 1024 and 4096 values, as % of torch.clone's
   bandwidth (forward 2 passes, backward 3), and prints the best shape.
2. Batch norm: the time of each CUDA kernel of a training forward and
   backward (torch.profiler), to see which stage costs what.
Times: torch.utils.benchmark medians; the CUDA caching allocator.
"""
import itertools

import torch
import torch.utils.benchmark as benchmark
from torch.profiler import ProfilerActivity, profile

import masknorm

ops = torch.ops.masknorm


def median_ms(fn):
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median * 1e3


def row_norms():
    shapes = [((32768, 1024), torch.bfloat16), ((16384, 4096), torch.bfloat16), ((32768, 1024), torch.float32)]
    configs = list(itertools.product((1, 2, 4), (128, 256, 512)))
    print("| shape | norm | pass | " + " | ".join(f"i{i} b{b}" for i, b in configs) + " | best |")
    print("|---|---|---|" + "---:|" * len(configs) + "---|")
    for (rows, D), dtype in shapes:
        x = torch.randn(rows, D, device="cuda", dtype=dtype)
        dy = torch.randn_like(x)
        w = torch.rand(D, device="cuda", dtype=dtype)
        b = torch.randn(D, device="cuda", dtype=dtype)
        clone_ms = median_ms(lambda: torch.clone(x))
        for norm in ("layer_norm", "rms_norm"):
            if norm == "layer_norm":
                fwd = lambda: ops.layer_norm(x, [D], None, w, b, 1e-5)
                _, mean, rstd = fwd()
                bwd = lambda: ops.layer_norm_backward(dy, x, [D], None, mean, rstd, w, [True, True, True])
            else:
                fwd = lambda: ops.rms_norm(x, [D], None, w, 1e-5)
                _, rstd = fwd()
                bwd = lambda: ops.rms_norm_backward(dy, x, [D], None, rstd, w, [True, True])
            for backward, fn, passes in ((False, fwd, 2), (True, bwd, 3)):
                cells = []
                for iters, block in configs:
                    masknorm._C._cuda_row_norm_tuning(backward, iters, block)
                    cells.append(100 * passes / 2 * clone_ms / median_ms(fn))
                best = configs[max(range(len(configs)), key=cells.__getitem__)]
                masknorm._C._cuda_row_norm_tuning(backward, 2, 256)
                print(f"| {rows}x{D} {str(dtype)[6:]} | {norm} | {'bwd' if backward else 'fwd'} | "
                      + " | ".join(f"{c:.0f}%" for c in cells) + f" | i{best[0]} b{best[1]} |")


def batch_norm_kernels():
    for shape, cl, dtype in (((32, 1024, 1024), True, torch.bfloat16), ((32, 1024, 1024), False, torch.bfloat16),
                             ((262144, 512), False, torch.float32)):
        x = torch.randn(shape, device="cuda", dtype=dtype)
        mask = (torch.rand(shape[0], shape[1], device="cuda") < 0.3) if len(shape) == 3 else None
        dy = torch.randn_like(x)
        C = shape[-1] if cl or len(shape) == 2 else shape[1]
        w = torch.rand(C, device="cuda")
        rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")

        def step():
            y, mean, invstd = ops.batch_norm(x, mask, w, None, rm, rv, None, True, 0.1, 1e-5, cl)
            ops.batch_norm_backward(dy, x, mask, w, mean, invstd, True, cl, [True, True, True])

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(f"\nbatch norm {tuple(shape)} {'NLC' if cl else 'NC' if len(shape) == 2 else 'NCL'} {dtype}, "
              f"clone {median_ms(lambda: torch.clone(x)):.3f} ms; per step:")
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:10]:
            print(f"  {e.device_time_total / 10 / 1e3:8.3f} ms  {e.count // 10:3d}x  {e.key[:110]}")


if __name__ == "__main__":
    assert masknorm._C._kernels_for("cuda") == "cuda", "needs masknorm built with its CUDA kernels"
    row_norms()
    batch_norm_kernels()
