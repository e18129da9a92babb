"""masknorm benchmark: masked norms against what users would run instead.

    python -m benchmarks                 # full run, ~10 min on 2 cores; writes masknorm_results/benchmarks/
    python -m benchmarks --quick         # tiny shapes, no torch.compile: checks the script runs
    python -m benchmarks --out benchmarks/results   # rewrites the committed results

Needs matplotlib and tqdm: pip install --no-build-isolation ".[bench]".

For each shape and norm (cases.py), every implementation is timed with
torch.utils.benchmark (median of blocked_autorange) in three modes:
  fwd       forward in training mode, autograd graph recorded
  bwd       backward alone (torch.autograd.grad of a recorded forward, retain_graph)
  fwd+bwd   both
on the threads torch uses by default.

Minimum-traffic model. A norm must at least read its input and write its
output (forward: 2 passes over the tensor), and read input and incoming
gradient and write the input gradient (backward: 3 passes); statistics are
noise beside that. Only valid tokens are useful bytes: padding need not be
touched. Effective GB/s = passes * valid elements * element size / time, and
"% copy" compares it with the machine's copy bandwidth, measured as
torch.clone of the same whole tensor (read + write, all threads).

Allocator. Every implementation allocates its outputs and gradients on each
call. glibc returns large blocks (above 32 MB at most) to the OS on free, so
without help each call would pay the OS's page faults for them, a cost of the
system allocator rather than of any kernel, and a noisy one. The benchmark
therefore re-runs itself with glibc told to keep freed memory
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), as a caching allocator
(jemalloc, tcmalloc) would; --system-malloc measures with the defaults.

Memory. "saved MB" is what forward keeps for backward beyond the input itself
(saved_tensors_hooks, unique storages); "peak MB" is the peak of bytes
allocated during forward+backward (torch.profiler memory events) above what
existed before.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import sys

import torch
import torch.utils.benchmark as benchmark

import masknorm
from masknorm import _extras

from . import cases

PASSES = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}
# glibc: serve every size from the heap and never give freed memory back (see "Allocator").
CACHING_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", str(2**32), "MALLOC_TRIM_THRESHOLD_", str(2**40))
MODES = tuple(PASSES)


def median_seconds(fn, min_run_time):
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(x, min_run_time):
    """Bytes per second of torch.clone(x): the machine's read+write limit for this tensor."""
    seconds = median_seconds(lambda: torch.clone(x), min_run_time)
    return 2 * x.numel() * x.element_size() / seconds


def saved_bytes(forward, xin):
    """Bytes forward saves for backward, beyond the input's own storage."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(xin)
    storages.pop(xin.untyped_storage().data_ptr(), None)
    return sum(storages.values())


@contextlib.contextmanager
def stderr_silenced():
    """Mutes file descriptor 2: the profiler's C++ side logs each start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn):
    """Peak of bytes allocated while fn runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def run_case(norm, impl, x, mask, min_run_time):
    C = x.shape[-1] if norm != "bn-ncl" else x.shape[1]
    forward, params = cases.make(norm, impl, x, mask, C)
    xin = x.detach().clone().requires_grad_(True)
    inputs = [xin] + [p for p in params if p.requires_grad]
    grad = torch.randn_like(forward(xin))  # also compiles compiled variants

    def fwd():
        return forward(xin)

    def fwd_bwd():
        return torch.autograd.grad(forward(xin), inputs, grad)

    fwd_bwd()  # warm up (compiles the backward of compiled variants)
    y = forward(xin)
    result = {
        "fwd": median_seconds(fwd, min_run_time),
        "bwd": median_seconds(lambda: torch.autograd.grad(y, inputs, grad, retain_graph=True), min_run_time),
        "fwd+bwd": median_seconds(fwd_bwd, min_run_time),
        "saved_bytes": saved_bytes(forward, xin),
        "peak_bytes": peak_bytes(fwd_bwd),
    }
    return result


def run(shapes, min_run_time, compile_composites, only=None):
    from tqdm import tqdm

    # Timing backward alone replays one recorded graph (retain_graph=True), which
    # compiled backwards refuse while they donate (reuse) their saved buffers.
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False

    jobs = []
    for shape in shapes:
        for norm in shape.norms:
            for impl in cases.implementations(norm, shape.padding > 0, compile_composites):
                if only is None or only in f"{shape.name} {norm} {impl}":
                    jobs.append((shape, norm, impl))
    results, copy_bw, inputs = [], {}, {}
    for shape, norm, impl in tqdm(jobs, desc="benchmark", unit="case"):
        if shape.name not in inputs:
            inputs[shape.name] = cases.make_input(shape)
            copy_bw[shape.name] = copy_bandwidth(inputs[shape.name][0], min_run_time)
        x, mask = inputs[shape.name]
        useful = cases.useful_elements(x, mask) * x.element_size()
        r = run_case(norm, impl, cases.layout_input(norm, x), mask, min_run_time)
        for mode in MODES:
            r[f"{mode}_gbps"] = PASSES[mode] * useful / r[mode] / 1e9
            r[f"{mode}_pct_copy"] = 100 * PASSES[mode] * useful / r[mode] / copy_bw[shape.name]
        results.append({"shape": shape.name, "large": shape.large, "norm": norm, "impl": impl, **r})
    return results, {k: v / 1e9 for k, v in copy_bw.items()}


# ----------------------------------------------------------------- report


def lookup(results, shape, norm, impl):
    for r in results:
        if (r["shape"], r["norm"], r["impl"]) == (shape, norm, impl):
            return r
    return None


def check_bars(results):
    """Each bar of issue 3 on each case it applies to: (bar, case, value, target, met)."""
    bars = []
    for r in results:
        if r["impl"] != "masknorm":
            continue
        shape, norm = r["shape"], r["norm"]
        case = f"{shape}, {cases.NORM_TITLES[norm]}"
        t = r["fwd+bwd"]
        if norm.startswith("bn-"):
            eager = [lookup(results, shape, norm, i) for i in ("masked-sums", "gather")]
            eager = [e["fwd+bwd"] for e in eager if e]
            if eager:
                bars.append(("BN fwd+bwd vs best eager composite", case, min(eager) / t, 3.0, min(eager) / t >= 3.0))
            compiled = lookup(results, shape, norm, "compiled")
            if compiled:
                ratio = compiled["fwd+bwd"] / t
                bars.append(("BN fwd+bwd vs compiled composite", case, ratio, 1.5, ratio >= 1.5))
        stock = lookup(results, shape, norm, "stock")
        if stock and norm != "rms":
            for mode in ("fwd", "fwd+bwd"):
                ratio = stock[mode] / r[mode]
                bars.append((f"{mode} vs stock torch (no slower)", case, ratio, 1.0, ratio >= 1.0))
        if stock:
            ratio = stock["peak_bytes"] / max(r["peak_bytes"], 1)
            bars.append(("peak memory fwd+bwd vs stock (no more)", case, ratio, 1.0, ratio >= 1.0))
        if r["large"]:
            bars.append(("fwd % of copy bandwidth", case, r["fwd_pct_copy"], 70.0, r["fwd_pct_copy"] >= 70))
            bars.append(("bwd % of copy bandwidth", case, r["bwd_pct_copy"], 50.0, r["bwd_pct_copy"] >= 50))
    return bars


def environment():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = masknorm._C.build_info()
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "masknorm": info["version"],
        "masknorm_cpu_kernels": info["cpu_kernels"],
        "allocator": "glibc, freed memory kept" if "MALLOC_MMAP_THRESHOLD_" in os.environ else "glibc defaults",
    }


def summary(results):
    """One row per shape and norm: masknorm's fwd+bwd time and how much faster it is than each alternative."""
    impls = [i for i in ("stock", "masked-sums", "gather", "compiled") if any(r["impl"] == i for r in results)]
    lines = [
        "| shape | norm | masknorm fwd+bwd ms | " + " | ".join(f"vs {i}" for i in impls)
        + " | fwd % copy | bwd % copy | peak MB (stock) |",
        "|---|---|---:|" + "---:|" * len(impls) + "---:|---:|---:|",
    ]
    for r in results:
        if r["impl"] != "masknorm":
            continue
        cells = []
        for impl in impls:
            other = lookup(results, r["shape"], r["norm"], impl)
            cells.append(f"{other['fwd+bwd'] / r['fwd+bwd']:.2f}x" if other else "")
        stock = lookup(results, r["shape"], r["norm"], "stock")
        stock_peak = f" ({stock['peak_bytes'] / 2**20:.0f})" if stock else ""
        lines.append(
            f"| {r['shape']} | {cases.NORM_TITLES[r['norm']]} | {1e3 * r['fwd+bwd']:.2f} | " + " | ".join(cells)
            + f" | {r['fwd_pct_copy']:.0f}% | {r['bwd_pct_copy']:.0f}% | {r['peak_bytes'] / 2**20:.0f}{stock_peak} |"
        )
    return lines


def markdown(results, copy_gbps, bars, env, command):
    lines = [
        "# masknorm benchmark",
        "",
        f"`{command}` on {env['date']}: {env['cpu']}, {env['threads']} threads, torch {env['torch']} "
        f"({env['torch_cpu_capability']}), masknorm {env['masknorm']} ({env['masknorm_cpu_kernels']} kernels), "
        f"allocator: {env.get('allocator', 'glibc defaults')}.",
        "Times are medians (ms). GB/s counts valid tokens only (fwd 2 passes, bwd 3); "
        "% copy is against torch.clone of the same tensor. Speedup: the implementation's fwd+bwd time over masknorm's.",
        "",
        "## Summary",
        "",
        *summary(results),
        "",
    ]
    for shape in dict.fromkeys(r["shape"] for r in results):
        lines += [
            f"## {shape} (copy bandwidth {copy_gbps[shape]:.1f} GB/s)",
            "",
            "| norm | implementation | fwd ms | bwd ms | fwd+bwd ms | fwd GB/s (% copy) | bwd GB/s (% copy) "
            "| masknorm speedup | saved MB | peak MB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in (r for r in results if r["shape"] == shape):
            ours = lookup(results, shape, r["norm"], "masknorm")
            speedup = r["fwd+bwd"] / ours["fwd+bwd"] if ours else float("nan")
            lines.append(
                f"| {cases.NORM_TITLES[r['norm']]} | {r['impl']} | {1e3 * r['fwd']:.3f} | {1e3 * r['bwd']:.3f} "
                f"| {1e3 * r['fwd+bwd']:.3f} | {r['fwd_gbps']:.1f} ({r['fwd_pct_copy']:.0f}%) "
                f"| {r['bwd_gbps']:.1f} ({r['bwd_pct_copy']:.0f}%) | {speedup:.2f}x "
                f"| {r['saved_bytes'] / 2**20:.1f} | {r['peak_bytes'] / 2**20:.1f} |"
            )
        lines.append("")
    met = sum(b[4] for b in bars)
    lines += [
        f"## Bars ({met} of {len(bars)} met)",
        "",
        "| bar | case | value | target | met |",
        "|---|---|---:|---:|:---:|",
    ]
    for bar, case, value, target, ok in bars:
        unit = "%" if "%" in bar else "x"
        lines.append(f"| {bar} | {case} | {value:.2f}{unit} | {target:g}{unit} | {'yes' if ok else '**no**'} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in results))
    impls = list(dict.fromkeys(r["impl"] for r in results))
    fig, axes = plt.subplots(len(shapes), 1, figsize=(10, 3.2 * len(shapes)), squeeze=False)
    for ax, shape in zip(axes[:, 0], shapes):
        norms = list(dict.fromkeys(r["norm"] for r in results if r["shape"] == shape))
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for i, norm in enumerate(norms):
                r = lookup(results, shape, norm, impl)
                if r:
                    xs.append(i + (k - (len(impls) - 1) / 2) * width)
                    ys.append(1e3 * r["fwd+bwd"])
            ax.bar(xs, ys, width, label=impl)
        ax.set_xticks(range(len(norms)), [cases.NORM_TITLES[n] for n in norms])
        ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd ms (log)")
        ax.set_title(shape)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=len(impls), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


DEFAULT_OUT = os.path.join("masknorm_results", "benchmarks")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, no torch.compile (checks the script)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"output folder (default: {DEFAULT_OUT} in the current folder; "
                        "--out benchmarks/results rewrites the committed results)")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile composites")
    parser.add_argument("--only", default=None, help="run the cases whose 'shape norm impl' contains this")
    parser.add_argument("--from-json", default=None, help="write the report of a saved results.json, run nothing")
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's default allocation policy")
    args = parser.parse_args(argv)
    try:
        _extras.require("bench", ["matplotlib"] + ([] if args.from_json else ["tqdm"]), "the benchmark")
    except ModuleNotFoundError as error:
        parser.exit(2, f"{parser.prog}: {error}\n")
    if not args.system_malloc and not args.from_json and CACHING_MALLOC_ENV[0] not in os.environ:
        env = dict(os.environ, **dict(zip(CACHING_MALLOC_ENV[::2], CACHING_MALLOC_ENV[1::2])))
        cmd = [sys.executable, "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)]
        sys.stdout.flush()
        os.execve(sys.executable, cmd, env)  # does not return
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        write_report(saved["results"], saved["copy_gbps"], saved["environment"], saved["command"], args.out)
        return
    shapes = cases.QUICK_SHAPES if args.quick else cases.SHAPES
    min_run_time = args.min_run_time or (0.05 if args.quick else 0.3)
    compile_composites = not (args.quick or args.no_compile)
    command = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])

    results, copy_gbps = run(shapes, min_run_time, compile_composites, args.only)
    write_report(results, copy_gbps, environment(), command, args.out)


def write_report(results, copy_gbps, env, command, out):
    os.makedirs(out, exist_ok=True)
    report = markdown(results, copy_gbps, check_bars(results), env, command)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"environment": env, "command": command, "copy_gbps": copy_gbps, "results": results}, f, indent=1)
    plot(results, os.path.join(out, "results.png"))
    print(report)
    print(f"wrote {out}/results.md, results.json, results.png")


if __name__ == "__main__":
    main()
