"""Where the microseconds of one call go, on small tensors: masknorm's and
stock torch's layers timed one under the other, so that each difference
is one layer's cost (Python module, functional wrapper, op through the
dispatcher with and without autograd, checks and the kernel alone, and
the second thread's fork and join).

    python -m benchmarks.per_call            # (8, 32, 256), 30% padding
    python -m benchmarks.per_call --shape 64 64 256

Times are medians of torch.utils.benchmark's blocked_autorange (us).
"""
import argparse

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark
from torch import nn

import masknorm
import masknorm.functional as MF


def us(fn, threads, min_run_time):
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return 1e6 * timer.blocked_autorange(min_run_time=min_run_time).median


def layer_norm_rows(x, mask, C):
    """(name, training step or None, inference call) per layer."""
    m, s = masknorm.MaskedLayerNorm(C), nn.LayerNorm(C)
    w, b = m.weight, m.bias
    xg = x.detach().requires_grad_()
    dy = torch.randn_like(x)
    ops = torch.ops.masknorm

    def step(forward, params):
        return lambda: torch.autograd.grad(forward(), [xg, *params], dy)

    return [
        ("masknorm: module", step(lambda: m(xg, mask), [w, b]), lambda: m(x, mask)),
        ("masknorm: functional", step(lambda: MF.layer_norm(xg, (C,), w, b, padding_mask=mask), [w, b]),
         lambda: MF.layer_norm(x, (C,), w, b, padding_mask=mask)),
        ("masknorm: op", step(lambda: ops.layer_norm(xg, [C], mask, w, b, 1e-5)[0], [w, b]),
         lambda: ops.layer_norm(x, [C], mask, w, b, 1e-5)),
        ("stock: module", step(lambda: s(xg), [s.weight, s.bias]), lambda: s(x)),
        ("stock: functional", step(lambda: F.layer_norm(xg, (C,), s.weight, s.bias), [s.weight, s.bias]),
         lambda: F.layer_norm(x, (C,), s.weight, s.bias)),
    ]


def batch_norm_rows(x, mask, C):
    """(N, C, L) batch norm: training step and eval-mode inference per layer."""
    m, s = masknorm.MaskedBatchNorm1d(C), nn.BatchNorm1d(C)
    me, se = masknorm.MaskedBatchNorm1d(C).eval(), nn.BatchNorm1d(C).eval()
    xg = x.detach().requires_grad_()
    dy = torch.randn_like(x)
    ops = torch.ops.masknorm
    rm, rv = me.running_mean, me.running_var
    w, b = me.weight.detach(), me.bias.detach()
    invstd = (rv + me.eps).rsqrt()

    def step(forward, params):
        return lambda: torch.autograd.grad(forward(), [xg, *params], dy)

    return [
        ("masknorm: module", step(lambda: m(xg, mask), [m.weight, m.bias]), lambda: me(x, mask)),
        ("masknorm: op", step(lambda: ops.batch_norm(xg, mask, m.weight, m.bias, m.running_mean, m.running_var,
                                                      None, True, 0.1, 1e-5, False)[0], [m.weight, m.bias]),
         lambda: ops.batch_norm(x, mask, w, b, rm, rv, None, False, 0.1, 1e-5, False)),
        ("masknorm: elementwise op alone", None, lambda: ops.batch_norm_elemt(x, mask, w, b, rm, invstd, False)),
        ("stock: module", step(lambda: s(xg), [s.weight, s.bias]), lambda: se(x)),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.per_call", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(8, 32, 256), metavar=("N", "L", "C"))
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args(argv)
    N, L, C = args.shape
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(1, int(0.4 * L)), L + 1, (N,), generator=g)
    mask = masknorm.padding_mask_from_lengths(lengths, L)
    threads = torch.get_num_threads()
    for title, rows, x in (
        (f"LayerNorm, (N, L, C) = {(N, L, C)}", layer_norm_rows, torch.randn(N, L, C, generator=g)),
        (f"BatchNorm1d, (N, C, L) = {(N, C, L)}", batch_norm_rows, torch.randn(N, C, L, generator=g)),
    ):
        print(f"\n{title}, 30% padding; us per call (median)\n")
        print(f"| layer | training step, {threads} threads | inference, {threads} threads | inference, 1 thread |")
        print("|---|---:|---:|---:|")
        for name, step, infer in rows(x, mask, C):
            cells = [f"{us(step, threads, args.min_run_time):.1f}" if step else ""]
            with torch.inference_mode():
                cells += [f"{us(infer, threads, args.min_run_time):.1f}", f"{us(infer, 1, args.min_run_time):.1f}"]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
