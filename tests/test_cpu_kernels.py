"""The CPU kernels built per instruction set (csrc/ops/cpu/dispatch.cpp): the
extension loads the best build this CPU runs, every build computes the same
results, and a missing build falls back to the portable kernels."""

import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

import masknorm

PACKAGE_DIR = os.path.dirname(masknorm.__file__)
ISA_LIBS = {
    isa: glob.glob(os.path.join(PACKAGE_DIR, f"_C_cpu_{isa}.*")) for isa in ("avx2", "avx512")
}
# Instruction-set builds this CPU can run, by torch's own detection.
RUNNABLE = {"DEFAULT": ["default"], "AVX2": ["default", "avx2"], "AVX512": ["default", "avx2", "avx512"]}.get(
    torch.backends.cpu.get_cpu_capability(), ["default"]
)

CASES = (("bn2d", (67, 37), (67,)), ("bn_nlc", (5, 19, 37), (5, 19)), ("bn_ncl", (5, 37, 19), (5, 19)),
         ("ln", (5, 19, 37), (5, 19)), ("rms", (5, 19, 37), (5, 19)))


def make_inputs(path):
    """Inputs for SCRIPT, made here once: torch's own random kernels differ per instruction set."""
    torch.manual_seed(0)
    inputs = {}
    for name, shape, mask_shape in CASES:
        mask = torch.rand(mask_shape) < 0.3
        mask[0] = True
        C = shape[1] if name == "bn_ncl" else shape[-1]
        inputs[name] = (torch.randn(shape, dtype=torch.float64) * 3 + 5, mask, torch.randn(C), torch.randn(C),
                        torch.randn(shape, dtype=torch.float64))
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
        C = x.shape[1] if name == "bn_ncl" else x.shape[-1]
        if name.startswith("bn"):
            m = masknorm.MaskedBatchNorm1d(C, channels_last=name == "bn_nlc")
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


def test_every_build_computes_the_same(tmp_path):
    results = {isa: run_with_capability(isa, tmp_path) for isa in RUNNABLE}
    reference = results["default"]
    for isa, result in results.items():
        assert result["cpu_kernels"] == (isa if ISA_LIBS.get(isa) or isa == "default" else "default")
        for key, tensors in reference.items():
            if key == "cpu_kernels":
                continue
            # Vector width changes the summation order: float32 rounding differs, nothing more.
            tol = {"float64": 1e-12, "float32": 1e-4, "bfloat16": 2e-2}[key.rsplit(".", 1)[-1]]
            for expected, actual in zip(tensors, result[key]):
                torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=f"{isa} {key}")


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
