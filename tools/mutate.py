"""Mutation testing: does the test suite fail when the code is wrong?

Neighbours: tools/gpu_check.sh, tools/cuda_tune.py, tools/cuda_compile_check.sh
(GPU and CUDA tools); the tests it runs are tests/ (docs/reliability.md keeps
the last table).

    python tools/mutate.py                         # every mutant, the whole tests/ (-x -q)
    python tools/mutate.py --list                  # the mutants and the bug each models
    python tools/mutate.py --check                 # only check that every snippet still applies
    python tools/mutate.py --only shift_no_second_pass --threads 1,2,8,16
    python tools/mutate.py --tests tests/test_batch_norm.py tests/test_gradcheck.py

MUTANTS is a curated list: each replaces one exact snippet of a file under
csrc/ or python/ with a wrong version (the bug it models is its description).
Every snippet must occur exactly once in its file (checked for all of them
before anything runs: an edited file shows up as a rotten mutant, never as a
silently skipped one); `--check` does only that, in a second, after an edit
to a mutated file. The default test suite does not pin these snippets, so a
reformatting of the sources only shows up here. The script copies the repository's files (tracked and
untracked-but-not-ignored, uncommitted edits included) to a temporary folder,
builds the extension there in place (`setup.py build_ext --inplace`, ccache
keyed to that folder), checks that the unmutated tests pass, then for each
mutant: applies it, rebuilds (C++ only; ninja recompiles the changed file),
runs pytest with PYTHONPATH on the copy's python/ (the installed masknorm of
the environment is never touched), and restores the file. `--threads 1,2,8,16`
runs each mutant once per thread count (OMP_NUM_THREADS, which sets torch's).
A mutant is killed when pytest fails, survived when it passes. The table
(markdown, on stdout): mutant, file, threads, killed / survived, the first
failing test, seconds (rebuild, counted in a mutant's first row, and pytest).
The exit status is 1 when a mutant survived.

The build uses the interpreter running this script and its environment
(setuptools >= 77, ninja, torch). `--isas` picks the instruction-set kernel
libraries to build (default: only the one torch selects on this CPU, which is
the one the tests run; "all" for build.json's list).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # exact snippet, occurring once in the file
    new: str
    description: str


MUTANTS: List[Mutant] = [
    # ---------------------------------------------------------------- CPU kernels
    Mutant("shift_uncorrected", "csrc/ops/cpu/channel_loops.h",
           "m2_out[c] = out_t(std::max(d2[c] - ds[c] * ds[c] / k, MergeT(0)));", "m2_out[c] = out_t(d2[c]);",
           "channels-last moments drop the shift's correction of M2 (sum d^2 taken as M2)"),
    Mutant("shift_no_second_pass", "csrc/ops/cpu/channel_loops.h",
           "if (shift_holds || pass == 1) break;", "break;",
           "channels-last moments keep a shift far out in the spread (no second pass)"),
    Mutant("chan_merge_moments", "csrc/ops/cpu/norm_utils.h",
           "m2 += part_m2 + delta * delta * nf;", "m2 += part_m2;",
           "chan_merge (chunks, threads, rows, parts) drops the between-group variance term"),
    Mutant("running_var_biased", "csrc/ops/cpu/batch_norm_kernel.cpp",
           "double(acc.m2) / double(acc.count - 1)", "double(acc.m2) / double(acc.count)",
           "running variance divides by count instead of count - 1 (biased)"),
    Mutant("cumulative_factor", "csrc/ops/cpu/batch_norm_kernel.cpp",
           "1.0 / double(batches ? *batches : 1)", "1.0 / double(batches ? *batches + 1 : 1)",
           "momentum=None averages over one batch too many"),
    Mutant("bn_invstd_no_eps", "csrc/ops/cpu/batch_norm_kernel.cpp",
           "scalar_t(1 / std::sqrt(acc.m2 / MergeT(acc.count) + a.eps))",
           "scalar_t(1 / std::sqrt(acc.m2 / MergeT(acc.count)))",
           "BN training invstd forgets eps"),
    Mutant("row_norm_no_eps", "csrc/ops/cpu/row_norm_kernel.cpp",
           "opmath_t(1) / std::sqrt(var + opmath_t(eps))", "opmath_t(1) / std::sqrt(var)",
           "LN/RMS rstd forgets eps"),
    Mutant("generic_running_var_biased", "csrc/ops/generic/batch_norm_kernel.cpp",
           "(total.to(at::kDouble) - 1).clamp_min(1)", "total.to(at::kDouble).clamp_min(1)",
           "generic kernels: biased running variance"),
    # ---------------------------------------------------------------- checks
    Mutant("momentum_range", "csrc/ops/checks.cpp",
           "*momentum >= 0.0 && *momentum <= 1.0", "*momentum >= 0.0",
           "momentum > 1 accepted"),
    Mutant("eps_positive", "csrc/ops/checks.cpp",
           "(positive ? eps > 0 : eps >= 0)", "(eps >= 0)",
           "eps = 0 accepted where it must be > 0 (BN training)"),
    # ---------------------------------------------------------------- ops
    Mutant("bn_backward_bias_only", "csrc/ops/batch_norm.cpp",
           "if (output_mask[1] || output_mask[2] || (output_mask[0] && training)) {",
           "if (output_mask[1] || (output_mask[0] && training)) {",
           "BN backward skips its reductions when only the bias gradient is requested"),
    Mutant("rms_default_eps", "csrc/ops/row_norm.cpp",
           "double(std::numeric_limits<float>::epsilon());", "1e-5;",
           "RMSNorm eps=None is not float32's machine epsilon"),
    # ---------------------------------------------------------------- autograd
    Mutant("composite_xhat_term", "csrc/ops/autograd/differentiable_backward.cpp",
           "v = v - xhat * masked_mean(g * xhat);", "v = v - 0 * xhat;",
           "double-backward composite drops dx's xhat * mean(g * xhat) term"),
    Mutant("composite_mean_term", "csrc/ops/autograd/differentiable_backward.cpp",
           "if (centered) v = v - masked_mean(g);", "(void)centered;",
           "double-backward composite drops dx's mean(g) term"),
    Mutant("autograd_bias_grad", "csrc/ops/autograd/norm_autograd.cpp",
           "any |= output_mask[i] = task_should_compute_output(i);",
           "any |= output_mask[i] = task_should_compute_output(i == 2 ? 1 : i);",
           "norm autograd asks for the bias gradient when the weight needs one"),
    # ---------------------------------------------------------------- Python
    Mutant("fake_2d_channels_last", "python/masknorm/_ops.py",
           "        C = input.shape[1]\n    else:",
           "        C = input.shape[2] if channels_last else input.shape[1]\n    else:",
           "fake kernel: channel count of 2-D input with channels_last=True read from dim 2"),
    Mutant("module_eval_batch_stats", "python/masknorm/modules.py",
           "use_batch_stats = training or (running_mean is None and running_var is None)",
           "use_batch_stats = True",
           "masked batch norms normalize with batch statistics in eval"),
    Mutant("module_num_batches", "python/masknorm/modules.py",
           "num_batches_tracked=_state(module, \"num_batches_tracked\") if training and track_running_stats else None,",
           "num_batches_tracked=None,",
           "masked batch norms never count batches (num_batches_tracked stays 0)"),
    Mutant("sync_count_input_dtype", "python/masknorm/distributed.py",
           "count.to(mean.dtype).reshape(1)", "count.to(input.dtype).reshape(1)",
           "MaskedSyncBatchNorm packs the count in the input dtype (517 is 516 in bfloat16)"),
    Mutant("sync_convert_parametrized", "python/masknorm/distributed.py",
           "    if not uses_forward_of(module, *bases):",
           "    if not (isinstance(module, bases) and type(module).forward in {b.forward for b in bases}):",
           "convert_sync_batchnorm replaces parametrized batch norms"),
    Mutant("sync_one_rank_communicates", "python/masknorm/distributed.py",
           "if world_size > 1 else None", "if world_size >= 1 else None",
           "MaskedSyncBatchNorm communicates on a one-rank group"),
    Mutant("sync_error_skips_exchange", "python/masknorm/distributed.py",
           "            error = e\n            packed = torch.zeros(",
           "            raise\n            packed = torch.zeros(",
           "a rank whose input is wrong raises before the statistics exchange: the others hang"),
    Mutant("sync_flatten_skips_exchange", "python/masknorm/distributed.py",
           "            input_error = e\n",
           "            raise\n",
           "a rank whose 4-D input's mask is wrong raises while flattening it, before the exchange: the others hang"),
    Mutant("sync_spatial_layout_ignored", "python/masknorm/distributed.py",
           "            layout.channels_last,\n",
           "            self.channels_last,\n",
           "MaskedSyncBatchNorm reads channels-last memory (N, C, H, W), flattened to (N, L, C), as (N, C, L)"),
]


def check_snippets(root: str, mutants: List[Mutant]) -> List[str]:
    """Problems: mutants whose snippet does not occur exactly once."""
    problems = []
    for m in mutants:
        path = os.path.join(root, m.path)
        if not os.path.isfile(path):
            problems.append(f"{m.name}: no file {m.path}")
            continue
        with open(path) as f:
            n = f.read().count(m.old)
        if n != 1:
            problems.append(f"{m.name}: snippet occurs {n} times in {m.path}: {m.old!r}")
    return problems


def copy_repo(dest: str) -> None:
    """Tracked and untracked (not ignored) files of the repository, as they are now."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, check=True, capture_output=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):  # deleted in the work tree
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))


def default_isas() -> str:
    import torch

    with open(os.path.join(ROOT, "build.json")) as f:
        isas = json.load(f)["cpu_isas"]
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return capability if capability in isas else ""


def build(copy: str, isas: Optional[str], log: str) -> bool:
    env = dict(os.environ, MASKNORM_CUDA="0", CCACHE_BASEDIR=copy, CCACHE_NOHASHDIR="1")
    if isas is not None:
        env["MASKNORM_CPU_ISAS"] = isas
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy, env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    return proc.returncode == 0


def run_tests(copy: str, tests: List[str], threads: Optional[int], timeout: float):
    """(passed, first failing test or message, seconds)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(copy, "python")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "pytest", *tests, "-x", "-q", "-rfE", "-p", "no:cacheprovider"]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timeout after {timeout:.0f} s", time.monotonic() - start
    seconds = time.monotonic() - start
    if proc.returncode == 0:
        return True, "", seconds
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    first = found.group(1) if found else (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["?"]
    return False, first if isinstance(first, str) else first[0], seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests", nargs="+", default=["tests/"], help="pytest arguments (default: tests/)")
    ap.add_argument("--threads", default="", help="thread counts, comma-separated (default: torch's own)")
    ap.add_argument("--only", action="append", help="run only this mutant (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--check", action="store_true", help="check that every snippet occurs once, and exit")
    ap.add_argument("--isas", default=None, help="MASKNORM_CPU_ISAS for the build (default: this CPU's; 'all')")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = ap.parse_args(argv)

    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(mutants) != len(set(args.only)):
        ap.error(f"unknown mutant among {args.only}")
    if args.list:
        for m in mutants:
            print(f"{m.name:28} {m.path:48} {m.description}")
        return 0
    problems = check_snippets(ROOT, mutants)
    if problems:
        print("rotten mutants (fix MUTANTS):\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(mutants)} mutants, every snippet occurs once", file=sys.stderr)
        return 0
    threads = [int(t) for t in args.threads.split(",") if t] or [None]
    isas = None if args.isas == "all" else (default_isas() if args.isas is None else args.isas)

    from tqdm import tqdm

    tmp = tempfile.mkdtemp(prefix="masknorm-mutate-")
    copy, log = os.path.join(tmp, "repo"), os.path.join(tmp, "build.log")
    rows = []
    try:
        copy_repo(copy)
        print(f"copy: {copy}; building (log: {log})", file=sys.stderr)
        if not build(copy, isas, log):
            print(f"the unmutated build failed; see {log}", file=sys.stderr)
            args.keep = True
            return 1
        for t in threads:
            ok, first, secs = run_tests(copy, args.tests, t, args.timeout)
            if not ok:
                print(f"the unmutated tests fail ({t or 'default'} threads): {first}", file=sys.stderr)
                return 1
            print(f"unmutated tests pass ({t or 'default'} threads, {secs:.0f} s)", file=sys.stderr)
        stale = False  # the built libraries hold a restored C++ mutant
        for m in tqdm(mutants, desc="mutants", unit="mutant", file=sys.stderr):
            path = os.path.join(copy, m.path)
            with open(path) as f:
                original = f.read()
            start = time.monotonic()
            try:
                with open(path, "w") as f:
                    f.write(original.replace(m.old, m.new, 1))
                built = (m.path.endswith(".py") and not stale) or build(copy, isas, log)
                stale = False
                build_secs = time.monotonic() - start
                for t in threads:
                    if not built:
                        rows.append((m, t, "build failed", f"see {log}", build_secs))
                        continue
                    ok, first, secs = run_tests(copy, args.tests, t, args.timeout)
                    rows.append((m, t, "survived" if ok else "killed", first, build_secs + secs))
                    build_secs = 0.0  # counted once, in the mutant's first row
                    tqdm.write(f"{m.name} ({t or 'default'} threads): {rows[-1][2]} {first}", file=sys.stderr)
            finally:
                with open(path, "w") as f:
                    f.write(original)
                stale = stale or not m.path.endswith(".py")
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print("| mutant | file | threads | result | first failing test | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m, t, result, first, secs in rows:
        print(f"| {m.name} | {m.path} | {t or 'default'} | {result} | {first} | {secs:.0f} |")
    survived = [r for r in rows if r[2] != "killed"]
    print(f"\n{len(rows) - len(survived)} of {len(rows)} killed", file=sys.stderr)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
