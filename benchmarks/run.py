"""masknorm benchmark: masked norms against what users would run instead.

    python -m benchmarks                 # full CPU run under both allocator settings, ~12 min on 2 cores;
                                         # writes masknorm_results/benchmarks/
    python -m benchmarks --quick         # tiny shapes, no torch.compile: checks the script runs
    python -m benchmarks --device cuda   # GPU shapes on the current CUDA device
    python -m benchmarks --out benchmarks/results   # rewrites the committed results

Needs matplotlib and tqdm: pip install --no-build-isolation ".[bench]".

For each shape and norm (cases.py), every implementation is timed with
torch.utils.benchmark in three modes, the implementations and a copy of the
input in turn, three rounds, each time the median of blocked_autorange; the
median of the rounds is reported (time_in_rounds). The modes:
  fwd       forward in training mode, autograd graph recorded
  bwd       backward alone (torch.autograd.grad of a recorded forward, retain_graph)
  fwd+bwd   both
on the threads torch uses by default. Rows marked "eval" time inference
instead: forward alone, modules in eval mode (batch norm normalizes with its
running statistics), under torch.inference_mode, against stock torch on the
same tensor. Rows marked "small" time the per-call cost on small tensors
(training step and inference) against stock torch.

Minimum-traffic model. A norm must at least read its input and write its
output (forward: 2 passes over the tensor), and read input and incoming
gradient and write the input gradient (backward: 3 passes); statistics are
noise beside that. Only valid tokens are useful bytes: padding need not be
touched. Effective GB/s = passes * valid elements * element size / time, and
"% copy" compares it with the machine's copy bandwidth, measured as
torch.clone of the same whole tensor (read + write, all threads). BatchNorm
cannot do with 2 and 3 passes: its statistics must be complete before any
output is written, so forward reads x twice and writes y (3 passes) and
backward reads x and dy twice and writes dx (5); "% copy, BN minimum" counts
those (for LayerNorm and RMSNorm a row fits in cache: 2 and 3 are real).

Allocator (CPU). Every implementation allocates its outputs and gradients on
each call. glibc returns large blocks (above 32 MB at most) to the OS on free,
so each call pays the OS's page faults for them, a cost of the system
allocator rather than of any kernel, and a noisy one. The CPU run therefore
measures twice, in two processes: with glibc's defaults, and with glibc told
to keep freed memory (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), as a
caching allocator (jemalloc, tcmalloc) would; the summary shows both, the
detailed tables the second. --allocator picks one. On CUDA, torch's caching
allocator serves every run.

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
import shutil
import statistics
import subprocess
import sys

import torch
import torch.utils.benchmark as benchmark

import masknorm
from masknorm import _extras

from . import cases

PASSES = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}
BN_MIN_PASSES = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}
# glibc: serve every size from the heap and never give freed memory back (see "Allocator").
CACHING_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**40)}
ALLOCATORS = {"kept": "glibc, freed memory kept", "glibc": "glibc defaults", "cuda": "torch's CUDA caching allocator"}
MODES = tuple(PASSES)
ROUNDS = 3  # each case's implementations are timed in turn this many times (time_in_rounds)
COPY = "copy"  # the copy reference among a case's timed calls


def median_seconds(fn, min_run_time):
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def saved_bytes(forward, xin):
    """Bytes forward saves for backward, beyond the input's own storage."""
    storages = {}

    def pack(t):
        if t.is_nested:  # a jagged tensor: its values and offsets
            for part in (t.values(), t.offsets()):
                storages[part.untyped_storage().data_ptr()] = part.untyped_storage().nbytes()
        else:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(xin)
    storages.pop((xin.values() if xin.is_nested else xin).untyped_storage().data_ptr(), None)
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


def peak_bytes(fn, device):
    """Peak of bytes allocated while fn runs: the CUDA allocator's peak, or on
    the CPU the profiler's memory events."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def prepare_case(norm, impl, x, mask):
    """One implementation in training: its timed calls by mode, and what forward
    saves and the peak memory of forward+backward."""
    C = x.shape[1] if norm.endswith("-NCL") else x.shape[-1]
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
    calls = {"fwd": fwd, "bwd": lambda: torch.autograd.grad(y, inputs, grad, retain_graph=True), "fwd+bwd": fwd_bwd}
    return calls, {"saved_bytes": saved_bytes(forward, xin), "peak_bytes": peak_bytes(fwd_bwd, x.device)}


def prepare_inference_case(norm, impl, x, mask):
    """Forward alone, modules in eval mode (timed under torch.inference_mode)."""
    C = x.shape[1] if norm.endswith("-NCL") else x.shape[-1]
    forward, _ = cases.make(norm, impl, x, mask, C, training=False)
    with torch.inference_mode():
        forward(x)  # warm up
    return {"fwd": lambda: forward(x)}, {}


def time_in_rounds(calls, min_run_time, inference):
    """Median seconds of each call, {name: {mode: s}}: the calls of a case
    (every implementation, and the copy reference) timed in turn, ROUNDS
    times, each for min_run_time / ROUNDS; the median of the rounds. A slow
    spell of a shared machine then lands on all of them, not on one."""
    times = {name: {mode: [] for mode in modes} for name, modes in calls.items()}
    context = torch.inference_mode if inference else contextlib.nullcontext
    for _ in range(ROUNDS):
        for name, modes in calls.items():
            with context():
                for mode, fn in modes.items():
                    times[name][mode].append(median_seconds(fn, min_run_time / ROUNDS))
    return {name: {mode: statistics.median(t) for mode, t in modes.items()} for name, modes in times.items()}


def run(shapes, min_run_time, compile_composites, only=None, device="cpu"):
    from tqdm import tqdm

    # Timing backward alone replays one recorded graph (retain_graph=True), which
    # compiled backwards refuse while they donate (reuse) their saved buffers.
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False

    groups = {}  # (shape, norm): its implementations, timed together
    for shape in shapes:
        for norm in shape.norms:
            stock_only = shape.inference or shape.small
            for impl in cases.implementations(norm, shape.padding > 0, compile_composites, stock_only):
                if only is None or only in f"{shape.name} {norm} {impl}":
                    groups.setdefault((shape, norm), []).append(impl)
    results, copy_seconds, inputs = [], {}, {}
    for (shape, norm), impls in tqdm(groups.items(), desc="benchmark", unit="case"):
        if shape.name not in inputs:
            inputs[shape.name] = cases.make_input(shape, device=device)
        x, mask = inputs[shape.name]
        prepare = prepare_inference_case if shape.inference else prepare_case
        calls, memory = {}, {}
        for impl in impls:
            calls[impl], memory[impl] = prepare(norm, impl, cases.layout_input(norm, impl, x, mask), mask)
        # The copy reference: torch.clone of the whole tensor (read + write, all threads).
        calls[COPY] = {"copy": lambda: torch.clone(x)}
        times = time_in_rounds(calls, min_run_time, shape.inference)
        copy_seconds.setdefault(shape.name, []).append(times.pop(COPY)["copy"])
        for impl in impls:
            results.append({"shape": shape.name, "large": shape.large, "inference": shape.inference,
                            "small": shape.small, "norm": norm, "impl": impl, **times[impl], **memory[impl]})
        del calls
    # Effective bandwidth, against the median copy bandwidth of each shape.
    copy_bw = {}
    for name, seconds in copy_seconds.items():
        x = inputs[name][0]
        copy_bw[name] = 2 * x.numel() * x.element_size() / statistics.median(seconds)
    for r in results:
        x, mask = inputs[r["shape"]]
        useful = cases.useful_elements(x, mask) * x.element_size()
        for mode in (m for m in MODES if m in r):
            r[f"{mode}_gbps"] = PASSES[mode] * useful / r[mode] / 1e9
            r[f"{mode}_pct_copy"] = 100 * PASSES[mode] * useful / r[mode] / copy_bw[r["shape"]]
            if r["norm"].startswith("bn-"):
                r[f"{mode}_pct_copy_bn_min"] = 100 * BN_MIN_PASSES[mode] * useful / r[mode] / copy_bw[r["shape"]]
    return results, {k: v / 1e9 for k, v in copy_bw.items()}


# ----------------------------------------------------------------- report


def lookup(results, shape, norm, impl):
    for r in results:
        if (r["shape"], r["norm"], r["impl"]) == (shape, norm, impl):
            return r
    return None


def check_bars(results, device="cpu"):
    """Each performance bar on each case it applies to: (bar, case, value, target, met).
    CPU: the bars of issue 3 (and 9); CUDA: the bars of issue 12."""
    bars = []
    for r in results:
        if r["impl"] != "masknorm":
            continue
        shape, norm = r["shape"], r["norm"]
        case = f"{shape}, {cases.NORM_TITLES[norm]}"
        stock = lookup(results, shape, norm, "stock")
        if r.get("inference") or r.get("small"):
            bars += stock_bars(r, stock, case, device)
            continue
        t = r["fwd+bwd"]
        compiled = lookup(results, shape, norm, "compiled")
        if device == "cuda":
            if stock:
                ratio = stock["fwd+bwd"] / t
                bars.append(("fwd+bwd vs stock torch (no slower)", case, ratio, 1.0, ratio >= 1.0))
            if compiled:
                ratio = compiled["fwd+bwd"] / t
                bars.append(("fwd+bwd vs compiled composite (faster)", case, ratio, 1.0, ratio > 1.0))
            # Bandwidth bars on unpadded batches: with padding, zeros written to
            # padded outputs are traffic the valid-token count does not credit.
            if not r["large"] or "no pad" not in shape:
                continue
            if norm.startswith("bn-"):
                for mode in ("fwd", "bwd"):
                    v = r[f"{mode}_pct_copy_bn_min"]
                    bars.append((f"BN {mode} % of copy, BN minimum traffic", case, v, 75.0, v >= 75))
            elif "bf16" in shape:
                bars.append(("LN/RMS fwd % of copy bandwidth", case, r["fwd_pct_copy"], 85.0, r["fwd_pct_copy"] >= 85))
                bars.append(("LN/RMS bwd % of copy bandwidth", case, r["bwd_pct_copy"], 60.0, r["bwd_pct_copy"] >= 60))
            continue
        if norm.startswith("bn-"):
            eager = [lookup(results, shape, norm, i) for i in ("masked-sums", "gather")]
            eager = [e["fwd+bwd"] for e in eager if e]
            if eager:
                bars.append(("BN fwd+bwd vs best eager composite", case, min(eager) / t, 3.0, min(eager) / t >= 3.0))
            if compiled:
                ratio = compiled["fwd+bwd"] / t
                bars.append(("BN fwd+bwd vs compiled composite", case, ratio, 1.5, ratio >= 1.5))
        loop = lookup(results, shape, norm, "loop")
        if loop and int(shape.split()[0][1:]) >= 16:
            ratio = loop["fwd+bwd"] / t
            bars.append(("fwd+bwd vs per-sequence loop (N >= 16)", case, ratio, 3.0, ratio >= 3.0))
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
            # Batch norm reads x once more than the model above counts (its
            # statistics), dy and x once more in backward: its own bar counts them.
            if norm.startswith("bn-"):
                for mode in ("fwd", "bwd"):
                    v = r[f"{mode}_pct_copy_bn_min"]
                    bars.append((f"BN {mode} % of copy, BN minimum traffic", case, v, 80.0, v >= 80))
    return bars


def stock_bars(r, stock, case, device):
    """Inference and per-call rows against stock torch: inference no slower,
    and (CPU) 1.2x faster for (N, C, L) batch norm with padding (it reads the
    valid positions only, stock reads everything); small tensors within 10%
    of stock's time per call. Stock RMSNorm is a slow composite: not a bar."""
    if stock is None or r["norm"] == "rms":
        return []
    mode = "fwd" if r.get("inference") else "fwd+bwd"
    ratio = stock[mode] / r[mode]
    what = "inference" if r.get("inference") else "training step fwd+bwd"
    if r.get("small"):
        return [(f"{what} per call vs stock (at most 1.1 times its time)", case, ratio, 1 / 1.1, ratio >= 1 / 1.1)]
    if device == "cpu" and r["norm"] == "bn-NCL" and "no pad" not in r["shape"]:
        return [("inference vs stock, (N, C, L) BN with padding", case, ratio, 1.2, ratio >= 1.2)]
    return [("inference vs stock (no slower)", case, ratio, 1.0, ratio >= 1.0)]


def environment(device="cpu", allocator=None):
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = masknorm._C.build_info()
    env = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "masknorm": info["version"],
        "masknorm_cpu_kernels": info["cpu_kernels"],
        "masknorm_kernels": masknorm._C._kernels_for(device),
        "allocator": ALLOCATORS[allocator or ("cuda" if device == "cuda" else "kept")],
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def summary(results, other=None, other_name=None):
    """One row per shape and norm: masknorm's fwd+bwd time and how much faster it is than each alternative.
    With `other` (the same run under another allocator), both settings side by side."""
    impls = [i for i in ("stock", "masked-sums", "gather", "compiled") if any(r["impl"] == i for r in results)]
    both = other is not None
    ms_head = f"masknorm fwd+bwd ms (kept / {other_name})" if both else "masknorm fwd+bwd ms"
    vs_heads = [f"vs {i}" + (f" (kept / {other_name})" if both and i == "stock" else "") for i in impls]
    has_bn = any(r["norm"].startswith("bn-") for r in results)
    lines = [
        f"| shape | norm | {ms_head} | " + " | ".join(vs_heads)
        + " | fwd % copy | bwd % copy |" + (" fwd / bwd % copy, BN minimum |" if has_bn else "") + " peak MB (stock) |",
        "|---|---|---:|" + "---:|" * len(impls) + "---:|---:|" + ("---:|" if has_bn else "") + "---:|",
    ]
    for r in results:
        if r["impl"] != "masknorm" or r.get("inference"):
            continue
        o = lookup(other, r["shape"], r["norm"], "masknorm") if both else None
        ms = f"{1e3 * r['fwd+bwd']:.2f}" + (f" / {1e3 * o['fwd+bwd']:.2f}" if o else "")
        cells = []
        for impl in impls:
            x = lookup(results, r["shape"], r["norm"], impl)
            cell = f"{x['fwd+bwd'] / r['fwd+bwd']:.2f}x" if x else ""
            if x and o and impl == "stock":
                xo = lookup(other, r["shape"], r["norm"], impl)
                cell += f" / {xo['fwd+bwd'] / o['fwd+bwd']:.2f}x" if xo else ""
            cells.append(cell)
        stock = lookup(results, r["shape"], r["norm"], "stock")
        stock_peak = f" ({stock['peak_bytes'] / 2**20:.0f})" if stock else ""
        bn_min = ""
        if has_bn:
            bn_min = (f" {r['fwd_pct_copy_bn_min']:.0f}% / {r['bwd_pct_copy_bn_min']:.0f}% |"
                      if "fwd_pct_copy_bn_min" in r else " |")
        lines.append(
            f"| {r['shape']} | {cases.NORM_TITLES[r['norm']]} | {ms} | " + " | ".join(cells)
            + f" | {r['fwd_pct_copy']:.0f}% | {r['bwd_pct_copy']:.0f}% |{bn_min} {r['peak_bytes'] / 2**20:.0f}{stock_peak} |"
        )
    return lines


def inference_summary(results, other=None):
    """Inference rows: masknorm's and stock's forward in eval mode, under torch.inference_mode."""
    rows = [r for r in results if r.get("inference") and r["impl"] == "masknorm"]
    if not rows:
        return []
    both = other is not None
    head = " (kept / glibc)" if both else ""
    lines = [
        "## Inference (eval mode, torch.inference_mode)",
        "",
        f"| shape | norm | masknorm ms{head} | stock ms{head} | vs stock{head} | % copy |",
        "|---|---|---:|---:|---:|---:|",
    ]

    def pair(rs, key):
        return " / ".join(f"{1e3 * x[key]:.3f}" for x in rs if x)

    for r in rows:
        stock = lookup(results, r["shape"], r["norm"], "stock")
        o = lookup(other, r["shape"], r["norm"], "masknorm") if both else None
        so = lookup(other, r["shape"], r["norm"], "stock") if both else None
        ratio = " / ".join(f"{s['fwd'] / m['fwd']:.2f}x" for m, s in ((r, stock), (o, so)) if m and s)
        lines.append(
            f"| {r['shape']} | {cases.NORM_TITLES[r['norm']]} | {pair([r, o], 'fwd')} | {pair([stock, so], 'fwd')} "
            f"| {ratio} | {r['fwd_pct_copy']:.0f}% |"
        )
    return lines + [""]


def markdown(results, copy_gbps, bars, env, command, other=None):
    where = (f"{env['gpu']} (masknorm {env['masknorm_kernels']} kernels)" if env.get("device") == "cuda"
             else f"{env['cpu']}, {env['threads']} threads ({env['torch_cpu_capability']}, masknorm "
                  f"{env['masknorm_cpu_kernels']} kernels)")
    other_name = "glibc" if other is not None else None
    lines = [
        "# masknorm benchmark",
        "",
        f"`{command}` on {env['date']}: {where}, torch {env['torch']}, masknorm {env['masknorm']}, "
        f"allocator: {env.get('allocator', 'glibc defaults')}"
        + (f"; the summary also shows the same run with {ALLOCATORS['glibc']}" if other is not None else "") + ".",
        "Times are medians (ms). GB/s counts valid tokens only (fwd 2 passes, bwd 3; BN minimum: 3 and 5); "
        "% copy is against torch.clone of the same tensor. Speedup: the implementation's fwd+bwd time over masknorm's.",
        "",
        "## Summary",
        "",
        *summary(results, other, other_name),
        "",
    ]
    lines += inference_summary(results, other)
    for shape in dict.fromkeys(r["shape"] for r in results if not r.get("inference")):
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
        lines.append(f"| {bar} | {case} | {value:.2f}{unit} | {target:.3g}{unit} | {'yes' if ok else '**no**'} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if not r.get("inference")]  # training fwd+bwd only
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    if not shapes:  # inference rows only: nothing to plot
        fig, ax = plt.subplots(figsize=(6, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no training rows (inference: see results.md)", ha="center", va="center")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
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
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the tensors live")
    parser.add_argument(
        "--allocator", default="both", choices=("both", "kept", "glibc"),
        help="CPU: glibc keeping freed memory, glibc's defaults, or both in two processes (default)",
    )
    args = parser.parse_args(argv)
    try:
        _extras.require("bench", ["matplotlib"] + ([] if args.from_json else ["tqdm"]), "the benchmark")
    except ModuleNotFoundError as error:
        parser.exit(2, f"{parser.prog}: {error}\n")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m benchmarks", *argv])
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        other = saved.get("other_allocator_results")
        write_report(saved["results"], saved["copy_gbps"], saved["environment"], saved["command"], args.out, other)
        return
    if args.device == "cpu" and args.allocator == "both":
        # Two child processes, one per allocator setting; this one reports both.
        runs = {}
        for allocator in ("glibc", "kept"):
            out = os.path.join(args.out, f"run_{allocator}")
            env = dict(os.environ, **(CACHING_MALLOC_ENV if allocator == "kept" else {}))
            child = []  # this run's arguments, less --allocator and --out (each child gets its own)
            skip = False
            for a in argv:
                if skip:
                    skip = False
                elif a in ("--allocator", "--out"):
                    skip = True
                elif not a.startswith(("--allocator=", "--out=")):
                    child.append(a)
            cmd = [sys.executable, "-m", "benchmarks", *child, "--allocator", allocator, "--out", out]
            print(f"== allocator: {ALLOCATORS[allocator]}", flush=True)
            subprocess.run(cmd, env=env, check=True)
            with open(os.path.join(out, "results.json")) as f:
                runs[allocator] = json.load(f)
            shutil.rmtree(out)
        kept = runs["kept"]
        write_report(kept["results"], kept["copy_gbps"], kept["environment"], command, args.out, runs["glibc"]["results"])
        return
    if args.device == "cpu" and args.allocator == "kept" and not all(os.environ.get(k) == v for k, v in CACHING_MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *argv], dict(os.environ, **CACHING_MALLOC_ENV))
    if args.device == "cuda":
        shapes = cases.QUICK_SHAPES if args.quick else cases.GPU_SHAPES
    else:
        shapes = cases.QUICK_SHAPES if args.quick else cases.SHAPES
    min_run_time = args.min_run_time or (0.05 if args.quick else 0.3)
    compile_composites = not (args.quick or args.no_compile)
    results, copy_gbps = run(shapes, min_run_time, compile_composites, args.only, device=args.device)
    allocator = "cuda" if args.device == "cuda" else args.allocator
    write_report(results, copy_gbps, environment(args.device, allocator), command, args.out)


def write_report(results, copy_gbps, env, command, out, other=None):
    os.makedirs(out, exist_ok=True)
    report = markdown(results, copy_gbps, check_bars(results, env.get("device", "cpu")), env, command, other)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report)
    saved = {"environment": env, "command": command, "copy_gbps": copy_gbps, "results": results}
    if other is not None:
        saved["other_allocator_results"] = other
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(saved, f, indent=1)
    plot(results, os.path.join(out, "results.png"))
    print(report)
    print(f"wrote {out}/results.md, results.json, results.png")


if __name__ == "__main__":
    main()
