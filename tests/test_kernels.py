"""The kernel sets and their switches. Which kernels serve each device
(masknorm.kernels_for): the CPU build per instruction set (the extension
loads the best build this CPU runs, every build computes the same results, a
missing build falls back to the portable kernels), the fused CUDA kernels
(use_fused_cuda_kernels), and the generic kernels written with ATen ops
(forced for testing with masknorm._C._force_generic_kernels; they serve every
other device and agree with the CPU kernels on every op's samples); data
checks (enable_device_data_checks) always run on the CPU."""


import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import masknorm
import samples
from helpers import ref_bn, ref_rows
from samples import batch_norm as S
from samples import row_norm as R

ops = torch.ops.masknorm
PACKAGE_DIR = os.path.dirname(masknorm.__file__)
ISA_LIBS = {
    isa: glob.glob(os.path.join(PACKAGE_DIR, f"_C_cpu_{isa}.*")) for isa in ("avx2", "avx512")
}
# Instruction-set builds this CPU can run, by torch's own detection.
RUNNABLE = {"DEFAULT": ["default"], "AVX2": ["default", "avx2"], "AVX512": ["default", "avx2", "avx512"]}.get(
    torch.backends.cpu.get_cpu_capability(), ["default"]
)

# Against torch in float64, by input dtype, for the output and input gradient
# (measured worst |a - e| / (|e| + 1), every build: 1e-15 / 2.8e-7 / 2.9e-3);
# parameter gradients and running statistics are float32 (the modules'
# parameters) whatever the input: 1e-5 (measured 8.5e-7).
TORCH_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}
PARAM_TOL = 1e-5

CASES = {"NC": S.Case("NC", 67, 37), "NLC": S.Case("NLC", 5, 37, 19), "NCL": S.Case("NCL", 5, 37, 19),
         "ln": R.Case((5, 19, 37), (37,)), "rms": R.Case((5, 19, 37), (37,))}


def make_inputs(path):
    """Inputs for SCRIPT, made here once (samples: a padded first sequence, odd sizes)."""
    inputs = {}
    for name, case in CASES.items():
        module = S if name in ("NC", "NLC", "NCL") else R
        x, mask = module.inputs(case, dtype=torch.float64, scale=3.0, offset=5.0)
        C = x.shape[1] if name == "NCL" else x.shape[-1]
        inputs[name] = (x, mask, torch.randn(C), torch.randn(C), torch.randn(x.shape, dtype=torch.float64))
    torch.save(inputs, path)


# Runs every op forward and backward on the saved inputs (odd sizes: vector
# tails; masks with a fully padded row) and saves the results. Run in a
# subprocess per ATEN_CPU_CAPABILITY value.
SCRIPT = r"""
import sys, torch, masknorm
inputs = torch.load(sys.argv[1])
out = {"cpu_kernels": masknorm._C.build_info()["cpu_kernels"]}
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for name, (x, mask, weight, bias, grad) in inputs.items():
        x = x.to(dtype).requires_grad_(True)
        C = x.shape[1] if name == "NCL" else x.shape[-1]
        if name in ("NC", "NLC", "NCL"):
            m = masknorm.MaskedBatchNorm1d(C, channels_last=name == "NLC")
        elif name == "ln":
            m = masknorm.MaskedLayerNorm(C)
        else:
            m = masknorm.MaskedRMSNorm(C)
        with torch.no_grad():
            for p, value in zip(m.parameters(), (weight, bias)):
                p.copy_(value)
        y = m(x, mask)
        y.backward(grad.to(dtype))
        key = f"{name}_{dtype}"
        out[key] = [y.detach().double(), x.grad.double()] + [p.grad.double() for p in m.parameters()]
        out[key] += [b.double() for b in m.buffers() if b.is_floating_point()]
torch.save(out, sys.argv[2])
"""


def run_with_capability(capability, tmp_path, pythonpath=None):
    """SCRIPT's results with torch (and so masknorm) limited to `capability`."""
    inputs, out = tmp_path / "inputs.pt", tmp_path / f"out_{capability}.pt"
    if not inputs.exists():
        make_inputs(inputs)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(inputs), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.skipif(not any(ISA_LIBS.values()), reason="no instruction-set builds on this platform")
def test_best_build_is_loaded():
    info = masknorm._C.build_info()
    best = RUNNABLE[-1]
    assert info["cpu_kernels"] == best, info
    assert info["cpu_kernels_note"] == ""


def torch_reference(path):
    """SCRIPT's results from torch's own modules (nn.BatchNorm1d on the packed
    valid tokens, nn.LayerNorm, nn.RMSNorm on the valid rows), in float64 on
    the same (rounded) inputs."""
    inputs, out = torch.load(path), {}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for name, (x, mask, weight, bias, grad) in inputs.items():
            x = x.to(dtype).double().requires_grad_(True)
            C = x.shape[1] if name == "NCL" else x.shape[-1]
            if name in ("NC", "NLC", "NCL"):
                r = nn.BatchNorm1d(C, dtype=torch.float64)
                fn = lambda t: ref_bn(r, t, mask, name == "NLC")  # noqa: E731
            else:
                r = (nn.LayerNorm if name == "ln" else nn.RMSNorm)(C, dtype=torch.float64)
                fn = lambda t: ref_rows(r, t, mask)  # noqa: E731
            with torch.no_grad():
                for p, value in zip(r.parameters(), (weight, bias)):
                    p.copy_(value)
            y = fn(x)
            y.backward(grad.to(dtype).double())
            out[f"{name}_{dtype}"] = [y.detach(), x.grad] + [p.grad for p in r.parameters()]
            out[f"{name}_{dtype}"] += [b for b in r.buffers() if b.is_floating_point()]
    return out


@pytest.mark.slow  # loads every instruction-set build in child processes
def test_every_build_computes_the_same(tmp_path):
    """Every build agrees with the portable one, and each with torch's modules
    (float64 on the same inputs: a bug common to all builds fails too)."""
    results = {isa: run_with_capability(isa, tmp_path) for isa in RUNNABLE}
    reference = results["default"]
    expected_by_torch = torch_reference(tmp_path / "inputs.pt")
    for isa, result in results.items():
        for key, tensors in expected_by_torch.items():
            dtype = getattr(torch, key.rsplit(".", 1)[-1])
            assert len(result[key]) == len(tensors)
            for i, (actual, expected) in enumerate(zip(result[key], tensors)):
                t = TORCH_TOL[dtype] if i < 2 else PARAM_TOL
                torch.testing.assert_close(actual, expected, rtol=t, atol=t, msg=f"{isa} {key} result {i} vs torch")
    for isa, result in results.items():
        assert result["cpu_kernels"] == (isa if ISA_LIBS.get(isa) or isa == "default" else "default")
        for key, tensors in reference.items():
            if key == "cpu_kernels":
                continue
            # Vector width changes the summation order: float32 rounding differs, nothing more.
            tol = {"float64": 1e-12, "float32": 1e-4, "bfloat16": 2e-2}[key.rsplit(".", 1)[-1]]
            for expected, actual in zip(tensors, result[key]):
                torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=f"{isa} {key}")


@pytest.mark.slow  # child processes
@pytest.mark.skipif(not any(ISA_LIBS.values()), reason="no instruction-set builds on this platform")
def test_missing_build_falls_back_to_portable_kernels(tmp_path):
    # A copy of the package without its instruction-set libraries.
    package = tmp_path / "masknorm"
    shutil.copytree(PACKAGE_DIR, package, ignore=shutil.ignore_patterns("_C_cpu_*", "__pycache__"))
    result = run_with_capability(RUNNABLE[-1], tmp_path, pythonpath=str(tmp_path))
    assert result["cpu_kernels"] == "default"
    code = "import masknorm; print(masknorm._C.build_info()['cpu_kernels_note'])"
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{RUNNABLE[-1]} kernels not used" in proc.stdout


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_one_openmp_runtime_is_loaded():
    # The kernels are built with -fopenmp (at::parallel_for's loop is OpenMP code
    # compiled into them); they must share torch's OpenMP runtime, not load a second.
    x = torch.randn(64, 32, 16)
    masknorm.MaskedLayerNorm(16)(x, torch.zeros(64, 32, dtype=torch.bool))
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


def test_generic_kernels_are_forced_and_reset(kernels):
    # CPU tensors get the CPU build until the generic kernels are forced
    native = masknorm.kernels_for("cpu")
    assert kernels == "native" and native == masknorm.build_info()["cpu_kernels"] == masknorm._C._kernels_for("cpu")
    masknorm._C._force_generic_kernels(True)
    try:
        assert masknorm.kernels_for("cpu") == "generic" and masknorm._C._generic_kernels_forced()
    finally:
        masknorm._C._force_generic_kernels(False)
    assert masknorm.kernels_for("cpu") == native and not masknorm._C._generic_kernels_forced()


def test_other_devices_get_the_generic_kernels():
    assert masknorm.kernels_for("meta") == "generic"
    assert masknorm.kernels_for(torch.device("xpu")) == "generic"


def test_cuda_tensors_get_the_fused_kernels_where_built_and_on():
    built = masknorm.build_info()["cuda"]
    try:
        masknorm.use_fused_cuda_kernels(True)
        assert masknorm.kernels_for("cuda") == ("cuda" if built else "generic")
        masknorm.use_fused_cuda_kernels(False)
        assert masknorm.kernels_for("cuda") == "generic"
    finally:
        masknorm.use_fused_cuda_kernels(True)


def test_data_checks_always_run_on_the_cpu():
    x = torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    masknorm.enable_device_data_checks(False)  # accelerators only: the CPU checks regardless
    with pytest.raises(ValueError, match="more than 1 valid"):
        ops.batch_norm(x, mask, None, None, None, None, None, True, 0.1, 1e-5, True)


def _flat(result):
    return [t for t in (result if isinstance(result, (tuple, list)) else [result]) if t is not None]


@pytest.mark.slow  # every float64 sample of every op, twice
@pytest.mark.parametrize("op", samples.OPS)
def test_generic_kernels_agree_with_the_cpu_kernels(op):
    """Every float64 sample of every op: outputs (and updated running statistics) agree."""
    fn = getattr(torch.ops.masknorm, op)
    listed = samples.SAMPLES[op](dtype=torch.float64)
    assert listed
    for sample in listed:
        results = []
        for generic in (False, True):
            masknorm._C._force_generic_kernels(generic)
            try:
                s = sample.clone()
                results.append(_flat(s.call(fn)) + [a for a in s.args if isinstance(a, torch.Tensor)])
            finally:
                masknorm._C._force_generic_kernels(False)
        for native, generic in zip(*results):
            torch.testing.assert_close(generic, native, rtol=1e-10, atol=1e-12, equal_nan=True, msg=sample.name)
